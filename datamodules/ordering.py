"""The ordering hook: which training prompts are served next, and in what order.

Two pieces live here:

* `OrderingStrategy` decides *which rows* come next (`next_batch`) and may learn from training results
  (`update`). `RandomOrder` is the baseline; the curriculum strategies live in `callbacks/curriculum.py`.
* `BatchServer` is a DataLoader `batch_sampler` that asks the strategy for batches and makes the whole thing
  exactly resumable, even though batches are drawn *before* they are consumed (DataLoader workers and
  Lightning may fetch ahead). It keeps a FIFO of drawn-but-not-consumed batches; the DataModule pops it with
  `mark_consumed` when a batch reaches the training step. A checkpoint stores the strategy state plus that
  FIFO, and after a restore the FIFO is replayed first, so an interrupted run serves exactly the prompts of an
  uninterrupted one.

Everything in a `state_dict` is plain Python or tensors, so it survives `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Sampler


def run_seed(seed: int | None) -> int:
    """`seed`, or when it is None the run's `seed_everything` value (Lightning exports it as PL_GLOBAL_SEED; 0 when
    no seed was set), so that changing `seed_everything` changes the served order and the sampled rollouts too."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed


@dataclass(slots=True)  # one per training row: slots keep the index small at millions of rows
class RowMeta:
    """What an ordering strategy may know about one training row: its id and optional difficulty level."""

    id: str
    difficulty: int | None = None


class OrderingStrategy:
    """Base class of the ordering seam: decides which rows are served next.

    Subclasses implement `next_batch`; adaptive ones also `update`. Strategies are built from config
    without data and receive the rows later through `setup`. Randomness must come from `self.generator`
    (seeded in `setup`, saved in `state_dict`) so that a restored strategy continues identically.
    """

    def __init__(self) -> None:
        self.rows: list[RowMeta] = []
        self.seed: int = 0
        self.generator = torch.Generator()
        self._index_of: dict[str, int] = {}

    def setup(self, rows: list[RowMeta], seed: int) -> None:
        """Bind the strategy to the rows it will serve (indices refer to this list) and reset its state."""
        if not rows:
            raise ValueError(f"{type(self).__name__}.setup got no rows to serve")
        self.rows = list(rows)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._index_of = {row.id: i for i, row in enumerate(self.rows)}
        if len(self._index_of) != len(self.rows):
            raise ValueError("row ids must be unique")

    def next_batch(self, batch_size: int) -> list[int]:
        """Return the row indices to serve next. Never runs out: strategies cycle or reshuffle forever."""
        raise NotImplementedError

    def update(self, ids: list[str], pass_rates: list[float], mean_reward: float, step: int) -> None:
        """Learn from one training step.

        Args:
            ids: ids of the prompts trained on in this step.
            pass_rates: for each prompt, the fraction of its rollouts judged correct (0..1).
            mean_reward: mean training reward over the step's rollouts.
            step: optimizer steps completed so far (`trainer.global_step`).
        """

    def indices_of(self, ids: list[str]) -> list[int]:
        """Row indices of the given ids; ids this strategy does not know are skipped."""
        return [self._index_of[i] for i in ids if i in self._index_of]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this strategy stands."""
        return {
            "num_rows": len(self.rows),
            "seed": self.seed,
            "generator": self.generator.get_state().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output; `setup` must have been called with the same rows."""
        if int(state["num_rows"]) != len(self.rows):
            raise ValueError(
                f"{type(self).__name__} state was saved for {state['num_rows']} rows, but serves {len(self.rows)}"
            )
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"].clone())

    def metrics(self, batch_indices: list[int]) -> dict[str, float]:
        """Scalars to log after a step about the served batch (keys `curriculum/...`)."""
        levels = [self.rows[i].difficulty for i in batch_indices if self.rows[i].difficulty is not None]
        return {"curriculum/mean_difficulty": float(sum(levels) / len(levels))} if levels else {}

    def histograms(self) -> dict[str, torch.Tensor]:
        """Distributions to log as histograms (e.g. per-prompt pass rates); none by default."""
        return {}


class PassShuffler:
    """Serves a pool of row indices in seeded random passes; each pass is a permutation of the pool.

    A batch that spans two passes takes the start of the next pass, with the rows already in the batch moved
    to the end of that pass, so a batch holds no duplicates unless the pool is smaller than the batch.
    """

    def __init__(self, pool: list[int]) -> None:
        self.pool = list(pool)
        self.order: list[int] = []
        self.pos = 0

    def take(self, n: int, generator: torch.Generator) -> list[int]:
        """Next `n` indices, reshuffling (with `generator`) whenever a pass is exhausted."""
        out: list[int] = []
        while len(out) < n:
            if self.pos >= len(self.order):
                self._new_pass(set(out), generator)
            k = min(n - len(out), len(self.order) - self.pos)
            out.extend(self.order[self.pos : self.pos + k])
            self.pos += k
        return out

    def _new_pass(self, avoid: set[int], generator: torch.Generator) -> None:
        perm = [self.pool[i] for i in torch.randperm(len(self.pool), generator=generator).tolist()]
        self.order = [i for i in perm if i not in avoid] + [i for i in perm if i in avoid]
        self.pos = 0

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order = [int(i) for i in state["order"]]
        self.pos = int(state["pos"])


