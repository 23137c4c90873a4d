"""GRPO through `python -m app fit` with the real vLLM engine on CPU (tier `vllm`), then a resumed run.

The run selects the engine on the command line (`--model.init_args.rollout.class_path
modules.vllm_engine.VLLMRolloutEngine`), samples G=4 responses for each of 2 prompts with images, for 3 steps,
logging `rollout/logprob_diff` (mean |trainer - sampler| log-prob on response tokens) and `rollout/tis_weight`
(mean truncated importance weight) every step. Both run in fp32, so the engine is in sync when the gap is below
1e-3 and the weights are ~1. The resumed run (step 4) must sample from the resumed weights: its gap stays below
1e-3, while the resumed weights' log-probs differ from model_path's by far more than that.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.vllm_support import SKIP_REASON, SYNC_TOLERANCE, image_batch, mean_gap

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason=SKIP_REASON)

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900
VLLM_ARGS = ["--model.init_args.rollout.class_path", "modules.vllm_engine.VLLMRolloutEngine",
             "--model.init_args.rollout.init_args.dtype", "float32",
             "--model.init_args.rollout.init_args.kv_cache_gb", "0.25",
             "--model.init_args.rollout.init_args.max_model_len", "512",
             "--model.init_args.rollout.init_args.max_new_tokens", "16",
             "--model.init_args.rollout.init_args.engine_kwargs", "{enforce_eager: true}"]


def _overlay(run: Path, model: Path, data: Path, max_steps: int) -> Path:
    text = f"""
    seed_everything: 0
    trainer:
      max_steps: {max_steps}
      limit_val_batches: 0
      enable_progress_bar: false
      default_root_dir: {run}
      logger:
        class_path: lightning.pytorch.loggers.CSVLogger
        init_args: {{save_dir: {run}, name: logs}}
      callbacks:
        - class_path: lightning.pytorch.callbacks.ModelCheckpoint
          init_args: {{dirpath: {run / "ckpt"}, save_last: true, every_n_train_steps: 1, save_top_k: 0}}
    model:
      init_args:
        model_path: {model}
        group_size: 4
        rewards:
          - class_path: modules.rewards.FormatReward
          - class_path: tests.integration.fault_helpers.OddLengthReward
        reward_weights: [0.2, 1.0]
        entropy_coef: 0.01
        lr: 1.0e-3
    data:
      train_files: {data}/train-*.parquet
      val_files: {data}/validation-*.parquet
      batch_size: 2
      train_limit: 8
      val_limit: 2
    """
    path = run / f"overlay-{max_steps}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _fit(run: Path, model: Path, data: Path, max_steps: int, *extra: str) -> None:
    run.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "app", "fit", "--config", str(ROOT / "configs/tiny/grpo.yaml"),
           "--config", str(_overlay(run, model, data, max_steps)), *VLLM_ARGS, *extra]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = run / f"log-{max_steps}.txt"
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT_S)
    assert proc.returncode == 0, log.read_text(errors="replace")[-6000:]


def _metrics(run: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for path in sorted(run.glob("logs/version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                rows.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v})
    return rows


def test_fit_with_vllm_then_resume_samples_from_resumed_weights(tmp_path, tiny_model_dir):
    from app.make_data import write_dataset

    model, data = tiny_model_dir("internvl"), tmp_path / "data"
    write_dataset(data, n_train=8, n_val=2, quiet=True)
    run = tmp_path / "run"
    _fit(run, model, data, 3)
    steps = _metrics(run)
    logged = {s: m for s, m in steps.items() if "rollout/logprob_diff" in m}
    assert len(logged) == 3, f"rollout/logprob_diff logged at steps {sorted(logged)}"
    for s, m in logged.items():
        print(f"\nstep {s}: rollout/logprob_diff {m['rollout/logprob_diff']:.2e}, "
              f"rollout/tis_weight {m['rollout/tis_weight']:.6f}, reward {m['train/reward']:.3f}")
        assert m["rollout/logprob_diff"] < SYNC_TOLERANCE
        # weights = exp(gap) clipped at 2 on each token: within the mean |gap| of 1 (to first order)
        assert abs(m["rollout/tis_weight"] - 1.0) <= 2 * m["rollout/logprob_diff"] + 1e-6
        assert m["train/response_length"] > 0

    _fit(run, model, data, 4, "--ckpt_path", str(run / "ckpt" / "last.ckpt"))
    resumed = _metrics(run)
    step4 = [m for s, m in resumed.items() if s >= 3 and "rollout/logprob_diff" in m and s not in logged]
    assert step4, "the resumed run logged no rollout/logprob_diff"
    assert step4[-1]["rollout/logprob_diff"] < SYNC_TOLERANCE

    # the resumed weights are far from model_path's: sampling from model_path would have shown a large gap
    from modules.common import policy_state
    from modules.loading import load_vlm
    from modules.rollout import HFRolloutEngine

    base, processor = load_vlm(model)
    trained, _ = load_vlm(model)
    trained.load_state_dict(policy_state(torch.load(run / "ckpt" / "last.ckpt", map_location="cpu",
                                                     weights_only=True)))
    engine = HFRolloutEngine(max_new_tokens=8)
    engine.setup(trained, processor, torch.device("cpu"), seed=0)
    batch = image_batch(processor, 2)
    rollouts = engine.generate(trained, batch, 2)
    from tests.vllm_support import trainer_logprobs

    moved = mean_gap(trainer_logprobs(trained, batch, rollouts), trainer_logprobs(base, batch, rollouts),
                     rollouts.response_mask)
    print(f"resumed weights vs model_path: mean |log-prob gap| {moved:.2e} on the same tokens")
    assert moved > 10 * SYNC_TOLERANCE, f"training barely moved the weights ({moved:.2e}): the test cannot tell"
