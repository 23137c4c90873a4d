"""Curriculum ordering strategies and the callback that feeds them training results.

Strategies (all `datamodules.ordering.OrderingStrategy`, chosen by `class_path` in YAML):

* `EasyToHard`: a fixed easy-to-hard pass over the rows, repeated.
* `Staged`: the paper's "normal problems, then hard problems" (Skywork-R1V3 §5.3), switching at a step or
  when the training reward plateaus. The paper found this *hurt* generalisation; it is here to reproduce that.
* `PassRate`: serves prompts whose estimated pass rate lies in a band, retires solved prompts and rarely
  revisits impossible ones (an adaptive curriculum; not part of the paper's recipe).

`RandomOrder` (the baseline) lives next to the base class in `datamodules/ordering.py`.

`CurriculumCallback` wires a strategy into the run: it hands the strategy to the DataModule's
`BatchServer` at setup and, after every training step, passes the step's per-prompt pass rates
(`pl_module.last_group_stats`) to `strategy.update` and logs `curriculum/*` metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.ordering import BatchServer, OrderingStrategy, PassShuffler, RowMeta

_DEFAULT_PRIOR = {1: 0.9, 2: 0.7, 3: 0.5, 4: 0.3, 5: 0.1}


class EasyToHard(OrderingStrategy):
    """Static easy-to-hard order: rows sorted by difficulty (ties shuffled with the seed, rows without a
    difficulty last), served front to back and then again from the start."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[int] = []
        self.pos = 0

    def setup(self, rows: list[RowMeta], seed: int) -> None:
        super().setup(rows, seed)
        shuffled = torch.randperm(len(self.rows), generator=self.generator).tolist()
        level = [(r.difficulty is None, r.difficulty or 0) for r in self.rows]
        self.order = sorted(shuffled, key=lambda i: level[i])
        self.pos = 0

    def next_batch(self, batch_size: int) -> list[int]:
        n = len(self.order)
        batch = [self.order[(self.pos + k) % n] for k in range(batch_size)]
        self.pos = (self.pos + batch_size) % n
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "order": list(self.order), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.order = [int(i) for i in state["order"]]
        self.pos = int(state["pos"])