class RandomOrder(OrderingStrategy):
    """Baseline ordering: a fresh seeded shuffle of all rows on every pass (the usual `shuffle=True`)."""

    def __init__(self) -> None:
        super().__init__()
        self._shuffler = PassShuffler([])

    def setup(self, rows: list[RowMeta], seed: int) -> None:
        super().setup(rows, seed)
        self._shuffler = PassShuffler(list(range(len(self.rows))))

    def next_batch(self, batch_size: int) -> list[int]:
        return self._shuffler.take(batch_size, self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "shuffler": self._shuffler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._shuffler.load_state_dict(state["shuffler"])


class BatchServer(Sampler[list[int]]):
    """A resumable DataLoader `batch_sampler` that serves batches chosen by an `OrderingStrategy`.

    Use as `DataLoader(dataset, batch_sampler=server, ...)` where `dataset[i]` is row `rows[i]`. Each
    `__iter__` yields `len(self)` batches drawn from the strategy, which keeps its position across epochs.
    Drawn batches wait in a FIFO until `mark_consumed` (called by the DataModule when the batch reaches the
    training step); `state_dict` saves that FIFO, and after `load_state_dict` the next iteration replays it
    before drawing new batches.

    The owning DataModule must: build the server in `setup("fit")` (the curriculum callback looks for
    `datamodule.batch_server` right after), call `mark_consumed(batch_ids)` in `on_before_batch_transfer`
    for training batches only (the LightningModule must not override that hook, or Lightning skips the
    DataModule's), and save/restore `state_dict()` in its own `state_dict`/`load_state_dict`. Under DDP each
    rank serves its own shard of rows and the Trainer needs `use_distributed_sampler=False` (Lightning cannot
    inject a DistributedSampler into a custom batch sampler).

    Args:
        rows: the rows this process serves (one shard per rank under DDP).
        batch_size: prompts per batch.
        strategy: what to serve next; `RandomOrder()` when None.
        seed: seed handed to the strategy.
        batches_per_epoch: batches per `__iter__`; default `len(rows) // batch_size` (at least 1).
    """

    def __init__(
        self,
        rows: list[RowMeta],
        batch_size: int,
        strategy: OrderingStrategy | None = None,
        seed: int = 0,
        batches_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.rows = list(rows)
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = batches_per_epoch
        self.strategy: OrderingStrategy = RandomOrder()
        self._reset_counters()
        self.set_strategy(strategy or RandomOrder())

    def _reset_counters(self) -> None:
        self.pending: list[list[int]] = []
        self.drawn = 0
        self.consumed = 0
        self.epoch_consumed = 0  # consumed since the current epoch's iteration began
        self._resuming = False

    def set_strategy(self, strategy: OrderingStrategy) -> None:
        """Serve with `strategy` from now on (set up with this server's rows and seed).

        Meant to be called before iteration starts; called later, it drops pending batches and resets the
        counters (with a warning).
        """
        if self.drawn:
            rank_zero_warn("BatchServer.set_strategy after iteration started: pending batches are dropped")
        self._reset_counters()
        strategy.setup(self.rows, self.seed)
        self.strategy = strategy

    def __len__(self) -> int:
        return self.batches_per_epoch or max(1, len(self.rows) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        """Yield one epoch of batches: first any drawn-but-unconsumed ones, then fresh draws."""
        if not (self._resuming and self.epoch_consumed < len(self)):
            self.epoch_consumed = 0  # a new epoch (not the continuation of an interrupted one)
        self._resuming = False
        remaining = len(self) - self.epoch_consumed
        replay = [list(b) for b in self.pending]
        for batch in replay[:remaining]:
            yield batch
        for _ in range(remaining - len(replay)):
            batch = self.strategy.next_batch(self.batch_size)
            self.pending.append(list(batch))
            self.drawn += 1
            yield batch

    def ids_of(self, indices: list[int]) -> list[str]:
        """Row ids for row indices."""
        return [self.rows[i].id for i in indices]

    def mark_consumed(self, ids: list[str]) -> None:
        """Record that the oldest pending batch reached the training step; `ids` must be that batch's ids."""
        if not self.pending:
            raise RuntimeError(
                "BatchServer.mark_consumed called with no batch pending (a non-training batch?)"
            )
        expected = self.ids_of(self.pending[0])
        if list(ids) != expected:
            raise RuntimeError(
                f"BatchServer.mark_consumed got ids {list(ids)[:4]}..., expected {expected[:4]}..."
            )
        self.pending.pop(0)
        self.consumed += 1
        self.epoch_consumed += 1

    def state_dict(self) -> dict[str, Any]:
        """Strategy state, pending batches and counters; plain Python and tensors only."""
        return {
            "strategy_class": type(self.strategy).__qualname__,
            "strategy": self.strategy.state_dict(),
            "pending": [list(b) for b in self.pending],
            "drawn": self.drawn,
            "consumed": self.consumed,
            "epoch_consumed": self.epoch_consumed,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output; the next `__iter__` replays the pending batches first."""
        name = type(self.strategy).__qualname__
        if state["strategy_class"] != name:
            raise ValueError(
                f"checkpoint was written with ordering strategy {state['strategy_class']}, "
                f"but this run uses {name}; resume with the same strategy"
            )
        if int(state["batch_size"]) != self.batch_size:
            raise ValueError(f"checkpoint batch_size {state['batch_size']} != {self.batch_size}")
        self.strategy.load_state_dict(state["strategy"])
        self.pending = [[int(i) for i in b] for b in state["pending"]]
        self.drawn = int(state["drawn"])
        self.consumed = int(state["consumed"])
        self.epoch_consumed = int(state["epoch_consumed"])
        self._resuming = True
