"""RandomOrder and BatchServer: determinism, coverage, and exact resume under prefetching."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from callbacks.curriculum import PassRate
from datamodules.ordering import BatchServer, OrderingStrategy, RandomOrder, RowMeta


def make_rows(n: int, prefix: str = "r") -> list[RowMeta]:
    return [RowMeta(f"{prefix}{i:03d}", 1 + i % 5) for i in range(n)]


class DictRows(Dataset):
    """A tiny map-style dataset of dicts, one per row."""

    def __init__(self, rows: list[RowMeta]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"id": self.rows[i].id, "x": float(i)}


def collate_ids(items: list[dict]) -> list[str]:
    return [item["id"] for item in items]


def roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a Lightning checkpoint would."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------- RandomOrder


def test_random_order_is_deterministic_per_seed() -> None:
    rows = make_rows(11)
    draws = []
    for seed in (3, 3, 4):
        strategy = RandomOrder()
        strategy.setup(rows, seed)
        draws.append([strategy.next_batch(4) for _ in range(6)])
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]


@pytest.mark.parametrize("n_rows,batch_size", [(12, 4), (10, 4), (7, 3)])
def test_random_order_covers_all_rows_each_pass(n_rows: int, batch_size: int) -> None:
    strategy = RandomOrder()
    strategy.setup(make_rows(n_rows), seed=0)
    batches = [strategy.next_batch(batch_size) for _ in range(4 * n_rows)]
    stream = [i for b in batches for i in b]
    for start in range(0, len(stream) - n_rows + 1, n_rows):
        assert sorted(stream[start : start + n_rows]) == list(range(n_rows))
    assert all(len(set(b)) == len(b) for b in batches), "a batch spanning two passes repeated a row"
    passes = {tuple(stream[s : s + n_rows]) for s in range(0, 4 * n_rows, n_rows)}
    assert len(passes) > 1, "every pass must be reshuffled"


def test_random_order_state_roundtrip() -> None:
    rows = make_rows(9)
    a = RandomOrder()
    a.setup(rows, seed=1)
    for _ in range(4):
        a.next_batch(4)
    state = roundtrip(a.state_dict())
    b = RandomOrder()
    b.setup(rows, seed=99)
    b.load_state_dict(state)
    assert [a.next_batch(4) for _ in range(8)] == [b.next_batch(4) for _ in range(8)]


# ---------------------------------------------------------------- BatchServer basics


def test_batch_server_len_and_epoch_size() -> None:
    assert len(BatchServer(make_rows(10), batch_size=3)) == 3
    assert len(BatchServer(make_rows(2), batch_size=3)) == 1
    server = BatchServer(make_rows(10), batch_size=3, batches_per_epoch=5)
    assert len(server) == 5
    loader = DataLoader(DictRows(server.rows), batch_sampler=server, collate_fn=collate_ids)
    epoch = []
    for ids in loader:
        server.mark_consumed(ids)
        epoch.append(ids)
    assert len(epoch) == 5 and all(len(ids) == 3 for ids in epoch)
    assert server.consumed == 5 and server.pending == []


def test_batch_server_continues_across_epochs_like_its_strategy() -> None:
    rows = make_rows(10)
    server = BatchServer(rows, batch_size=3, seed=5)
    loader = DataLoader(DictRows(rows), batch_sampler=server, collate_fn=collate_ids)
    served = []
    for _ in range(3):
        for ids in loader:
            server.mark_consumed(ids)
            served.append(ids)
    reference = RandomOrder()
    reference.setup(rows, seed=5)
    assert served == [[rows[i].id for i in reference.next_batch(3)] for _ in range(9)]


def test_disjoint_shards_serve_disjoint_ids() -> None:
    rows = make_rows(20)
    shards = [rows[rank::2] for rank in range(2)]
    seen: list[set[str]] = []
    for shard in shards:
        server = BatchServer(shard, batch_size=4, seed=0)
        loader = DataLoader(DictRows(shard), batch_sampler=server, collate_fn=collate_ids)
        ids: set[str] = set()
        for _ in range(3):
            for batch in loader:
                server.mark_consumed(batch)
                ids.update(batch)
        seen.append(ids)
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == {r.id for r in rows}


def test_mark_consumed_checks_the_batch() -> None:
    server = BatchServer(make_rows(8), batch_size=2)
    with pytest.raises(RuntimeError, match="no batch pending"):
        server.mark_consumed(["r000", "r001"])
    first = next(iter(server))
    with pytest.raises(RuntimeError, match="expected"):
        server.mark_consumed(["nope", "nope"])
    server.mark_consumed(server.ids_of(first))


def test_load_state_with_other_strategy_is_refused() -> None:
    rows = make_rows(8)
    state = BatchServer(rows, batch_size=2, strategy=PassRate()).state_dict()
    with pytest.raises(ValueError, match="same strategy"):
        BatchServer(rows, batch_size=2, strategy=RandomOrder()).load_state_dict(state)


# ---------------------------------------------------------------- exact resume under prefetch


def lightning_like(loader: DataLoader, prefetch: int) -> Iterator[list[str]]:
    """Serve batches the way Lightning's prefetching fetcher does: one `iter()` per epoch, `prefetch` batches
    fetched ahead inside the epoch, the next batch fetched before the current one is handed out."""
    while True:
        it = iter(loader)
        buffer = [b for _, b in zip(range(prefetch), it, strict=False)]
        for batch in it:
            buffer.append(batch)
            yield buffer.pop(0)
        yield from buffer


def fake_pass_rate(row_id: str, step: int) -> float:
    """Deterministic stand-in for a group's fraction of correct rollouts."""
    return ((int(row_id[1:]) * 7 + step) % 5) / 4


