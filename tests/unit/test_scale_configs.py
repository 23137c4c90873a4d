"""Every YAML under configs/r1v3 and configs/scale parses with the app's CLI and holds the paper's values.

The r1v3 files are instantiated (model_path pointed at a tiny model, data at a tiny parquet, the GPU cluster
layout swapped for one CPU process); their FSDP2 strategy (configs/scale/fsdp2.yaml; it runs on 2 CPU processes in
tests/integration/test_sharded*.py), DeepSpeed and the overlays are parsed without instantiation. FSDP1 is not
used: Lightning refuses it without a GPU (checked below), so it could never run here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
R1V3 = sorted((ROOT / "configs" / "r1v3").glob("*.yaml"))
SCALE = sorted((ROOT / "configs" / "scale").glob("*.yaml"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from app.make_data import write_dataset
    from modules.tiny import make_tiny

    root = tmp_path_factory.mktemp("cfg")
    model = make_tiny(root / "tiny-vlm")
    write_dataset(root / "data", n_train=8, n_val=4, quiet=True)
    return {"model": str(model), "train": str(root / "data" / "train-*.parquet"),
            "val": str(root / "data" / "validation-*.parquet"), "runs": str(root / "runs")}


def overrides(a: dict, cpu: bool = True) -> list[str]:
    out = ["--model.init_args.model_path", a["model"], "--data.train_files", a["train"], "--data.val_files", a["val"],
           "--trainer.default_root_dir", a["runs"]]
    if cpu:
        out += ["--trainer.accelerator", "cpu", "--trainer.num_nodes", "1", "--trainer.devices", "1",
                "--trainer.strategy", "auto"]
    return out


def instantiate(path: Path, a: dict):
    from app.cli import cli_main

    return cli_main(args=["--config", str(path), *overrides(a)], run=False)


@pytest.fixture(scope="module")
def parser(assets):
    return instantiate(ROOT / "configs" / "r1v3" / "grpo.yaml", assets).parser


def test_all_files_present():
    assert {p.stem for p in R1V3} >= {"sft", "grpo", "connector"}
    assert {p.stem for p in SCALE} >= {"internvl3_1b", "internvl3_8b", "fsdp2", "deepspeed", "bf16", "adamw_8bit"}


def test_grpo_paper_values(assets):
    cli = instantiate(ROOT / "configs" / "r1v3" / "grpo.yaml", assets)
    h, m = cli.model.hparams, cli.model
    assert type(m).__name__ == "GRPOModule" and type(m.rollout).__name__ == "VLLMRolloutEngine"
    assert h.group_size == 32 and h.lr == pytest.approx(1e-5)
    assert h.trainable_parts == ["vision", "connector", "language_model", "lm_head"]
    assert h.ppo_epochs == 1 and h.mini_batch_prompts is None
    assert m.policy_loss.eps_low == 0.2 and m.policy_loss.eps_high == 0.2
    assert not m.kl.enabled
    assert m.rollout.max_new_tokens == 4096 and m.rollout.tis_cap == 2.0 and m.rollout.enable_prefix_caching
    assert cli.model.rewards.weights == [0.8, 0.2]
    assert cli.config.trainer.use_distributed_sampler is False
    assert cli.config.trainer.num_nodes == 1  # overridden; the file says 4 x 8 = 32 ranks x 1 prompt = 32 prompts
    assert cli.datamodule.hparams.batch_size == 1 and cli.datamodule.hparams.mode == "rl"
    assert cli.trainer.precision == "bf16-mixed"


def test_sft_and_connector_values(assets):
    sft = instantiate(ROOT / "configs" / "r1v3" / "sft.yaml", assets)
    assert type(sft.model).__name__ == "SFTModule"
    assert sft.model.hparams.lr == pytest.approx(1e-5) and sft.model.hparams.warmup_ratio == 0.03
    assert sft.model.hparams.lr_schedule == "cosine" and sft.datamodule.hparams.max_length == 16384
    conn = instantiate(ROOT / "configs" / "r1v3" / "connector.yaml", assets)
    h = conn.model.hparams
    assert h.trainable_parts == ["connector"] and h.lr == pytest.approx(1e-5) and h.warmup_ratio == 0.03
    assert conn.config.trainer.max_epochs == 2 and conn.datamodule.hparams.max_length == 16384
    assert conn.datamodule.hparams.mode == "sft"
    names = [type(c).__name__ for c in conn.trainer.callbacks]
    assert "EarlyStopping" in names and "MemoryPreflight" in names and "ExportCallback" in names
    early = next(c for c in conn.trainer.callbacks if type(c).__name__ == "EarlyStopping")
    assert early.monitor == "val/loss"
    # global batch 64 = 4 nodes x 8 GPUs x batch 1 x accumulate 2 (as written in the file)
    for cli in (sft, conn):
        assert cli.config.trainer.accumulate_grad_batches * 32 * cli.datamodule.hparams.batch_size == 64


@pytest.mark.parametrize("path", R1V3, ids=lambda p: p.stem)
def test_r1v3_shard_with_fsdp2(parser, assets, path):
    cfg = parser.parse_args(["--config", str(path), *overrides(assets, cpu=False)])
    assert cfg.trainer.strategy.class_path == "modules.sharding.FSDP2Strategy"  # = configs/scale/fsdp2.yaml
    assert cfg.model.init_args.gradient_checkpointing is True
    assert cfg.trainer.num_nodes * cfg.trainer.devices == 32


def test_fsdp2_strategy_takes_bf16_mixed_and_shards_over_every_rank():
    """The r1v3 files' strategy and precision build a Trainer (the 2-process runs are in tests/integration)."""
    from lightning import Trainer

    from modules.sharding import FSDP2Strategy

    trainer = Trainer(accelerator="cpu", devices=1, strategy=FSDP2Strategy(), precision="bf16-mixed", logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy) and trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("path", SCALE, ids=lambda p: p.stem)
