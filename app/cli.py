"""The command line: `python -m app fit|validate|test|predict --config FILE [--config OVERLAY] [--key value]`.

A small LightningCLI: the `__init__` signatures of the modules, the DataModule and the callbacks are the config
schema, so `--help` and `--print_config` document every option.

Errors a person reads (app/errors.py): a mistake in the command line, the config or the files it names (parse
errors, `__init__` validation, pre-flight checks of app/checks.py, anything that fails before the first training
step) prints one short block, cause first, remedy last, and exits with status 2; an error during training prints
its traceback, then the same block with the step and the batch's prompt ids, and exits with status 1. `--debug`
(or `R1V_DEBUG=1`) re-raises with the full traceback instead.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, NoReturn

from lightning import LightningModule
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from app.checks import check_config_files, preflight
from app.errors import DEBUG_HINT, UserError, explain_message, format_block
from app.resume import pin_versions, resolve_last
from datamodules.vlm_datamodule import VLMDataModule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _options(parser: Any) -> list[str]:
    """Every `--key` a parser and its subcommand parsers accept (for "did you mean")."""
    out = list(getattr(parser, "_option_string_actions", {}))
    for action in getattr(parser, "_actions", []):
        if isinstance(getattr(action, "choices", None), dict):
            for sub in action.choices.values():
                out += _options(sub)
    return out


class R1VArgumentParser(LightningArgumentParser):
    """A parse error becomes a `UserError` (printed as one short block by `cli_main`), not a `usage:` screen.
    Only the CLI's main parser does so (`top`); the parsers jsonargparse makes inside keep their behaviour."""

    top = False

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.top:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise explain_message(message, _options(parser)) from ex


class TrainingError(UserError):
    """An error after training started: the block carries the step and the batch ids."""


def _project_frame(err: BaseException) -> str | None:
    """`path:line (function)` of the innermost frame in this project's code, for where a start-up error rose."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith(ROOT)
              and "site-packages" not in f.filename]
    return f"{os.path.relpath(frames[-1].filename, ROOT)}:{frames[-1].lineno} ({frames[-1].name})" if frames else None


class R1VCLI(LightningCLI):
    """LightningCLI with the model path shared with the DataModule, a rich progress bar by default, and
    `--ckpt_path last` that finds the run's newest checkpoint across logger versions (app/resume.py)."""

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
                     ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        self.parser.top = True
        for action in self.parser._actions:  # the subcommand parsers (fit, validate, ...)
            for sub in (action.choices.values() if isinstance(getattr(action, "choices", None), dict) else []):
                sub.top = True

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
        if self.subcommand:
            preflight(config, self.subcommand)

    def instantiate_classes(self) -> None:
        """`__init__` validation errors (jsonargparse wraps them in its Union report) become a `UserError`."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, OSError, ImportError, KeyError) as err:
            raise explain_message(str(err)) from err
        except Exception as err:  # Lightning's MisconfigurationException and the like, from the Trainer's __init__
            raise UserError(f"{type(err).__name__}: {err}", _project_frame(err)) from err

    def _run_subcommand(self, subcommand: str) -> None:
        """Before the first training batch an error is a start-up error (one block); after it, the traceback is
        kept and the block says at which step and on which prompts it happened."""
        try:
            super()._run_subcommand(subcommand)
        except Exception as err:
            from callbacks.error_context import ErrorContext

            context = next((c for c in self.trainer.callbacks if isinstance(c, ErrorContext)), None)
            where = context.describe(self.trainer) if context else None
            what = f"{type(err).__name__}: {err}" if not isinstance(err, UserError) else err.what
            if where is None:
                raise UserError(what.strip().splitlines()[0] if len(what) > 300 else what,
                                getattr(err, "where", None) or _project_frame(err),
                                getattr(err, "fix", None)) from err
            traceback.print_exc()
            raise TrainingError(what.strip().splitlines()[-1], where,
                                "fix the cause, then rerun the same command (with --ckpt_path last to continue "
                                "from the last checkpoint)") from err

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]):
        """A rich progress bar by default, unless the config turns bars off or brings its own; atomic checkpoint
        writes and a checkpoint on SIGTERM by default (callbacks/fault_tolerance.py, docs/resume.md)."""
        from callbacks.error_context import ErrorContext
        from callbacks.fault_tolerance import AtomicCheckpointIO, ContinueCurves, PreemptionCheckpoint

        own = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in own):
            callbacks = [*callbacks, RichProgressBar(leave=True)]
        if not any(isinstance(c, PreemptionCheckpoint) for c in own):
            callbacks = [*callbacks, PreemptionCheckpoint()]
        if not any(isinstance(c, ContinueCurves) for c in own):
            callbacks = [*callbacks, ContinueCurves()]
        callbacks = [*callbacks, ErrorContext()]
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)


def cli_main(args: list[str] | None = None, run: bool = True) -> R1VCLI:
    """Entry point; `args` and `run=False` let tests and notebooks drive it. A `UserError` (a mistake in the
    command, the config or the files it names) is printed as one short block and exits with status 2 (1 for an
    error during training); `--debug` or `R1V_DEBUG=1` raises it with the full traceback instead."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("R1V_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        if args is None:
            sys.argv = [sys.argv[0], *argv]
    try:
        check_config_files(argv)
        return _make_cli(argv if args is not None else None, run)
    except UserError as err:
        if debug:
            raise
        sys.stdout.flush()
        hint = "" if isinstance(err, TrainingError) else f"\n  {DEBUG_HINT}"  # the traceback is already shown
        print(format_block(err.what, err.where, err.fix) + hint, file=sys.stderr)
        raise SystemExit(1 if isinstance(err, TrainingError) else 2) from None


def _make_cli(args: list[str] | None, run: bool) -> R1VCLI:
    return R1VCLI(
        LightningModule,
        VLMDataModule,
        subclass_mode_model=True,
        subclass_mode_data=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        save_config_callback=SaveConfigCallback,
        parser_class=R1VArgumentParser,
        # Prompts are sharded by the DataModule (whole groups per rank); Lightning must not add its own sampler.
        trainer_defaults={"use_distributed_sampler": False},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )
