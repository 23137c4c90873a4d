"""The command line: `python -m app fit|validate|test|predict --config FILE [--config OVERLAY] [--key value]`.

A small LightningCLI: the `__init__` signatures of the modules, the DataModule and the callbacks are the config
schema, so `--help` and `--print_config` document every option.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning import LightningModule
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from app.errors import UserError
from app.resume import pin_versions, resolve_last
from datamodules.vlm_datamodule import VLMDataModule


class R1VCLI(LightningCLI):
    """LightningCLI with the model path shared with the DataModule, a rich progress bar by default, and
    `--ckpt_path last` that finds the run's newest checkpoint across logger versions (app/resume.py)."""

    def before_instantiate_classes(self) -> None:
        """The DataModule's processor comes from the model folder unless the config names another; `last` becomes
        the checkpoint it stands for, and a resumed fit continues the logger version that wrote it."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        model_path = config.get("model", {}).get("init_args", {}).get("model_path")
        data_args = config.get("data", {})
        if model_path and not data_args.get("processor_path"):
            data_args["processor_path"] = model_path
        if self.subcommand and config.get("ckpt_path") == "last":
            resume = resolve_last(config.trainer)
            config.ckpt_path = resume.ckpt_path
            if self.subcommand == "fit":
                pin_versions(config.trainer, resume.versions)
            where = "".join(f", logger version {v}" for v in resume.versions.values())
            rank_zero_info(f"--ckpt_path last: resuming from {resume.ckpt_path}{where}")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]):
        """A rich progress bar by default, unless the config turns bars off or brings its own; atomic checkpoint
        writes and a checkpoint on SIGTERM by default (callbacks/fault_tolerance.py, docs/resume.md)."""
        from callbacks.fault_tolerance import AtomicCheckpointIO, ContinueCurves, PreemptionCheckpoint

        own = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in own):
            callbacks = [*callbacks, RichProgressBar(leave=True)]
        if not any(isinstance(c, PreemptionCheckpoint) for c in own):
            callbacks = [*callbacks, PreemptionCheckpoint()]
        if not any(isinstance(c, ContinueCurves) for c in own):
            callbacks = [*callbacks, ContinueCurves()]
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)


def cli_main(args: list[str] | None = None, run: bool = True) -> R1VCLI:
    """Entry point; `args` and `run=False` let tests and notebooks drive it. A `UserError` (a mistake in the
    command, the config or the files it names) is printed as one short block and exits with status 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _make_cli(args, run)
    except UserError as err:
        if os.environ.get("R1V_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _make_cli(args: list[str] | None, run: bool) -> R1VCLI:
    return R1VCLI(
        LightningModule,
        VLMDataModule,
        subclass_mode_model=True,
        subclass_mode_data=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        save_config_callback=SaveConfigCallback,
        # Prompts are sharded by the DataModule (whole groups per rank); Lightning must not add its own sampler.
        trainer_defaults={"use_distributed_sampler": False},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )
