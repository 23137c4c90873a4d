"""Curriculum strategies on handcrafted rows, and the callback inside a real Lightning Trainer."""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from callbacks.curriculum import CurriculumCallback, EasyToHard, PassRate, Staged
from datamodules.ordering import BatchServer, OrderingStrategy, RandomOrder, RowMeta

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "curriculum"


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def level_rows(levels: list[int | None]) -> list[RowMeta]:
    return [RowMeta(f"q{i}", d) for i, d in enumerate(levels)]


# ---------------------------------------------------------------- EasyToHard


def test_easy_to_hard_sorts_shuffles_ties_and_cycles() -> None:
    levels = [3, 1, None, 2, 1, 3, 2, 1]
    rows = level_rows(levels)
    orders = set()
    for seed in range(6):
        strategy = EasyToHard()
        strategy.setup(rows, seed)
        first_pass = [i for _ in range(4) for i in strategy.next_batch(2)]
        served = [levels[i] for i in first_pass]
        assert served == [1, 1, 1, 2, 2, 3, 3, None]
        assert strategy.next_batch(3) == first_pass[:3], "the order repeats after a full pass"
        orders.add(tuple(first_pass))
    assert len(orders) > 1, "ties must be broken by the seed"


# ---------------------------------------------------------------- Staged


def test_staged_assigns_rows_and_switches_at_step() -> None:
    levels = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, None, 7]
    strategy = Staged(stages=[[1, 2, 3], [4, 5]], switch_step=3)
    strategy.setup(level_rows(levels), seed=0)
    stage0 = {i for i, d in enumerate(levels) if d in (1, 2, 3, None)}
    for step in (1, 2):
        assert set(strategy.next_batch(4)) <= stage0
        strategy.update([], [], mean_reward=0.1 * step, step=step)
        assert strategy.stage == 0 and strategy.metrics([])["curriculum/stage"] == 0.0
    strategy.update([], [], mean_reward=0.3, step=3)
    assert strategy.stage == 1
    served = {i for _ in range(10) for i in strategy.next_batch(3)}
    assert served == {3, 4, 8, 9, 11}, "stage 2 serves levels 4-5 and the unlisted level 7"
    strategy.update([], [], mean_reward=0.0, step=500)
    assert strategy.stage == 1, "the last stage never ends"


def test_staged_switches_on_plateau() -> None:
    strategy = Staged(stages=[[1], [2], [3]], switch_step=None, plateau_patience=2, plateau_delta=0.01)
    strategy.setup(level_rows([1, 2, 3]), seed=0)
    stages = []
    for step, reward in enumerate([0.10, 0.20, 0.205, 0.21, 0.5, 0.5, 0.5], start=1):
        strategy.update([], [], reward, step)
        stages.append(strategy.stage)
    # 0.205 and 0.21 do not beat 0.20 by 0.01 -> switch at step 4; stage 1 restarts its best at 0.5.
    assert stages == [0, 0, 0, 1, 1, 1, 2]
    assert strategy.next_batch(2) == [2, 2]


# ---------------------------------------------------------------- PassRate


def test_pass_rate_update_rule_by_hand() -> None:
    strategy = PassRate(ema=0.3)
    strategy.setup(level_rows([2, None, 9]), seed=0)
    assert strategy.estimate.tolist() == [0.7, 0.5, 0.5]  # priors: level 2, no level, unlisted level
    strategy.update(["q0"], [0.25], 0.0, 1)
    assert strategy.estimate[0].item() == pytest.approx(0.25)  # the first observation replaces the prior
    strategy.update(["q0"], [0.75], 0.0, 2)
    assert strategy.estimate[0].item() == pytest.approx(0.7 * 0.25 + 0.3 * 0.75)  # 0.4
    strategy.update(["q0", "q1"], [1.0, 0.0], 0.0, 3)
    assert strategy.estimate[0].item() == pytest.approx(0.7 * 0.4 + 0.3 * 1.0)  # 0.58
    assert strategy.estimate[1].item() == 0.0
    assert strategy.seen.tolist() == [3, 1, 0]


def test_pass_rate_serves_band_first_then_closest_to_centre() -> None:
    strategy = PassRate(band=(0.4, 0.6), revisit_prob=0.0)
    strategy.setup(level_rows([1, 2, 3, 4, 5, 3]), seed=0)  # priors .9 .7 .5 .3 .1 .5
    for _ in range(5):
        batch = strategy.next_batch(4)
        assert set(batch[:2]) == {2, 5}  # in band
        assert set(batch[2:]) == {1, 3}  # 0.7 and 0.3 are closest to the centre 0.5
    strategy.update(["q2", "q5"], [1.0, 1.0], 1.0, 1)  # band now empty
    assert set(strategy.next_batch(2)) == {1, 3}


def test_pass_rate_retires_solved_prompts() -> None:
    strategy = PassRate(retire_after=2, retire_above=0.95, revisit_prob=0.0)
    strategy.setup(level_rows([3, 3, 3]), seed=0)
    strategy.update(["q0"], [1.0], 1.0, 1)
    assert not strategy.retired[0]  # one observation is not enough
    strategy.update(["q0"], [1.0], 1.0, 2)
    assert strategy.retired.tolist() == [True, False, False]
    assert all(0 not in strategy.next_batch(2) for _ in range(50))
    assert strategy.metrics([1, 2])["curriculum/retired"] == 1.0
    strategy.update(["q1", "q2", "q1", "q2"], [1.0] * 4, 1.0, 3)
    assert bool(strategy.retired.all())
    assert sorted(strategy.next_batch(3)) == [0, 1, 2], "everything retired: serve them all again"


def test_pass_rate_revisits_impossible_prompts_rarely() -> None:
    rows = level_rows([3] * 8)
    counts = {}
    for prob in (0.0, 0.25, 1.0):
        strategy = PassRate(revisit_prob=prob)
        strategy.setup(rows, seed=1)
        strategy.update(["q0"], [0.0], 0.0, 1)  # q0 is now "impossible"
        batches = [strategy.next_batch(2) for _ in range(400)]
        counts[prob] = sum(0 in b for b in batches)
    assert counts[0.0] == 0
    assert counts[1.0] == 400
    assert 0.25 * 400 < counts[0.25] < 0.6 * 400  # P(at least one of 2 slots) = 1 - 0.75**2 = 0.44


def test_pass_rate_metrics_and_histogram() -> None:
    strategy = PassRate()
    strategy.setup(level_rows([1, 5, None, 3]), seed=0)
    assert strategy.histograms() == {}
    strategy.update(["q0", "q1"], [0.5, 0.0], 0.25, 1)
    metrics = strategy.metrics([0, 1])
    assert metrics["curriculum/mean_difficulty"] == 3.0
    assert metrics["curriculum/pass_rate_mean"] == pytest.approx((0.5 + 0.0 + 0.5 + 0.5) / 4)
    assert metrics["curriculum/impossible"] == 1.0 and metrics["curriculum/seen_frac"] == 0.5
    assert strategy.histograms()["curriculum/pass_rate"].tolist() == [0.5, 0.0]


# ---------------------------------------------------------------- state round trips


FACTORIES: dict[str, Callable[[], OrderingStrategy]] = {
    "random": RandomOrder,
    "easy_to_hard": EasyToHard,
    "staged": lambda: Staged(switch_step=3),
    "pass_rate": lambda: PassRate(revisit_prob=0.3),
}


def play(strategy: OrderingStrategy, steps: range) -> list[list[int]]:
    batches = []
    for step in steps:
        batch = strategy.next_batch(3)
        ids = [strategy.rows[i].id for i in batch]
        rates = [((i * 3 + step) % 5) / 4 for i in batch]
        strategy.update(ids, rates, sum(rates) / 3, step)
        batches.append(batch)
    return batches


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_roundtrip_continues_identically(name: str) -> None:
    rows = level_rows([1, 2, 3, 4, 5, None, 2, 4, 1, 3])
    original = FACTORIES[name]()
    original.setup(rows, seed=4)
    play(original, range(1, 5))
    state = roundtrip(original.state_dict())
    restored = FACTORIES[name]()
    restored.setup(rows, seed=123)
    restored.load_state_dict(state)
    assert str(restored.state_dict()) == str(original.state_dict())
    assert play(restored, range(5, 12)) == play(original, range(5, 12))


# ---------------------------------------------------------------- in a real Trainer


class RowDataset(Dataset):
    def __init__(self, rows: list[RowMeta]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"id": self.rows[i].id, "x": torch.tensor([float(i)])}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"ids": [it["id"] for it in items], "x": torch.stack([it["x"] for it in items])}


class RowsDataModule(L.LightningDataModule):
    """Fixture DataModule honouring the BatchServer contract (build in setup, mark consumed, save state)."""

    def __init__(self, n_rows: int = 10, batch_size: int = 3, num_workers: int = 0) -> None:
        super().__init__()
        self.rows = [RowMeta(f"p{i:02d}", 1 + (i * 3) % 5) for i in range(n_rows)]
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.batch_server: BatchServer | None = None

    def setup(self, stage: str) -> None:
        if self.batch_server is None:
            self.batch_server = BatchServer(self.rows, self.batch_size, seed=11)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            RowDataset(self.rows),
            batch_sampler=self.batch_server,
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.batch_server.mark_consumed(batch["ids"])
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"batch_server": self.batch_server.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batch_server.load_state_dict(state_dict["batch_server"])


