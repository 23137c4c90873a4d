"""Fault tolerance: atomic checkpoints, a checkpoint on SIGTERM, and a per-step run journal.

* `AtomicCheckpointIO` (the CLI's default checkpoint plugin): every checkpoint is written to a temporary file in
  the target's folder, flushed and fsynced, then renamed over the target with `os.replace`. A kill at any moment
  leaves either the previous file or the new one, never a torn one; leftover temporaries (`.NAME.*.tmp`) are
  never picked by `--ckpt_path last` and are removed by the next save of the same file. Loading always uses
  `torch.load(weights_only=True)`: a checkpoint cannot run code.
* `SafeModelCheckpoint`: `ModelCheckpoint` whose `save_last: link` replaces the `last.ckpt` symlink atomically
  (Lightning deletes it first, so a kill in between would leave no `last`).
* `PreemptionCheckpoint` (added by the CLI by default): on SIGTERM (what schedulers send before pre-emption)
  the current training step finishes, `last.ckpt` is saved atomically, and the process exits with status 0.
  Lightning 2.6 alone stops after the step (its `SIGTERMException` is a `SystemExit` with status 0) but saves
  nothing; this callback takes over the signal during training, saves, then raises that same exception.
* `ContinueCurves` (added by the CLI): a resumed run that writes into the interrupted run's TensorBoard folder
  (app/resume.py pins the version) first marks a restart at the checkpoint's step, so TensorBoard drops what the
  interrupted run logged after its checkpoint and the resumed run's values take their place: one curve.
* `RunJournal`: appends one JSON line per training step ({step, ids, rewards, losses, mean_reward}) to a file,
  so two runs (say, an interrupted one and an uninterrupted one) can be compared step by step.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- atomic writes
def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _tmp_pattern(path: Path) -> str:
    return str(path.parent / f".{glob.escape(path.name)}.*.tmp")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Call `write(file)` on a temporary file next to `path`, fsync it, then rename it over `path`."""
    target = Path(str(path).removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(_tmp_pattern(target)):  # left by a process killed mid-save
        try:
            os.unlink(stale)
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(target.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes through a temporary file and `os.replace`, and loads with weights_only.

    Lightning's own writer streams into the final path (or into the system temp folder and then moves it, which is
    a copy across file systems), so a kill during a save can leave a truncated `last.ckpt`. Remote paths
    (`s3://...`) fall back to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location: Any | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            rank_zero_warn("AtomicCheckpointIO: weights_only=False was asked for; loading with weights_only=True "
                           "anyway (checkpoints of this app hold only tensors and plain Python values)")
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class SafeModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose `save_last="link"` swaps the `last` symlink atomically (link to a temp name, then
    `os.replace`); Lightning's removes the old link first. Saves themselves go through the trainer's CheckpointIO
    (`AtomicCheckpointIO` under this app's CLI)."""

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if not (_is_local(linkpath) and os.path.isfile(filepath)) or os.path.isdir(linkpath):
            return ModelCheckpoint._link_checkpoint(trainer, filepath, linkpath)
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            folder = os.path.dirname(linkpath) or "."
            tmp = os.path.join(folder, f".{os.path.basename(linkpath)}.{os.getpid()}.link.tmp")
            if os.path.lexists(tmp):
                os.remove(tmp)
            try:
                os.symlink(os.path.relpath(filepath, folder), tmp)
            except OSError:  # no symlinks (Windows without privileges): an atomic copy
                with open(filepath, "rb") as src:
                    atomic_write(linkpath, lambda f: f.write(src.read()))
            else:
                os.replace(tmp, linkpath)
        trainer.strategy.barrier()


# ----------------------------------------------------------------------------------------------------- SIGTERM
class PreemptionCheckpoint(L.Callback):
    """On SIGTERM, finish the current training step, save `last.ckpt` atomically, and exit with status 0.

    Lightning 2.6 already catches SIGTERM: it sets `trainer.received_sigterm` and stops after the step by raising
    `SIGTERMException` (a `SystemExit` with status 0), but saves nothing, and the flag can be set after the last
    hook that could have saved. So from `on_train_start` this callback installs its own SIGTERM handler, which
    only sets a flag; the flag is checked once per step, at `on_train_batch_end` (under DDP it is OR-reduced over
    ranks, so every rank stops at the same step), and, when validation runs inside training, at
    `on_validation_end` (a signal during validation lets it finish). When set: save `<dirpath>/last.ckpt` through
    the trainer's CheckpointIO (atomic under this app's CLI); then, once Lightning has logged that step's metrics,
    flush the loggers and raise `SIGTERMException` (at the next `on_train_batch_start`, or `on_validation_start`:
    a validation due after the saved step is skipped, not started). So the TensorBoard curve holds the saved step
    and the resumed run continues it. If the saved step was the last one, fit simply ends. Resume with
    `--ckpt_path last`. Before training starts (set-up, sanity check) Lightning's own handler applies: it exits
    without a checkpoint, as nothing has been trained yet.

    Args:
        dirpath: where to write `last.ckpt`; default the first `ModelCheckpoint`'s folder (its `last` file),
            else `<default_root_dir>/checkpoints`.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__()
        self.dirpath = dirpath
        self.saved_path: str | None = None
        self.signalled = False
        self._exit_pending = False
        self._previous_handler: Any = None
        self._installed = False

    # -- the signal --------------------------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self.signalled:
            log.warning("SIGTERM received: saving a checkpoint at the end of the current step, then exiting")
        self.signalled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signalled = self._exit_pending = False
        if os.name == "nt" or threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)
            self._installed = False

    # -- the save ----------------------------------------------------------------------------------------------
    def checkpoint_path(self, trainer: L.Trainer) -> str:
        """`<dirpath>/last.ckpt`; the ModelCheckpoint's own `last` file when there is one (so `last` stays one
        file)."""
        name = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
        if self.dirpath is not None:
            return os.path.join(self.dirpath, name)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                if cb.last_model_path and _is_local(cb.last_model_path):
                    return cb.last_model_path
                return os.path.join(cb.dirpath, name)
        return os.path.join(trainer.default_root_dir, "checkpoints", name)

    def _save_if_signalled(self, trainer: L.Trainer, where: str) -> None:
        if self._exit_pending or not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        path = self.checkpoint_path(trainer)
        if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            rank_zero_warn("PreemptionCheckpoint: the trainer's CheckpointIO is not AtomicCheckpointIO; a kill "
                           "during this save could leave a broken checkpoint")
        for cb in trainer.checkpoint_callbacks:  # the resumed ModelCheckpoint then keeps writing this same `last`
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath and \
                    os.path.abspath(os.path.dirname(path)) == os.path.abspath(cb.dirpath):
                cb.last_model_path = path
        trainer.save_checkpoint(path)
        self.saved_path = path
        self._exit_pending = True
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step} ({where}); exiting (status 0). "
                       "Resume with `--ckpt_path last`.")

    def _exit_if_saved(self, trainer: L.Trainer) -> None:
        if self._exit_pending:
            for logger in trainer.loggers:  # the saved step's metrics, logged after on_train_batch_end
                logger.save()
            raise SIGTERMException()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._save_if_signalled(trainer, "end of the training step")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._save_if_signalled(trainer, "after validation")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._exit_if_saved(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._exit_if_saved(trainer)


# ------------------------------------------------------------------------------------------ TensorBoard curves
class ContinueCurves(L.Callback):
    """When training resumes from a checkpoint, write TensorBoard's restart marker (a `SessionLog.START` event at
    the first step the resumed run logs, what `SummaryWriter(purge_step=...)` writes) into each TensorBoard
    logger's event file.

    TensorBoard then discards the events at or after that step that were written before the marker: the steps an
    interrupted run logged after its last checkpoint, which the resumed run logs again. The loggers are also
    flushed at the start of every training step, so a SIGKILL loses no step before the last checkpoint (its
    metrics are logged after the checkpoint is saved, and a resumed run does not log them again).
    """

    def __init__(self) -> None:
        super().__init__()
        self._marked = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._marked = trainer.ckpt_path is None  # nothing to mark on a fresh start

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        for logger in trainer.loggers:
            logger.save()
        if self._marked:
            return
        self._marked = True
        if not trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import TensorBoardLogger
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        # the first step this run logs: scalars go to `global_step` after the optimiser step
        # (modules.common.log_global_step), so the checkpoint's own step N stays and N + 1 on is replaced
        step = trainer.global_step + 1
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment._get_file_writer()
                writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
                writer.flush()


# ----------------------------------------------------------------------------------------------- run journal
class RunJournal(L.Callback):
    """Append one JSON line per training step: {"step", "ids", "rewards", "losses", "mean_reward"}.

    Reads `pl_module.last_group_stats` (set by GRPOModule after each step). A line {"event": "start", "step": N,
    "resumed": bool} marks each (re)start, so a resumed run's journal shows where it picked up. Lines are
    flushed as they are written: a killed run keeps every line of the steps it finished. Rank 0 writes `path`;
    other ranks write `path` with `.rank<R>` appended.

    Args:
        path: the JSON Lines file (appended to; created with its folder when missing).
        texts: also record the sampled responses (`pl_module.last_rollouts.texts`).
    """

    def __init__(self, path: str, texts: bool = False) -> None:
        super().__init__()
        self.path = path
        self.texts = texts
        self._last: object | None = None

    def _file(self, trainer: L.Trainer) -> Path:
        p = Path(self.path) if trainer.global_rank == 0 else Path(f"{self.path}.rank{trainer.global_rank}")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _append(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        with self._file(trainer).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._append(trainer, {"event": "start", "step": trainer.global_step, "resumed": trainer.ckpt_path is not None})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stats = getattr(pl_module, "last_group_stats", None)
        if not stats or "ids" not in stats or stats is self._last:
            return
        self._last = stats
        record = {
            "step": trainer.global_step,
            "ids": [str(i) for i in stats["ids"]],
            "rewards": stats.get("rewards"),
            "losses": stats.get("losses"),
            "mean_reward": stats.get("mean_reward"),
        }
        rollouts = getattr(pl_module, "last_rollouts", None)
        if self.texts and rollouts is not None:
            record["texts"] = list(rollouts.texts)
        self._append(trainer, record)


def read_journal(path: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """Step -> the last record written for that step (a resumed run may repeat steps after its checkpoint)."""
    out: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "ids" in rec:
            out[int(rec["step"])] = rec
    return out


__all__ = ["AtomicCheckpointIO", "ContinueCurves", "PreemptionCheckpoint", "RunJournal", "SafeModelCheckpoint", "atomic_write",
           "read_journal"]
