"""First-day mistakes: each runs the real `python -m app fit`, and the last lines of stderr must name the cause.

One table row per mistake: the command (the README's tiny GRPO command plus the mistake, in a folder laid out like
a clone), and words that the last 5 lines of stderr must contain. Every row must also exit non-zero, print no
traceback and no jsonargparse `Namespace(...)` dump, and stay under 15 lines of output (stdout + stderr). The rows
run in two interpreters side by side (tests/integration/mistakes_driver.py runs `app/__main__.py` as `python -m app`
does, row after row), since each python start costs seconds on this machine. A last row fails during training (a NaN
verifier that stays down): its traceback is kept, and the block at the end names the step and the batch's prompt
ids. The same mistake with `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from app.make_data import write_dataset

ROOT = Path(__file__).resolve().parents[2]
BASE = ["fit", "--config", "configs/tiny/grpo.yaml"]
SMALL = ["--trainer.max_steps", "1", "--model.init_args.group_size", "2", "--data.batch_size", "2",
         "--model.init_args.rollout.init_args.max_new_tokens", "4", "--trainer.enable_progress_bar", "false"]

# id, arguments after `python -m app`, words the last 5 lines of stderr name, modules whose import fails
MISTAKES: list[tuple[str, list[str], list[str], list[str]]] = [
    ("model-path-missing", [*BASE, "--model.init_args.model_path", "/nonexistent/model"],
     ["model_path", "/nonexistent/model", "no such folder", "make_tiny"], []),
    ("grpo-group-size-1", [*BASE, "--model.init_args.group_size", "1"], ["group_size", "at least 2"], []),
    ("typo-model-key", [*BASE, "--model.init_args.group_sise", "4"], ["group_sise", "did you mean `group_size`"], []),
    ("typo-nested-key", [*BASE, "--model.init_args.rollout.init_args.max_new_token", "8"],
     ["max_new_token", "did you mean `max_new_tokens`?"], []),
    ("typo-trainer-key", [*BASE, "--trainer.max_stesp", "4"], ["trainer.max_stesp", "`trainer.max_steps`"], []),
    ("typo-data-key", [*BASE, "--data.batch_sise", "4"], ["data.batch_sise", "`data.batch_size`"], []),
    ("typo-top-level-key", [*BASE, "--seed_everthing", "3"], ["seed_everthing", "`seed_everything`"], []),
    ("typo-key-in-yaml", [*BASE, "--config", "typo_trainer.yaml"], ["trainer.max_stesp", "`trainer.max_steps`"], []),
    ("typo-model-key-in-yaml", [*BASE, "--config", "typo_model.yaml"],
     ["group_sise", "did you mean `group_size`"], []),
    ("wrong-type-int", [*BASE, "--trainer.max_steps", "ten"], ["trainer.max_steps", "expected int", "ten"], []),
    ("wrong-type-float", [*BASE, "--model.init_args.lr", "fast"], ["lr", "expected float", "fast"], []),
    ("unknown-class", [*BASE, "--model.init_args.rollout", "modules.rollout.HFRolloutEngin"],
     ["HFRolloutEngin", "modules.rollout.HFRolloutEngine"], []),
    ("config-file-missing", ["fit", "--config", "configs/tiny/grpoo.yaml"], ["config file not found", "grpoo.yaml"],
     []),
    ("bad-yaml", [*BASE, "--config", "broken.yaml"], ["broken.yaml"], []),
    ("data-files-missing", [*BASE, "--data.train_files", "nowhere/train-*.parquet"],
     ["data.train_files", "nowhere/train-*.parquet", "make_data"], []),
    ("data-mode-typo", [*BASE, "--data.mode", "grpo"], ["data.mode", "'rl' or 'sft'"], []),
    ("curriculum-on-sft", ["fit", "--config", "configs/tiny/sft.yaml", "--config",
                           "configs/curriculum/pass_rate.yaml"], ["curriculum", "SFT", "configs/tiny/grpo.yaml"], []),
    ("resume-with-nothing", [*BASE, "--ckpt_path", "last"],
     ["no checkpoint to resume from", "runs/tiny/grpo/*/checkpoints", "leave out --ckpt_path"], []),
    ("vllm-not-installed", [*BASE, "--model.init_args.rollout", "modules.vllm_engine.VLLMRolloutEngine"],
     ["VLLMRolloutEngine", "vLLM", "HFRolloutEngine"], ["vllm"]),
    ("fsdp2-sizes-do-not-shard", [*BASE, "--config", "fsdp2.yaml"], ["data_parallel_size", "shards nothing"], []),
    ("data-in-another-schema", [*BASE, "--data.train_files", "other_schema.parquet", *SMALL],
     ["other_schema.parquet"], []),
]
if not torch.cuda.is_available():
    MISTAKES.append(("gpu-config-on-cpu", ["fit", "--config", "configs/r1v3/grpo.yaml"],
                     ["accelerator", "no CUDA GPU", "configs/tiny"], []))
DURING_TRAINING = ("verifier-down-during-training",
                   [*BASE, *SMALL, "--model.init_args.rewards+=tests.integration.fault_helpers.VerifierDownReward",
                    "--model.init_args.reward_weights", "[0.8, 0.2, 1.0]"], [], [])
DEBUG = ("typo-with-debug", [*BASE, "--model.init_args.group_sise", "4", "--debug"], [], [])


@pytest.fixture(scope="module")
def results(tiny_model_dir, tmp_path_factory) -> dict[str, dict]:
    """Every row run once, in one `python` process, in a folder laid out like a clone."""
    work = tmp_path_factory.mktemp("mistakes")
    data = work / "artifacts" / "data"
    write_dataset(data, n_train=16, n_val=8, quiet=True)
    (work / "configs").symlink_to(ROOT / "configs")
    (work / "artifacts" / "tiny-vlm").symlink_to(tiny_model_dir("internvl"))
    (work / "typo_trainer.yaml").write_text("trainer:\n  max_stesp: 3\n")
    (work / "typo_model.yaml").write_text("model:\n  init_args:\n    group_sise: 3\n")
    (work / "broken.yaml").write_text("trainer:\n  max_steps: [3\n")
    (work / "fsdp2.yaml").write_text("trainer:\n  devices: 2\n  strategy:\n    class_path: "
                                     "lightning.pytorch.strategies.ModelParallelStrategy\n")  # default sizes
    # a data file from another pipeline: prompt/response columns, no question/answer
    pd.DataFrame({"prompt": [f"q{i}" for i in range(20)], "response": ["a"] * 20}).to_parquet(
        work / "other_schema.parquet")
    rows = [{"id": i, "args": a, "block": b} for i, a, _, b in [*MISTAKES, DURING_TRAINING, DEBUG]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("R1V_DEBUG", None)
    procs = []
    for part in (0, 1):  # two interpreters side by side (2 cores)
        (work / f"rows{part}.json").write_text(json.dumps(rows[part::2]))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests/integration/mistakes_driver.py"),
                                       f"rows{part}.json", f"out{part}.json"], cwd=work, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results: dict[str, dict] = {}
    for part, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        results.update(json.loads((work / f"out{part}.json").read_text()))
    return results


@pytest.mark.parametrize("row", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_ends_with_one_short_block_naming_the_cause(results, row):
    name, _, words, _ = row
    res = results[name]
    err_lines = res["stderr"].rstrip().splitlines()
    everything = res["stdout"] + res["stderr"]
    shown = f"exit {res['code']}; stderr:\n{res['stderr'][-3000:]}"
    assert res["code"] not in (0, None), shown
    assert "Traceback" not in everything and "Namespace(" not in everything and "usage:" not in everything, shown
    tail = "\n".join(err_lines[-5:])
    assert err_lines and err_lines[0 if len(err_lines) < 5 else -5:] and "error:" in tail, shown
    for word in words:
        assert word in tail, f"{word!r} not in the last 5 lines of stderr:\n{tail}"
    assert len(everything.rstrip().splitlines()) <= 15, f"{len(everything.splitlines())} lines:\n{everything}"


def test_error_during_training_keeps_its_context_and_ends_with_the_block(results):
    res = results[DURING_TRAINING[0]]
    err_lines = res["stderr"].rstrip().splitlines()
    tail = "\n".join(err_lines[-5:])
    assert res["code"] == 1, res["stderr"][-3000:]
    assert "Traceback" in res["stderr"]  # the context is kept...
    assert "error:" in tail and "did not answer" in tail and "after step 0, batch ids ['" in tail, tail  # ...ends
    assert "--ckpt_path last" in tail, tail


def test_debug_flag_shows_the_traceback(results):
    res = results[DEBUG[0]]
    assert res["code"] == 1 and "Traceback" in res["stderr"] and "group_sise" in res["stderr"], res["stderr"]