def train_loop(server: BatchServer, steps: int, start_step: int, prefetch: int) -> list[list[str]]:
    """The real loop's order of events: fetch (maybe ahead), mark consumed, train, update the strategy."""
    loader = DataLoader(DictRows(server.rows), batch_sampler=server, collate_fn=collate_ids)
    batches = lightning_like(loader, prefetch)
    served = []
    for step in range(start_step + 1, start_step + steps + 1):
        ids = next(batches)
        server.mark_consumed(ids)
        served.append(ids)
        rates = [fake_pass_rate(i, step) for i in ids]
        server.strategy.update(ids, rates, sum(rates) / len(rates), step)
    return served


STRATEGIES: dict[str, Callable[[], OrderingStrategy]] = {
    "random": RandomOrder,
    "pass_rate": lambda: PassRate(band=(0.3, 0.7), revisit_prob=0.2),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("prefetch,stop", [(0, 4), (1, 4), (1, 3), (2, 5), (2, 1)])
def test_interrupted_run_serves_the_same_prompts(name: str, prefetch: int, stop: int) -> None:
    rows = make_rows(11)
    total = 12

    def new_server() -> BatchServer:
        return BatchServer(rows, batch_size=3, strategy=STRATEGIES[name](), seed=2)

    uninterrupted = train_loop(new_server(), total, 0, prefetch)

    first = new_server()
    head = train_loop(first, stop, 0, prefetch)
    state = roundtrip(first.state_dict())
    into_epoch = stop % len(first)
    assert len(state["pending"]) == (min(prefetch, len(first) - into_epoch) if into_epoch else 0)

    resumed = new_server()
    resumed.load_state_dict(state)
    tail = train_loop(resumed, total - stop, stop, prefetch)
    if state["pending"]:
        assert tail[0] == resumed.ids_of(state["pending"][0])
    assert head + tail == uninterrupted


def test_prefetched_batch_is_replayed_first() -> None:
    """The brief's scenario, spelled out: draw 2, consume 1, save, restore, iterate."""
    rows = make_rows(10)
    server = BatchServer(rows, batch_size=2, seed=0)
    loader = DataLoader(DictRows(rows), batch_sampler=server, collate_fn=collate_ids)
    it = iter(loader)
    b1, b2 = next(it), next(it)
    server.mark_consumed(b1)
    restored = BatchServer(rows, batch_size=2, seed=0)
    restored.load_state_dict(roundtrip(server.state_dict()))
    after_restore = list(DataLoader(DictRows(rows), batch_sampler=restored, collate_fn=collate_ids))
    assert after_restore[0] == b2
    assert after_restore[1:] == [next(it) for _ in range(len(after_restore) - 1)]
