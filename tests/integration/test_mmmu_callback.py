"""MMMUEvalCallback end to end: a tiny InternVL, real Trainer runs (CLI `validate` with the shipped config,
and a 2-step GRPO fit), the official prediction layout, TensorBoard tags read back, the standalone scorer
agreeing with the logged figures, and a missing subject reported rather than fatal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lightning import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.cli import cli_main
from app.make_data import write_dataset
from callbacks.mmmu_callback import MMMUEvalCallback, metric_tag
from datamodules.vlm_datamodule import VLMDataModule
from modules.grpo_module import GRPOModule
from modules.rollout import HFRolloutEngine
from modules.tiny import make_tiny
from tests.mmmu_fixture import write_mmmu_fixture

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
EVAL_CONFIGS = sorted((ROOT / "configs" / "eval").glob("*.yaml"))
MISSING = "Music"
ENTRY_KEYS = {"id", "question_type", "answer", "all_choices", "index2ans", "response"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny model, synthetic data, and an MMMU fixture (1 question per subject) with one subject removed."""
    root = tmp_path_factory.mktemp("mmmu_cb")
    tiny = make_tiny(root / "tiny", "internvl")
    write_dataset(root / "data", n_train=16, n_val=8, quiet=True)
    summary = write_mmmu_fixture(root / "mmmu", per_subject=1)
    shutil.rmtree(root / "mmmu" / MISSING)
    expected = {i: v for i, v in summary.items.items() if v["subject"] != MISSING}
    return {"root": root, "tiny": Path(tiny), "data": root / "data", "mmmu": root / "mmmu", "expected": expected}


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files under ``log_dir``: tag -> [(step, value)]."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def score_cli(folder: Path, seed: int = 0) -> dict:
    """`python -m app.mmmu score FOLDER` in a subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "app.mmmu", "score", str(folder), "--seed", str(seed)],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def check_layout(folder: Path, expected: dict[str, dict]) -> None:
    """One output.json per subject present, each entry in the official layout with the fixture's gold."""
    subjects = {v["subject"] for v in expected.values()}
    assert {p.parent.name for p in folder.glob("*/output.json")} == subjects
    assert not (folder / MISSING).exists()
    for subject in subjects:
        entries = json.loads((folder / subject / "output.json").read_text())
        assert entries and all(ENTRY_KEYS <= set(e) for e in entries)
        for e in entries:
            want = expected[e["id"]]
            assert e["question_type"] == want["question_type"] and isinstance(e["response"], str)
            assert len(e["all_choices"]) == (want["n_options"] if want["question_type"] == "multiple-choice"
                                             else len(e["all_choices"]))
            assert sorted(e["index2ans"]) == e["all_choices"]


def test_validate_with_shipped_config(assets: dict[str, Path], tmp_path: Path) -> None:
    """`validate --config configs/eval/mmmu.yaml`: files, tags, scorer agreement, missing subject reported."""
    runs = tmp_path / "runs"
    args = ["validate", "--config", str(ROOT / "configs/eval/mmmu.yaml"),
            "--model.init_args.model_path", str(assets["tiny"]),
            "--trainer.callbacks.init_args.data_dir", str(assets["mmmu"]),
            "--trainer.callbacks.init_args.limit_per_subject", "1",
            "--trainer.callbacks.init_args.max_new_tokens", "8",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(runs), "--trainer.logger.init_args.save_dir", str(runs),
            "--data.val_files", str(assets["data"] / "validation-*.parquet"),
            "--data.train_files", str(assets["data"] / "validation-*.parquet")]
    with pytest.warns(UserWarning, match=MISSING):
        cli = cli_main(args=args)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, MMMUEvalCallback))
    assert MISSING in callback.load_report.missing_subjects
    folder = Path(cli.trainer.log_dir) / "mmmu" / "step_0"
    assert callback.last_dir == folder
    check_layout(folder, assets["expected"])
    scores = json.loads((folder / "scores.json").read_text())
    assert scores["overall"]["num"] == len(assets["expected"]) == 29
    assert MISSING in scores["data"]["missing_subjects"]
    tags = scalars(Path(cli.trainer.log_dir))
    for name in ("acc", "acc_strict", "unparsed_frac", "response_length", "truncated_frac"):
        assert f"mmmu/{name}" in tags
    assert any(t.startswith("mmmu/discipline/") for t in tags) and any(t.startswith("mmmu/subject/") for t in tags)
    assert f"mmmu/subject/{MISSING}" not in tags and "mmmu/discipline/Art_and_Design" in tags
    assert "val/accuracy" in tags  # the synthetic batch ran as well
    assert 0 < tags["mmmu/response_length"][0][1] <= 8
    rescored = score_cli(folder)
    assert rescored["overall"]["acc_strict"] == pytest.approx(tags["mmmu/acc_strict"][0][1], abs=1e-6)
    assert rescored["overall"]["acc"] == pytest.approx(tags["mmmu/acc"][0][1], abs=1e-6)
    assert rescored["overall"]["acc_strict"] == pytest.approx(scores["overall"]["acc_strict"])
    assert cli.trainer.callback_metrics["mmmu/acc"] == pytest.approx(scores["overall"]["acc"])


