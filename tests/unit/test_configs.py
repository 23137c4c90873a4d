"""Every shipped YAML parses and instantiates model, data, trainer and callbacks (no fit is run).

Full configs are instantiated as they are; overlays (`curriculum/`, `scale/`) on top of the tiny GRPO config. Paths
to weights and data point at a tiny model and data set built here; GPU-only settings are switched to CPU. Deeper
checks of particular files live next to their features (test_scale_configs, test_curriculum, test_mmmu_callback).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning import Callback, LightningDataModule, LightningModule, Trainer

from app.cli import cli_main
from app.make_data import write_dataset

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
OVERLAY_DIRS = {"curriculum", "scale"}
GPU_ONLY = {"deepspeed.yaml"}  # Lightning refuses this strategy on CPU (see test_scale_configs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cfgdata")
    write_dataset(out, n_train=8, n_val=4, seed=0, quiet=True)
    return out


def _args(path: Path, model_dir: Path, data: Path) -> list[str]:
    files = [path] if path.parent.name not in OVERLAY_DIRS else [ROOT / "configs/tiny/grpo.yaml", path]
    args = [a for f in files for a in ("--config", str(f))]
    return args + [
        "--model.init_args.model_path", str(model_dir),
        "--data.train_files", str(data / "train-*.parquet"), "--data.val_files", str(data / "validation-*.parquet"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.precision", "32-true", "--trainer.logger", "false",
    ]


def test_every_config_directory_is_covered():
    assert {p.parent.name for p in CONFIGS} >= {"tiny", "r1v3", "curriculum", "eval", "scale"}


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name not in GPU_ONLY],
                         ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_instantiates(path, tiny_model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs write runs/... relative to the working folder
    args = _args(path, tiny_model_dir("internvl"), data_dir)
    if "mmmu" in path.name:
        args += ["--trainer.callbacks.init_args.data_dir", str(tmp_path)]
    cli = cli_main(args=args, run=False)
    assert isinstance(cli.model, LightningModule)
    assert isinstance(cli.datamodule, LightningDataModule)
    assert isinstance(cli.trainer, Trainer)
    assert all(isinstance(c, Callback) for c in cli.trainer.callbacks)
    assert cli.model.hparams.model_path == str(tiny_model_dir("internvl"))


def test_bench_lean_overlay_replaces_probes_and_keeps_a_curriculum_overlay(tiny_model_dir, data_dir, tmp_path,
                                                                         monkeypatch):
    """bench/grpo_lean.yaml (used by `make bench-curriculum`) drops validation and probes; a curriculum overlay
    given after it still appends its callback."""
    from callbacks.curriculum import CurriculumCallback
    from callbacks.export import ExportCallback

    monkeypatch.chdir(tmp_path)
    args = [a for f in ("configs/tiny/grpo.yaml", "bench/grpo_lean.yaml", "configs/curriculum/pass_rate.yaml")
            for a in ("--config", str(ROOT / f))]
    args += ["--model.init_args.model_path", str(tiny_model_dir("internvl")),
             "--data.train_files", str(data_dir / "train-*.parquet"), "--trainer.logger", "false"]
    cli = cli_main(args=args, run=False)
    kinds = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"ModelCheckpoint", ExportCallback.__name__, CurriculumCallback.__name__} <= kinds
    assert not kinds & {"CriticalEntropyCallback", "CheckpointSelectionCallback", "RolloutSamplesCallback"}
    assert cli.datamodule.hparams.val_files is None and cli.trainer.limit_val_batches == 0


@pytest.mark.parametrize("overlay", [None, *sorted((ROOT / "configs/curriculum").glob("*.yaml"))],
                         ids=lambda p: "base" if p is None else p.stem)
def test_tiny_grpo_trains_on_a_prompt_pool_that_curriculum_overlays_lift(overlay, tiny_model_dir, data_dir, tmp_path,
                                                                         monkeypatch):
    """configs/tiny/grpo.yaml revisits a fixed 64-prompt pool; a curriculum orders the whole split instead."""
    monkeypatch.chdir(tmp_path)
    files = ["configs/tiny/grpo.yaml"] + ([] if overlay is None else [str(overlay)])
    args = [a for f in files for a in ("--config", str(ROOT / f))]
    args += ["--model.init_args.model_path", str(tiny_model_dir("internvl")),
             "--data.train_files", str(data_dir / "train-*.parquet"), "--trainer.logger", "false"]
    cli = cli_main(args=args, run=False)
    assert cli.datamodule.hparams.train_limit == (64 if overlay is None else None)
