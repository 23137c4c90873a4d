"""The model verifier and the MMMU judge inside real Lightning runs, each talking to a real server on localhost
(tests/verifier_server.py): a tiny GRPO fit logs the verifier's figures to TensorBoard, and `validate --config configs/eval/mmmu_judge.yaml` writes acc_judge and a
judge.json that `python -m app.mmmu score` replays to the same figure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lightning import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.cli import cli_main
from app.make_data import write_dataset
from datamodules.vlm_datamodule import VLMDataModule
from modules.grpo_module import GRPOModule
from modules.rewards import AccuracyReward, FormatReward, RuleOrVerifier, VerifierReward
from modules.rollout import HFRolloutEngine
from modules.tiny import make_tiny
from tests.mmmu_fixture import write_mmmu_fixture
from tests.verifier_server import running_server, stats

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
VERIFIER_TAGS = ["train/reward/rule_accuracy", "train/reward/verifier_rescued", "train/reward/verifier_errors",
                 "train/reward/verifier_calls", "time/verifier_s", "val/reward/verifier_rescued"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("verifier_fit")
    model = make_tiny(root / "model", "internvl", seed=1)
    write_dataset(root / "data", n_train=16, n_val=4, seed=1, quiet=True)
    write_mmmu_fixture(root / "mmmu", per_subject=1)
    for subject in [p.name for p in (root / "mmmu").iterdir() if p.name not in ("Art", "Math", "Physics")]:
        shutil.rmtree(root / "mmmu" / subject)
    return root, model


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def fit(assets, tmp_path, verifier: VerifierReward) -> Path:
    root, model_dir = assets
    module = GRPOModule(model_path=str(model_dir), group_size=2, rollout=HFRolloutEngine(max_new_tokens=8),
                        rewards=[RuleOrVerifier(verifier, AccuracyReward(use_math_verify=False)), FormatReward()],
                        reward_weights=[0.8, 0.2])
    data = VLMDataModule(str(root / "data" / "train-*.parquet"), str(root / "data" / "validation-*.parquet"),
                         processor_path=str(model_dir), batch_size=2, val_batch_size=2, max_prompt_length=4096)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = Trainer(accelerator="cpu", max_steps=2, val_check_interval=2, limit_val_batches=1, logger=logger,
                      num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, log_every_n_steps=1, use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)
    return Path(logger.log_dir)


def test_grpo_fit_logs_the_verifier_figures(assets, tmp_path):
    with running_server(tmp_path, [{"match": "", "reply": "yes"}]) as url:
        log_dir = fit(assets, tmp_path, VerifierReward(url, "verifier"))
        requests = stats(url)["requests"]
    tags = scalars(log_dir)
    for tag in VERIFIER_TAGS:
        assert tag in tags, f"{tag} missing; logged: {sorted(tags)}"
    calls = sum(v for _, v in tags["train/reward/verifier_calls"])
    assert calls <= requests  # every call the figures count reached the server (validation may add more)
    assert all(v == 0 for _, v in tags["train/reward/verifier_errors"])
    for (_, rule), (_, rescued), (_, acc) in zip(tags["train/reward/rule_accuracy"],
                                                 tags["train/reward/verifier_rescued"],
                                                 tags["train/reward/accuracy"], strict=True):
        assert acc == pytest.approx(rule + rescued)  # OR: the accuracy is the rule's plus the rescues


def test_validate_with_the_judge_config(assets, tmp_path):
    root, model_dir = assets
    runs = tmp_path / "runs"
    with running_server(tmp_path, [{"match": "", "reply": "A"}]) as url:
        args = ["validate", "--config", str(ROOT / "configs/eval/mmmu_judge.yaml"),
                "--model.init_args.model_path", str(model_dir),
                "--trainer.callbacks.init_args.data_dir", str(root / "mmmu"),
                "--trainer.callbacks.init_args.max_new_tokens", "8",
                "--trainer.callbacks.init_args.extraction_mode", "raw",  # random text: judge what the rules miss
                "--trainer.callbacks.init_args.judge.init_args.base_url", url,
                "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(runs), "--trainer.logger.init_args.save_dir", str(runs),
                "--data.val_files", str(root / "data" / "validation-*.parquet"),
                "--data.train_files", str(root / "data" / "validation-*.parquet")]
        cli = cli_main(args=args)
        requests = stats(url)["requests"]
    folder = Path(cli.trainer.log_dir) / "mmmu" / "step_0"
    scores = json.loads((folder / "scores.json").read_text())
    judged = json.loads((folder / "judge.json").read_text())
    tags = scalars(Path(cli.trainer.log_dir))
    for name in ("acc", "acc_strict", "acc_judge", "judged_frac", "judge_errors"):
        assert f"mmmu/{name}" in tags
    assert 0 < len(judged) == requests == scores["judge"]["asked"] and scores["judge"]["errors"] == 0
    assert all(j["letter"] == "A" for j in judged)
    overall = scores["overall"]
    assert overall["acc_strict"] <= overall["acc_judge"] and overall["judged_frac"] == pytest.approx(
        len(judged) / overall["num"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "app.mmmu", "score", str(folder), "--mode", "raw"], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=True, timeout=120)
    replay = json.loads(out.stdout)["overall"]
    assert replay["acc_judge"] == pytest.approx(tags["mmmu/acc_judge"][0][1], abs=1e-6)
    assert replay["acc_judge"] == pytest.approx(overall["acc_judge"])