class Probe(Callback):
    """Records the policy's mode and the rollout sampler's state at the end of each training batch."""

    def __init__(self) -> None:
        self.training: list[bool] = []
        self.sampler: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.training.append(pl_module.policy.training)
        self.sampler.append(pl_module.rollout.state_dict()["generator"].tolist())


def test_fit_every_n_steps_with_samples(assets: dict[str, Path], tmp_path: Path) -> None:
    """2-step GRPO fit, evaluation after each step with 2 samples per question: step folders, per-step tags,
    sample entries averaged by the scorer as in the logged figure, train mode and training sampler restored."""
    subjects = ["Accounting", "Art", "Computer_Science"]
    callback = MMMUEvalCallback(str(assets["mmmu"]), every_n_steps=1, on_validation=False, subjects=subjects,
                                limit_per_subject=1, num_samples=2, max_new_tokens=8, batch_size=2,
                                out_dir=str(tmp_path / "mmmu"), seed=3)
    before, after = Probe(), Probe()  # callbacks run in list order: around the MMMU callback
    module = GRPOModule(model_path=str(assets["tiny"]), group_size=2,
                        rollout=HFRolloutEngine(max_new_tokens=8))
    data = VLMDataModule(train_files=str(assets["data"] / "train-*.parquet"), processor_path=str(assets["tiny"]),
                         batch_size=2, max_prompt_length=4096)
    logger = TensorBoardLogger(str(tmp_path / "tb"), name="fit")
    trainer = Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, logger=logger,
                      callbacks=[before, callback, after], enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    assert after.training == [True, True]
    assert after.sampler == before.sampler  # evaluation sampling left the training sampler's state alone
    tags = scalars(Path(logger.log_dir))
    assert [s for s, _ in tags["mmmu/acc"]] == [1, 2]
    assert "train/reward" in tags and "mmmu/subject/Computer_Science" in tags
    for step in (1, 2):
        folder = tmp_path / "mmmu" / f"step_{step}"
        entries = json.loads((folder / "Art" / "output.json").read_text())
        assert [e["sample"] for e in entries] == [0, 1] and len({e["id"] for e in entries}) == 1
        rescored = score_cli(folder, seed=3)
        for name in ("acc", "acc_strict", "unparsed_frac"):
            logged = dict(tags[f"mmmu/{name}"])[step]
            assert rescored["overall"][name] == pytest.approx(logged, abs=1e-6)
        assert rescored["overall"]["num_responses"] == 6


@pytest.mark.parametrize("config", EVAL_CONFIGS, ids=lambda p: p.name)
def test_eval_configs_parse(config: Path, assets: dict[str, Path]) -> None:
    """Every shipped eval YAML instantiates model, data and callbacks (LightningCLI with run=False)."""
    args = ["--config", str(config), "--model.init_args.model_path", str(assets["tiny"]),
            "--data.val_files", str(assets["data"] / "validation-*.parquet"), "--trainer.logger", "false"]
    if "callbacks.mmmu_callback" in config.read_text():
        args += ["--trainer.callbacks.init_args.data_dir", str(assets["mmmu"])]
    cli = cli_main(args=args, run=False)
    assert type(cli.model).__name__ == "GRPOModule"
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, MMMUEvalCallback)]
    if config.name == "mmmu.yaml":
        assert callbacks and callbacks[0].data_dir == str(assets["mmmu"]) and callbacks[0].max_new_tokens == 96


def test_bad_settings_and_empty_data(tmp_path: Path) -> None:
    """Invalid settings fail at construction; a folder with no MMMU data is an error naming what is missing."""
    with pytest.raises(ValueError, match="num_samples"):
        MMMUEvalCallback(str(tmp_path), num_samples=0)
    with pytest.raises(ValueError, match="extraction_mode"):
        MMMUEvalCallback(str(tmp_path), extraction_mode="guess")
    callback = MMMUEvalCallback(str(tmp_path), subjects=["Art"])
    with pytest.raises(ValueError, match="no usable"), pytest.warns(UserWarning, match="Art"):
        callback.setup(Trainer(logger=False), None, "validate")  # type: ignore[arg-type]
    assert metric_tag("Humanities & Social Science") == "Humanities_and_Social_Science"
