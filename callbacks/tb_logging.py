"""What the callbacks write to TensorBoard themselves: scalars with descriptions, at an explicit step.

Step convention, one for every tab and file: ``trainer.global_step`` read after the optimiser step, i.e. the number
of optimiser steps taken so far. Checkpoint names (``step=20``), ``selection.json``, histograms, rollout text and
images use it, and the modules put their ``self.log`` scalars on it too (``modules.common.log_global_step``), so a
moment of training has one step number in every tab.

A value written here is written once, at the step given. That is what a measurement taken now and then (the
critical-entropy probe) needs: a value ``self.log``-ged with ``on_step=True`` from a callback hook would stay in
Lightning's results and be written again at every later logging step of the epoch.

Descriptions travel in the summary metadata (``summary_description``; TensorBoard renders them as Markdown in the
scalar card's info). The values stay ``simple_value`` scalars, so both TensorBoard's own reader and the legacy
``EventAccumulator.Scalars`` read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.scalar import metadata as scalar_metadata
from torch.utils.tensorboard.summary import scalar

__all__ = ["described_scalar", "log_scalars", "tensorboard_writers"]


def tensorboard_writers(trainer: Trainer) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger, on global rank 0 only (empty elsewhere)."""
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def described_scalar(tag: str, value: float, description: str | None) -> Any:
    """A ``Summary`` proto with one scalar and, when given, its Markdown description.

    The metadata names the scalars plugin and the scalar data class: TensorBoard's fast (Rust) loader, its default,
    keeps the metadata of a ``simple_value`` only when it names its plugin, and drops the description otherwise.
    """
    summary = scalar(tag, float(value))
    if description:
        metadata = summary.value[0].metadata
        metadata.CopyFrom(scalar_metadata.create_summary_metadata(display_name=tag, description=description))
        metadata.data_class = summary_pb2.DATA_CLASS_SCALAR
    return summary


def log_scalars(trainer: Trainer, metrics: Mapping[str, float], step: int,
                descriptions: Mapping[str, str] | None = None) -> None:
    """Write ``metrics`` once at ``step`` to every logger: TensorBoard with descriptions, the others as they log.

    Args:
        trainer: the running trainer (its loggers; rank 0 writes).
        metrics: tag -> value.
        step: the x-axis value (see the module docstring for the convention).
        descriptions: tag -> Markdown description (units, meaning); tags without one are written without.
    """
    if not trainer.is_global_zero or not metrics:
        return
    descriptions = descriptions or {}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment._get_file_writer()  # the writer add_scalar itself uses
            for tag, value in metrics.items():
                writer.add_summary(described_scalar(tag, value, descriptions.get(tag)), step)
        else:
            logger.log_metrics(dict(metrics), step=step)
