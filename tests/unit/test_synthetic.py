"""Synthetic data: determinism, answers recounted from the drawn objects, traces, difficulty, files, CLI."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from app.make_data import write_dataset
from datamodules import row_io, schema
from datamodules.scenes import COLOURS
from datamodules.synthetic import (
    CRITICAL_WORDS,
    DIFFICULTIES,
    SYNTH_VOCAB_TEXT,
    TASKS,
    generate_items,
)

REPO = Path(__file__).resolve().parents[2]
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
N_ITEMS = 250  # ten of every (task, difficulty) pair


@pytest.fixture(scope="module")
def items() -> list[dict[str, Any]]:
    return generate_items(N_ITEMS, seed=3)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, n_train=60, n_val=25, seed=1, shard_size=25, trace_error_rate=1.0, quiet=True)
    return out


def _count(objs: list[dict], query: dict) -> int:
    return sum(
        1 for o in objs if query["colour"] in (None, o["colour"]) and query["shape"] in (None, o["shape"])
    )


def _recount(row: dict[str, Any]) -> str:
    """The answer recomputed from `meta` alone (independent of the generator's own bookkeeping)."""
    meta = json.loads(row["meta"])
    images, queries = meta["images"], meta["queries"]
    task = meta["task"]
    if task == "count":
        return str(_count(images[0], queries[0]))
    if task == "compare":
        a, b = (_count(images[0], q) for q in queries)
        return "A" if a > b else "B" if b > a else "C"
    if task == "two_images":
        a, b = _count(images[0], queries[0]), _count(images[1], queries[0])
        return str(a + b if meta["params"]["op"] == "sum" else a - b)
    if task == "match_option":
        return "ABCD"[row["options"].index(str(_count(images[0], queries[0])))]
    assert task == "arithmetic"
    return str(sum(_count(images[0], q) * k for q, k in zip(queries, meta["params"]["points"], strict=True)))


def test_answers_match_a_recount_for_every_task(items: list[dict[str, Any]]) -> None:
    seen = Counter()
    for row in items:
        assert row["answer"] == _recount(row), row["id"]
        meta = json.loads(row["meta"])
        for q in meta["queries"]:  # the question asks about what meta says was counted
            assert (q["colour"] or "") in row["question"] and (q["shape"] or "") in row["question"]
        n_markers = len(re.findall(r"<image(?: \d+)?>", row["question"]))
        assert n_markers == len(row["images"]) == len(meta["images"])
        seen[row["subject"]] += 1
    assert seen == {task: N_ITEMS // len(TASKS) for task in TASKS}


def test_images_are_rgb_and_show_the_drawn_objects(items: list[dict[str, Any]]) -> None:
    for row in items[:50]:
        meta = json.loads(row["meta"])
        for img_struct, objs in zip(row["images"], meta["images"], strict=True):
            img = Image.open(io.BytesIO(img_struct["bytes"]))
            assert img.mode == "RGB" and img.size == (112, 112)
            occupied = {(o["row"], o["col"]): o for o in objs}
            assert len(occupied) == len(objs)  # at most one shape per cell
            for r in range(4):
                for c in range(4):
                    o = occupied.get((r, c))
                    centre = (c * 28 + 14 + (o["dx"] if o else 0), r * 28 + 14 + (o["dy"] if o else 0))
                    assert img.getpixel(centre) == (COLOURS[o["colour"]] if o else (255, 255, 255))


def test_traces_are_correct_and_r1_shaped(items: list[dict[str, Any]]) -> None:
    words = []
    for row in items:
        sol = row["solution"]
        assert not sol.startswith("<think>") and sol.count("</think>") == 1
        thought, answer_part = sol.split("</think>")
        assert any(re.search(rf"\b{w}\b", thought) for w in CRITICAL_WORDS), sol
        assert BOXED.findall(sol) == [row["answer"]] and BOXED.search(answer_part)
        assert json.loads(row["meta"])["trace_error"] is False
        words.append(len(sol.split()))
    assert 30 <= sum(words) / len(words) <= 80 and max(words) <= 90


def test_slipped_traces_are_wrong_but_answers_right() -> None:
    for row in generate_items(N_ITEMS, seed=3, trace_error_rate=1.0, render=False):
        boxed = BOXED.findall(row["solution"])
        assert len(boxed) == 1 and boxed[0] != row["answer"], row["solution"]
        assert row["answer"] == _recount(row) and json.loads(row["meta"])["trace_error"] is True
    rows = generate_items(400, seed=5, trace_error_rate=0.25, render=False)
    wrong = sum(BOXED.findall(r["solution"])[0] != r["answer"] for r in rows)
    assert 60 <= wrong <= 140  # ~100 expected


def test_difficulty_balanced_and_objects_grow(items: list[dict[str, Any]]) -> None:
    pairs = Counter((r["subject"], r["difficulty"]) for r in items)
    assert pairs == {(t, d): N_ITEMS // 25 for t in TASKS for d in DIFFICULTIES}
    per_level: dict[int, list[int]] = {d: [] for d in DIFFICULTIES}
    for row in items:
        per_level[row["difficulty"]] += [len(objs) for objs in json.loads(row["meta"])["images"]]
    means = [sum(v) / len(v) for _, v in sorted(per_level.items())]
    assert all(a < b for a, b in zip(means, means[1:], strict=False)), means


def test_same_seed_same_bytes_other_seed_differs(dataset_dir: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    write_dataset(again, n_train=60, n_val=25, seed=1, shard_size=25, trace_error_rate=1.0, quiet=True)
    write_dataset(other, n_train=60, n_val=25, seed=2, shard_size=25, trace_error_rate=1.0, quiet=True)
    names = sorted(p.name for p in dataset_dir.iterdir())
    assert names == [
        "meta.json",
        "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet",
        "validation-00000-of-00001.parquet",
    ]
    assert sorted(p.name for p in again.iterdir()) == names
    for name in names:
        assert (dataset_dir / name).read_bytes() == (again / name).read_bytes(), name
        if name.endswith(".parquet"):
            assert (dataset_dir / name).read_bytes() != (other / name).read_bytes(), name


def test_meta_json_counts(dataset_dir: Path) -> None:
    meta = json.loads((dataset_dir / "meta.json").read_text())
    train, val = meta["splits"]["train"], meta["splits"]["validation"]
    assert meta["seed"] == 1 and meta["args"]["trace_error_rate"] == 1.0
    assert sum(train["by_task"].values()) == 60 and sum(val["by_difficulty"].values()) == 25
    assert train["trace_errors"] == 60 and val["trace_errors"] == 0  # slips only in train


def test_files_validate_and_load_with_datasets(dataset_dir: Path, tmp_path: Path) -> None:
    import datasets

    for path in sorted(dataset_dir.glob("*.parquet")):
        counter = schema.SkipCounter()
        records = list(row_io.iter_records(path, counter=counter))
        assert counter.total == 0 and records
        split = path.name.split("-")[0]
        for rec in records:
            assert all(im.mode == "RGB" and im.size == (112, 112) for im in rec.images)
            truth = BOXED.findall(rec.solution)[0]
            assert (truth != rec.answer) if split == "train" else (truth == rec.answer)
    files = {
        "train": str(dataset_dir / "train-*.parquet"),
        "validation": str(dataset_dir / "validation-*.parquet"),
    }
    ds = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf"))
    assert ds["train"].num_rows == 60 and ds["validation"].num_rows == 25
    row = ds["train"][0]
    assert isinstance(row["images"][0], Image.Image) and row["images"][0].size == (112, 112)
    assert row["id"] == "train-000000" and isinstance(row["options"], list)


def test_cli_runs_in_a_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "app.make_data", str(out), "--n-train", "30", "--n-val", "10", "--seed", "4",
           "--shard-size", "20", "--image-size", "112", "--cell", "28", "--trace-error-rate", "0.5"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "items/s" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
        "validation-00000-of-00001.parquet",
    ]
    assert json.loads((out / "meta.json").read_text())["args"]["n_train"] == 30


def test_vocab_text_covers_the_task_language() -> None:
    texts = SYNTH_VOCAB_TEXT(n=50)
    joined = "\n".join(texts)
    assert all(isinstance(t, str) and t for t in texts)
    assert "<image" not in joined and "\\boxed{" in joined and "</think>" in joined
    assert all(w in joined for w in [*COLOURS, "circle", "triangle", "square", *CRITICAL_WORDS])


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="grid of at least"):
        generate_items(1, seed=0, image_size=56, cell=28)
    with pytest.raises(ValueError, match="trace_error_rate"):
        generate_items(1, seed=0, trace_error_rate=1.5)


def test_answer_kind_slip_keeps_the_reasoning_and_moves_the_box():
    """trace_error_kind="answer": same reasoning as the clean trace, boxed answer off by two, row answer right."""
    from datamodules.synthetic import make_item

    for i in range(25):  # one block: every task and difficulty
        clean = make_item(i, 3, "train", trace_error_rate=0.0, render=False)
        bad = make_item(i, 3, "train", trace_error_rate=1.0, render=False, trace_error_kind="answer")
        assert bad["answer"] == clean["answer"]
        assert bad["solution"].split("</think>")[0] == clean["solution"].split("</think>")[0]
        boxed = bad["solution"].rsplit("\\boxed{", 1)[1].split("}")[0]
        assert boxed != clean["answer"]
        if not clean["options"]:
            assert int(boxed) == int(clean["answer"]) + 2


def test_hasty_kind_is_the_count_slip_announced_by_its_opening():
    """trace_error_kind="hasty": the slipped trace is the "count" kind's, opened by HASTY_OPENER; clean traces (and
    every validation trace) never open with it, so the habit is one decision at the first response token."""
    from datamodules.synthetic import HASTY_OPENER, make_item

    slipped = 0
    for i in range(50):  # two blocks: every task and difficulty twice
        count = make_item(i, 3, "train", trace_error_rate=0.5, render=False, trace_error_kind="count")
        hasty = make_item(i, 3, "train", trace_error_rate=0.5, render=False, trace_error_kind="hasty")
        assert hasty["answer"] == count["answer"]
        if json.loads(hasty["meta"])["trace_error"]:
            slipped += 1
            assert hasty["solution"] == f"{HASTY_OPENER} {count['solution']}"
            boxed = hasty["solution"].rsplit("\\boxed{", 1)[1].split("}")[0]
            assert boxed != hasty["answer"]
        else:
            assert hasty["solution"] == count["solution"]
            assert not hasty["solution"].startswith(HASTY_OPENER.split()[0])
        val = make_item(i, 3, "validation", render=False, trace_error_kind="hasty")
        assert not val["solution"].startswith(HASTY_OPENER.split()[0])
    assert 10 < slipped < 40


def test_a_restricted_mix_is_balanced_over_its_own_pairs() -> None:
    """`tasks`/`difficulties`: only the chosen pairs, each once per block of len(tasks) * len(levels) rows."""
    tasks, levels = ("count", "arithmetic"), (1, 3)
    rows = generate_items(40, seed=3, render=False, tasks=tasks, difficulties=levels)
    for block in range(0, 40, 4):
        assert sorted((r["subject"], r["difficulty"]) for r in rows[block:block + 4]) == sorted(
            (t, d) for t in tasks for d in levels
        )
    assert all(r["answer"] == _recount(r) for r in rows)
    full = generate_items(25, seed=3, render=False)  # the default is the full mix, unchanged
    assert full == generate_items(25, seed=3, render=False, tasks=TASKS, difficulties=DIFFICULTIES)
    assert Counter(r["subject"] for r in full) == dict.fromkeys(TASKS, 5)


@pytest.mark.parametrize(("tasks", "levels", "match"), [
    (("count", "sorting"), (1,), "tasks"), ((), (1,), "tasks"), (("count", "count"), (1,), "tasks"),
    (("count",), (0, 1), "difficulties"), (("count",), (), "difficulties"),
])
def test_a_bad_mix_raises_naming_what_is_wrong(tasks, levels, match) -> None:
    with pytest.raises(ValueError, match=match):
        generate_items(1, seed=0, tasks=tasks, difficulties=levels)


def test_cli_mix_flags_reach_the_rows_and_meta(tmp_path: Path) -> None:
    out = tmp_path / "mix"
    cmd = [sys.executable, "-m", "app.make_data", str(out), "--n-train", "12", "--n-val", "6", "--quiet",
           "--tasks", "two_images", "count", "--difficulties", "2", "3"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tasks"] == meta["args"]["tasks"] == ["two_images", "count"] and meta["difficulties"] == [2, 3]
    assert set(meta["splits"]["train"]["by_task_difficulty"]) == {"two_images/2", "two_images/3", "count/2", "count/3"}
    bad = subprocess.run([*cmd[:4], "--difficulties", "2", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--tasks/--difficulties" in bad.stderr and "[2, 2]" in bad.stderr