def test_scale_overlays_parse(parser, assets, path):
    cfg = parser.parse_args(["--config", str(ROOT / "configs" / "r1v3" / "grpo.yaml"), "--config", str(path),
                             *overrides(assets, cpu=False)[:-2]])  # keep the overlay's own root dir
    name = path.stem
    if name == "fsdp2":
        assert cfg.trainer.strategy.class_path == "modules.sharding.FSDP2Strategy"
        assert cfg.trainer.strategy.init_args.tensor_parallel_size == 1
        assert cfg.model.init_args.sharding.class_path == "modules.sharding.FSDP2Sharding"
    elif name == "deepspeed":
        assert cfg.trainer.strategy.class_path.endswith("DeepSpeedStrategy")
        assert cfg.trainer.strategy.init_args.stage == 3
    elif name == "bf16":
        assert cfg.trainer.precision == "bf16-mixed" and cfg.model.init_args.dtype == "float32"
    elif name == "adamw_8bit":
        assert cfg.model.init_args.optimizer == "adamw_8bit"
    elif name.startswith("internvl3_"):
        assert cfg.model.init_args.model_path == assets["model"]  # the command line wins over the overlay
        raw = parser.parse_args(["--config", str(ROOT / "configs" / "r1v3" / "grpo.yaml"), "--config", str(path)])
        size = {"internvl3_1b": "1B", "internvl3_8b": "8B"}[name]
        assert raw.model.init_args.model_path == f"checkpoints/InternVL3-{size}-hf"


def test_adamw_8bit_overlay_on_tiny_cpu(assets):
    """The 8-bit overlay on the CPU tiny config builds a bitsandbytes optimiser."""
    from app.cli import cli_main

    cli = cli_main(args=["--config", str(ROOT / "configs" / "tiny" / "grpo.yaml"), "--config",
                         str(ROOT / "configs" / "scale" / "adamw_8bit.yaml"), *overrides(assets)], run=False)
    assert cli.model.hparams.optimizer == "adamw_8bit"


def test_lightning_refuses_fsdp_on_cpu():
    """Documented limitation: no FSDP run with 2 CPU processes; the multi-rank FSDP check needs GPUs."""
    from lightning import Trainer
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        Trainer(accelerator="cpu", devices=2, strategy=FSDPStrategy(), logger=False)



def test_grpo_follows_eq7_and_selects_by_critical_entropy(assets):
    """Issue 22 items 12-13: the paper's loss aggregation (eq. 7) and its checkpoint selection."""
    from callbacks.checkpoint_selection import CheckpointSelectionCallback
    from callbacks.critical_entropy import CriticalEntropyCallback
    from modules.losses import SeqMeanTokenMean

    cli = instantiate(ROOT / "configs" / "r1v3" / "grpo.yaml", assets)
    assert type(cli.model.aggregation) is SeqMeanTokenMean
    by_type = {type(c): c for c in cli.trainer.callbacks}
    probe, select = by_type.get(CriticalEntropyCallback), by_type.get(CheckpointSelectionCallback)
    assert probe is not None and select is not None
    assert probe.temperature == 1.0 and probe.on_validation  # probed at every validation, as selection needs
    assert select.entropy_key == "entropy/critical" and select.accuracy_key == "val/accuracy"
    # selection runs where validation does: every candidate needs both figures from the same step
    assert cli.config.trainer.val_check_interval % probe.every_n_steps == 0