class FakeGroupModule(L.LightningModule):
    """Records served ids and publishes deterministic per-prompt pass rates, as the GRPO module will."""

    def __init__(self, publish: bool = True) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.served: list[list[str]] = []
        self.publish = publish
        self.last_group_stats: dict[str, Any] = {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        ids = batch["ids"]
        self.served.append(list(ids))
        step = self.trainer.global_step
        if not self.publish:
            return (self.w * batch["x"]).pow(2).mean()
        rates = [((int(i[1:]) * 7 + step) % 5) / 4 for i in ids]
        self.last_group_stats = {"ids": ids, "pass_rates": rates, "mean_reward": sum(rates) / len(rates)}
        return (self.w * batch["x"]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(
    strategy: OrderingStrategy,
    max_steps: int,
    root: Path,
    *,
    num_workers: int = 0,
    ckpt_path: Path | None = None,
    save_every: int | None = None,
    logger: Any = False,
    publish: bool = True,
) -> tuple[FakeGroupModule, L.Trainer]:
    callbacks: list[L.Callback] = [CurriculumCallback(strategy, histogram_every_n_steps=2)]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=root, filename="stop", every_n_train_steps=save_every))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=bool(save_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        log_every_n_steps=1,
    )
    model = FakeGroupModule(publish)
    with warnings.catch_warnings():  # "resuming mid-epoch with a non-resumable dataloader": ours is resumable
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before.*")
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint.*")
        trainer.fit(model, datamodule=RowsDataModule(num_workers=num_workers), ckpt_path=ckpt_path)
    return model, trainer


def test_swapping_the_strategy_changes_the_served_order(tmp_path: Path) -> None:
    random_run, _ = fit(RandomOrder(), 6, tmp_path / "random")
    easy_run, _ = fit(EasyToHard(), 6, tmp_path / "easy")
    rows = RowsDataModule().rows
    level = {r.id: r.difficulty for r in rows}
    easy_levels = [level[i] for batch in easy_run.served[:3] for i in batch]
    assert easy_levels == sorted(easy_levels)
    assert random_run.served != easy_run.served
    assert all(len(b) == 3 for b in random_run.served + easy_run.served) and len(easy_run.served) == 6


def test_callback_is_idle_without_group_stats(tmp_path: Path) -> None:
    model, trainer = fit(PassRate(), 3, tmp_path, publish=False)
    callback = trainer.callbacks[0]
    assert callback.updates == 0 and int(callback.strategy.seen.sum()) == 0
    assert len(model.served) == 3, "the strategy still serves batches"


def test_pass_rate_logs_metrics_and_histograms(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")
    model, trainer = fit(PassRate(), 4, tmp_path, logger=logger)
    assert {"curriculum/pass_rate_mean", "curriculum/retired", "curriculum/mean_difficulty"} <= set(
        trainer.callback_metrics
    )
    strategy = trainer.callbacks[0].strategy
    assert isinstance(strategy, PassRate) and int(strategy.seen.sum()) == 12
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    assert "curriculum/pass_rate" in events.Tags()["histograms"]
    assert "curriculum/pass_rate_mean" in events.Tags()["scalars"]


@pytest.mark.parametrize(
    "name,stop,num_workers",
    [("pass_rate", 4, 0), ("pass_rate", 3, 0), ("staged", 4, 0), ("pass_rate", 4, 1)],
)
def test_stop_and_resume_serves_the_same_ids(tmp_path: Path, name: str, stop: int, num_workers: int) -> None:
    """num_workers=1 makes the DataLoader draw two batches ahead, so checkpoints hold pending batches."""
    factory = {
        "pass_rate": lambda: PassRate(band=(0.3, 0.7), revisit_prob=0.2),
        "staged": lambda: Staged(switch_step=3),
    }
    total = 8
    reference, _ = fit(factory[name](), total, tmp_path / "ref", num_workers=num_workers)
    head, _ = fit(factory[name](), stop, tmp_path / "a", num_workers=num_workers, save_every=stop)
    checkpoint = tmp_path / "a" / "stop.ckpt"
    pending = torch.load(checkpoint, weights_only=True)["RowsDataModule"]["batch_server"]["pending"]
    assert len(pending) == (2 if num_workers else 0)
    tail, trainer = fit(factory[name](), total, tmp_path / "b", num_workers=num_workers, ckpt_path=checkpoint)
    assert head.served + tail.served == reference.served
    assert trainer.callbacks[0].updates == total


def test_overlays_instantiate_the_callback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    monkeypatch.setattr(sys, "argv", ["app"])
    expected = {"random": RandomOrder, "easy_to_hard": EasyToHard, "staged": Staged, "pass_rate": PassRate}
    for name, cls in expected.items():
        # the callback part only: the overlay's `data:` part (lifting the tiny GRPO prompt pool) needs the real
        # DataModule, and is checked on top of configs/tiny/grpo.yaml in test_configs
        overlay = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert overlay.pop("data") == {"train_limit": None}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(overlay))
        args = ["--config", str(tmp_path / f"{name}.yaml"), f"--trainer.default_root_dir={tmp_path}"]
        cli = LightningCLI(BoringModel, run=False, args=args, save_config_callback=None)
        found = [c for c in cli.trainer.callbacks if isinstance(c, CurriculumCallback)]
        assert len(found) == 1 and type(found[0].strategy) is cls
