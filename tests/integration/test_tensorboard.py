"""TensorBoard as a user reads it: a short GRPO fit from the shipped config, its event files read back.

Checks what issue 29 found misleading in the browser: each probe measurement once at its step, one step number per
moment across scalars, histograms, text, images, selection.json and checkpoint names, a description on every
``entropy/*`` scalar, legible rollout samples (all images of a two-image question, fenced prompt and response),
and no clutter (``hp_metric`` placeholder, duplicate accuracy).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
from tensorboard.plugin_util import markdown_to_safe_html
from tensorboard.util import tensor_util

from app.cli import cli_main
from app.make_data import write_dataset
from callbacks.rollout_samples import GAP

ROOT = Path(__file__).resolve().parents[2]
STEPS = [2, 4]  # probe, rollout samples, validation and checkpoints every 2 of 4 optimiser steps


def shrunk_grpo_config(tmp_path: Path) -> Path:
    """configs/tiny/grpo.yaml as shipped (logger, callbacks), with every period and size made small."""
    config = yaml.safe_load((ROOT / "configs/tiny/grpo.yaml").read_text())
    config["trainer"].update(max_steps=4, val_check_interval=2, limit_val_batches=1, enable_progress_bar=False,
                             default_root_dir=str(tmp_path / "runs"))
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    small = {"ModelCheckpoint": {"every_n_train_steps": 2}, "RolloutSamplesCallback": {"every_n_steps": 2},
             "CriticalEntropyCallback": {"every_n_steps": 2, "num_probe_prompts": 2, "samples_per_prompt": 2,
                                         "max_new_tokens": 8}}
    for cb in config["trainer"]["callbacks"]:
        cb.setdefault("init_args", {}).update(small.get(cb["class_path"].rsplit(".", 1)[1], {}))
    model = config["model"]["init_args"]
    model.update(group_size=2)
    model["rollout"]["init_args"]["max_new_tokens"] = 8
    config["data"].update(batch_size=2, val_batch_size=2, val_limit=2, train_limit=None)
    path = tmp_path / "grpo-small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory, monkeypatch_module):
    tmp = tmp_path_factory.mktemp("tb")
    write_dataset(tmp / "data", n_train=16, n_val=4, quiet=True, tasks=["two_images"])  # two images per prompt
    monkeypatch_module.setattr(sys, "argv", [sys.argv[0]])
    cli = cli_main(["fit", "--config", str(shrunk_grpo_config(tmp)),
                    "--model.init_args.model_path", str(tiny_model_dir("internvl")),
                    "--data.train_files", str(tmp / "data" / "train-*.parquet"),
                    "--data.val_files", str(tmp / "data" / "validation-*.parquet")])
    acc = EventAccumulator(cli.trainer.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    return cli.trainer, acc


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Tensors(tag)]


def tags(acc: EventAccumulator, plugin: str) -> list[str]:
    return sorted(acc.PluginTagToContent(plugin))


@pytest.mark.slow
def test_each_probe_reading_once_at_its_step_with_a_description(run):
    _, acc = run
    entropy = [t for t in tags(acc, "scalars") if t.startswith("entropy/")]
    assert {"entropy/critical", "entropy/all_tokens", "entropy/high_entropy_frac", "entropy/critical_rate",
            "entropy/n_critical"} <= set(entropy)
    for tag in entropy:
        if not tag.startswith("entropy/critical/"):  # per-word tags only where the word occurred
            assert steps(acc, tag) == STEPS, tag  # measured at 2 and 4, written once each
        description = acc.SummaryMetadata(tag).summary_description
        assert len(description) > 20, (tag, description)
    assert "nats" in acc.SummaryMetadata("entropy/all_tokens").summary_description
    assert "per 1000" in acc.SummaryMetadata("entropy/critical_rate").summary_description
    assert "Count" in acc.SummaryMetadata("entropy/n_critical").summary_description
    assert "ln |V|" in acc.SummaryMetadata("entropy/high_entropy_frac").summary_description
    assert steps(acc, "entropy/hist/all_tokens") == STEPS


@pytest.mark.slow
def test_one_step_number_per_moment_everywhere(run):
    trainer, acc = run
    assert steps(acc, "train/reward") == [1, 2, 3, 4]  # global_step after each optimiser step
    assert steps(acc, "val/accuracy") == STEPS
    assert steps(acc, "rollouts/sample_0/text_summary") == STEPS
    assert steps(acc, "rollouts/sample_0/images") == STEPS
    selection = json.loads((Path(trainer.log_dir) / "selection.json").read_text())
    assert [c["step"] for c in selection["candidates"]] == STEPS
    assert all(f"select-step={s}.ckpt" in c["path"] for s, c in zip(STEPS, selection["candidates"], strict=True))
    ckpts = sorted(p.name for p in Path(trainer.checkpoint_callback.dirpath).glob("*step=*.ckpt"))
    assert sorted({int(re.search(r"step=(\d+)", n).group(1)) for n in ckpts}) == STEPS, ckpts


@pytest.mark.slow
def test_rollout_samples_are_legible_and_show_every_image(run):
    _, acc = run
    event = acc.Tensors("rollouts/sample_0/text_summary")[-1]
    markdown = tensor_util.make_ndarray(event.tensor_proto).item().decode()
    html = markdown_to_safe_html(markdown)  # what the Text tab renders
    blocks = re.findall(r"<pre><code[^>]*>(.*?)</code></pre>", html, re.S)
    assert len(blocks) == 2, html  # the prompt and the response, each one code block, nothing leaking out
    assert "&lt;think&gt;" in blocks[0] or "think" not in markdown  # the chat template stays inside the block
    assert "accuracy" in markdown and "format" in markdown and "step 4" in markdown
    assert all(len(line) <= 100 for block in blocks for line in block.split("\n"))  # wrapped, never cut off
    image = acc.Tensors("rollouts/sample_0/images")[-1]
    width, height = (int(x) for x in tensor_util.make_ndarray(image.tensor_proto)[:2])
    assert width == 2 * height + GAP  # both square images of the two-image question, side by side


@pytest.mark.slow
def test_no_placeholder_or_duplicate_tags(run):
    _, acc = run
    scalars = tags(acc, "scalars")
    assert "hp_metric" not in scalars
    assert "train/accuracy" not in scalars and "train/reward/accuracy" in scalars
    assert "train/entropy" not in scalars and "train/rollout_entropy" in scalars
    assert not [t for t in tags(acc, "images") if not t.startswith("rollouts/sample_")]


@pytest.mark.slow
def test_the_tensorboard_server_serves_the_descriptions(run):
    """TensorBoard itself (its default fast loader) sends a description for every entropy/* tag to the browser."""
    trainer, _ = run
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", trainer.log_dir, "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/data/plugin/timeseries/tags",
                                                 data=b"experimentIds=[]", method="POST")
                tags = json.load(urllib.request.urlopen(request, timeout=5))["scalars"]
                if any(t.startswith("entropy/") for info in tags["runTagInfo"].values() for t in info):
                    break
            except OSError:
                pass
            time.sleep(1)
        entropy = {t for info in tags["runTagInfo"].values() for t in info if t.startswith("entropy/")}
        assert entropy, tags
        described = tags["tagDescriptions"]
        assert all(described.get(t) for t in entropy), (entropy, described)
        assert "nats" in described["entropy/all_tokens"]
    finally:
        server.terminate()
        server.wait(timeout=30)