class Staged(OrderingStrategy):
    """Stage-wise curriculum: random order within the current stage's difficulty levels, then the next stage.

    A row joins the first stage listing its difficulty; a row whose difficulty no stage lists joins the
    stage with the nearest level, and a row without a difficulty joins the first stage. A stage with no rows
    serves from all rows. Stages advance at `switch_step` steps into the stage, or when the mean training
    reward has not beaten the stage's best by `plateau_delta` for `plateau_patience` consecutive steps,
    whichever comes first (both None: never advance). The last stage runs until training stops.

    Args:
        stages: difficulty levels per stage, easy first. Default: normal (1-3), then hard (4-5).
        switch_step: steps to spend in each stage before advancing; None disables.
        plateau_patience: advance after this many steps without reward improvement; None disables.
        plateau_delta: the least rise of the mean reward that counts as an improvement.
    """

    def __init__(
        self,
        stages: Sequence[Sequence[int]] = ((1, 2, 3), (4, 5)),
        switch_step: int | None = 100,
        plateau_patience: int | None = None,
        plateau_delta: float = 0.01,
    ) -> None:
        super().__init__()
        if not stages or any(len(s) == 0 for s in stages):
            raise ValueError(f"stages must be non-empty lists of difficulty levels, got {stages}")
        self.stages = [[int(d) for d in s] for s in stages]
        self.switch_step = switch_step
        self.plateau_patience = plateau_patience
        self.plateau_delta = plateau_delta
        self._reset_progress()
        self._shufflers: list[PassShuffler] = []

    def _reset_progress(self) -> None:
        self.stage = 0
        self.stage_start_step = 0
        self.best_reward = float("-inf")
        self.steps_without_gain = 0

    def _stage_of(self, difficulty: int | None) -> int:
        if difficulty is None:
            return 0
        for s, levels in enumerate(self.stages):
            if difficulty in levels:
                return s
        gaps = [min(abs(difficulty - d) for d in levels) for levels in self.stages]
        return gaps.index(min(gaps))

    def setup(self, rows: list[RowMeta], seed: int) -> None:
        super().setup(rows, seed)
        pools: list[list[int]] = [[] for _ in self.stages]
        for i, row in enumerate(self.rows):
            pools[self._stage_of(row.difficulty)].append(i)
        everything = list(range(len(self.rows)))
        self._shufflers = [PassShuffler(pool or everything) for pool in pools]
        self._reset_progress()

    def next_batch(self, batch_size: int) -> list[int]:
        return self._shufflers[self.stage].take(batch_size, self.generator)

    def update(self, ids: list[str], pass_rates: list[float], mean_reward: float, step: int) -> None:
        if mean_reward > self.best_reward + self.plateau_delta:
            self.best_reward = float(mean_reward)
            self.steps_without_gain = 0
        else:
            self.steps_without_gain += 1
        if self.stage >= len(self.stages) - 1:
            return
        by_step = self.switch_step is not None and step - self.stage_start_step >= self.switch_step
        by_plateau = self.plateau_patience is not None and self.steps_without_gain >= self.plateau_patience
        if by_step or by_plateau:
            self.stage += 1
            self.stage_start_step = step
            self.best_reward = float("-inf")
            self.steps_without_gain = 0

    def metrics(self, batch_indices: list[int]) -> dict[str, float]:
        return {**super().metrics(batch_indices), "curriculum/stage": float(self.stage)}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "stage": self.stage,
            "stage_start_step": self.stage_start_step,
            "best_reward": self.best_reward,
            "steps_without_gain": self.steps_without_gain,
            "shufflers": [s.state_dict() for s in self._shufflers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stage = int(state["stage"])
        self.stage_start_step = int(state["stage_start_step"])
        self.best_reward = float(state["best_reward"])
        self.steps_without_gain = int(state["steps_without_gain"])
        for shuffler, sub in zip(self._shufflers, state["shufflers"], strict=True):
            shuffler.load_state_dict(sub)


class PassRate(OrderingStrategy):
    """Adaptive curriculum on per-prompt pass rates (fraction of a prompt's rollouts judged correct).

    Each prompt keeps an estimate p, starting at a prior from its difficulty. The first observation
    *replaces* the prior (a group of rollouts says more than a difficulty label); later ones blend in as
    p <- (1 - ema) * p + ema * observed. Each batch is filled in this order:

    1. each slot, with probability `revisit_prob`, one "impossible" prompt (p < `impossible_below`);
    2. prompts with p inside `band`, in seeded random order;
    3. the other live prompts, closest to the band centre first;
    4. the remaining impossible prompts, then retired ones.

    A prompt is retired while p >= `retire_above` after at least `retire_after` observations; retired
    prompts are served only when every prompt is retired.

    Args:
        band: (low, high) pass-rate band to train on.
        ema: weight of a new observation in the running estimate (0 < ema <= 1).
        prior_by_difficulty: starting estimate per difficulty level. Default 0.9, 0.7, 0.5, 0.3, 0.1 for
            levels 1..5; rows without a difficulty, or with a level not listed, start at 0.5.
        retire_above: estimate at or above which a prompt counts as solved.
        retire_after: observations needed before a prompt can retire.
        impossible_below: estimate below which a prompt counts as (currently) impossible.
        revisit_prob: per-slot probability of serving an impossible prompt.
    """

    def __init__(
        self,
        band: tuple[float, float] = (0.2, 0.8),
        ema: float = 0.5,
        prior_by_difficulty: dict[int, float] | None = None,
        retire_above: float = 0.95,
        retire_after: int = 2,
        impossible_below: float = 0.05,
        revisit_prob: float = 0.05,
    ) -> None:
        super().__init__()
        if not 0.0 <= band[0] <= band[1] <= 1.0:
            raise ValueError(f"band must satisfy 0 <= low <= high <= 1, got {band}")
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        self.band = (float(band[0]), float(band[1]))
        self.ema = ema
        self.prior_by_difficulty = dict(
            _DEFAULT_PRIOR if prior_by_difficulty is None else prior_by_difficulty
        )
        self.retire_above = retire_above
        self.retire_after = retire_after
        self.impossible_below = impossible_below
        self.revisit_prob = revisit_prob
        self.estimate = torch.zeros(0, dtype=torch.float64)
        self.seen = torch.zeros(0, dtype=torch.int64)
        self.retired = torch.zeros(0, dtype=torch.bool)

    def setup(self, rows: list[RowMeta], seed: int) -> None:
        super().setup(rows, seed)
        prior = [
            self.prior_by_difficulty.get(r.difficulty, 0.5) if r.difficulty is not None else 0.5 for r in rows
        ]
        self.estimate = torch.tensor(prior, dtype=torch.float64)
        self.seen = torch.zeros(len(rows), dtype=torch.int64)
        self.retired = torch.zeros(len(rows), dtype=torch.bool)

    def update(self, ids: list[str], pass_rates: list[float], mean_reward: float, step: int) -> None:
        for row_id, rate in zip(ids, pass_rates, strict=True):
            i = self._index_of.get(row_id)
            if i is None:
                continue
            observed = min(max(float(rate), 0.0), 1.0)
            old = float(self.estimate[i])
            self.estimate[i] = observed if self.seen[i] == 0 else (1 - self.ema) * old + self.ema * observed
            self.seen[i] += 1
            self.retired[i] = bool(
                self.seen[i] >= self.retire_after and self.estimate[i] >= self.retire_above
            )

    def next_batch(self, batch_size: int) -> list[int]:
        perm = torch.randperm(len(self.rows), generator=self.generator)
        revisit = int((torch.rand(batch_size, generator=self.generator) < self.revisit_prob).sum())
        p = self.estimate[perm]
        retired = self.retired[perm]
        if bool(retired.all()):
            retired = torch.zeros_like(retired)
        impossible = (p < self.impossible_below) & ~retired
        in_band = (p >= self.band[0]) & (p <= self.band[1]) & ~retired & ~impossible
        rest = ~(retired | impossible | in_band)
        centre = (self.band[0] + self.band[1]) / 2
        by_distance = torch.sort((p[rest] - centre).abs(), stable=True).indices
        queue = torch.cat(
            [
                perm[impossible][:revisit],
                perm[in_band],
                perm[rest][by_distance],
                perm[impossible][revisit:],
                perm[retired],
            ]
        ).tolist()
        return [queue[k % len(queue)] for k in range(batch_size)]

    def metrics(self, batch_indices: list[int]) -> dict[str, float]:
        live = ~self.retired if not bool(self.retired.all()) else torch.ones_like(self.retired)
        p = self.estimate
        in_band = (p >= self.band[0]) & (p <= self.band[1])
        return {
            **super().metrics(batch_indices),
            "curriculum/pass_rate_mean": float(p[live].mean()),
            "curriculum/retired": float(self.retired.sum()),
            "curriculum/impossible": float((p < self.impossible_below).sum()),
            "curriculum/in_band_frac": float(in_band.double().mean()),
            "curriculum/seen_frac": float((self.seen > 0).double().mean()),
        }

    def histograms(self) -> dict[str, torch.Tensor]:
        observed = self.estimate[self.seen > 0]
        return {"curriculum/pass_rate": observed} if observed.numel() else {}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "estimate": self.estimate.clone(),
            "seen": self.seen.clone(),
            "retired": self.retired.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.estimate = state["estimate"].clone().to(torch.float64)
        self.seen = state["seen"].clone().to(torch.int64)
        self.retired = state["retired"].clone().to(torch.bool)


class CurriculumCallback(L.Callback):
    """Plugs an ordering strategy into training and feeds it each step's per-prompt results.

    At `setup("fit")` it hands `strategy` to `trainer.datamodule.batch_server` (a `BatchServer`; without
    one the callback warns and stays idle). After each training batch it reads
    `pl_module.last_group_stats` = {"ids": [...], "pass_rates": [...], "mean_reward": float} (a new dict
    each step; an empty or already-seen dict is ignored, other keys are ignored), calls
    `strategy.update(..., step=trainer.global_step)` and logs `strategy.metrics()` on step; every
    `histogram_every_n_steps` steps it sends `strategy.histograms()` to loggers that have `add_histogram`
    (TensorBoard). Under DDP each rank updates its own shard's strategy with its own prompts.

    Checkpoints: the strategy's state (estimates, stage, generator, pending batches) is saved by the
    DataModule as part of the `BatchServer` state, not here; this callback's own state is only its count
    of applied updates and the strategy's class name.

    Args:
        strategy: the ordering strategy, e.g. `callbacks.curriculum.PassRate`.
        histogram_every_n_steps: how often to log histograms; 0 disables them.
    """

    def __init__(self, strategy: OrderingStrategy, histogram_every_n_steps: int = 50) -> None:
        super().__init__()
        self.strategy = strategy
        self.histogram_every_n_steps = histogram_every_n_steps
        self.updates = 0
        self._server: BatchServer | None = None
        self._last_stats: object | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Give the strategy to the DataModule's batch server (fit only)."""
        if stage != "fit":
            return
        server = getattr(trainer.datamodule, "batch_server", None)
        if not isinstance(server, BatchServer):
            rank_zero_warn("CurriculumCallback: the datamodule has no `batch_server`; the curriculum is idle")
            self._server = None
            return
        server.set_strategy(self.strategy)
        self._server = server

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update the strategy from `pl_module.last_group_stats` and log its metrics."""
        stats = getattr(pl_module, "last_group_stats", None)
        if self._server is None or not stats or "ids" not in stats or stats is self._last_stats:
            return  # idle, no RL stats, or stats already applied (the module did not publish new ones)
        self._last_stats = stats
        ids = [str(i) for i in stats["ids"]]
        rates = [float(r) for r in stats["pass_rates"]]
        self.strategy.update(ids, rates, float(stats["mean_reward"]), trainer.global_step)
        self.updates += 1
        metrics = self.strategy.metrics(self.strategy.indices_of(ids))
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=max(1, len(ids)))
        every = self.histogram_every_n_steps
        if every > 0 and trainer.global_step % every == 0 and trainer.is_global_zero:
            self._log_histograms(trainer)

    def _log_histograms(self, trainer: L.Trainer) -> None:
        hists = self.strategy.histograms()
        for logger in trainer.loggers if hists else []:
            experiment = logger.experiment
            if hasattr(experiment, "add_histogram"):
                for name, values in hists.items():
                    experiment.add_histogram(name, values, global_step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        """Only what the BatchServer does not hold: the update count and the strategy's class name."""
        return {"updates": self.updates, "strategy_class": type(self.strategy).__qualname__}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the update count (the strategy itself is restored with the DataModule's state)."""
        self.updates = int(state_dict.get("updates", 0))
