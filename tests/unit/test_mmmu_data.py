"""MMMU loading from the HF parquet layout, prediction writing and the `app.mmmu score` CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.mmmu import main as mmmu_main
from app.mmmu import read_predictions, score_predictions
from datamodules.mmmu import BadRow, MMMUItem, load_mmmu, parse_options, write_predictions
from modules.mmmu_rules import SUBJECTS
from tests.mmmu_fixture import BAD_KINDS, FixtureSummary, png_bytes, write_mmmu_fixture, write_rows

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FixtureSummary]:
    root = tmp_path_factory.mktemp("mmmu")
    return root, write_mmmu_fixture(root, per_subject=3, seed=0)


@pytest.fixture(scope="module")
def loaded(fixture_dir: tuple[Path, FixtureSummary]) -> list[MMMUItem]:
    items, report = load_mmmu(fixture_dir[0])
    assert not report.skipped and not report.missing_subjects
    return items


def test_fixture_loads_every_item(fixture_dir: tuple[Path, FixtureSummary], loaded: list[MMMUItem]) -> None:
    summary = fixture_dir[1]
    assert {i.id for i in loaded} == set(summary.items) and len(loaded) == 90
    for item in loaded:
        exp = summary.items[item.id]
        assert (item.subject, item.question_type, item.answer) == (exp["subject"], exp["question_type"],
                                                                   exp["answer"])
        assert len(item.options) == exp["n_options"]
        assert item.image_slots == exp["image_slots"]
        assert [im.size[0] - 8 for im in item.images] == exp["image_slots"]  # width encodes the column
        assert item.prompt_text.count("<image>") == len(item.images)
        assert "<image " not in item.prompt_text
    mc_sizes = {len(i.options) for i in loaded if i.question_type == "multiple-choice"}
    assert set(range(2, 10)) <= mc_sizes
    assert {i.question_type for i in loaded} == {"multiple-choice", "open"}


def test_dev_split(fixture_dir: tuple[Path, FixtureSummary]) -> None:
    items, report = load_mmmu(fixture_dir[0], split="dev")
    assert [i.id for i in items] == fixture_dir[1].dev_ids
    assert report.items_loaded == 30


def test_markers_in_options_set_image_order(loaded: list[MMMUItem]) -> None:
    item = next(i for i in loaded if i.options and i.options[0] == "<image 1>")
    assert item.image_slots == [3, 1, 2]
    assert [im.size[0] for im in item.images] == [11, 9, 10]
    assert "Given <image>, which picture matches?" in item.prompt_text
    assert "\nA. <image>\nB. <image>\nC. none of them\n" in item.prompt_text
    assert item.prompt_text.endswith("the letter of the correct option in \\boxed{}.")
    assert item.index2ans["A"] == "<image 1>" and item.all_choices == ["A", "B", "C"]


def test_prompt_record(loaded: list[MMMUItem]) -> None:
    item = next(i for i in loaded if i.answer.startswith("["))
    rec = item.to_prompt_record()
    assert item.gold == ["24/7", "3/7"] and rec.answer == "24/7"
    assert rec.question_type == "open" and rec.options == [] and rec.difficulty == 2
    assert rec.question == item.prompt_text and rec.question.endswith("final answer in \\boxed{}.")
    assert len(rec.images) == 1 and rec.subject == item.subject


def test_missing_subjects_reported(tmp_path: Path) -> None:
    write_mmmu_fixture(tmp_path, per_subject=2)
    shutil.rmtree(tmp_path / "Music")
    (tmp_path / "Physics" / "validation-00000-of-00001.parquet").unlink()
    items, report = load_mmmu(tmp_path)
    assert report.missing_subjects == ["Music", "Physics"]
    assert len(items) == 56 and len(report.subjects_loaded) == 28


def test_bad_rows_counted_by_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    summary = write_mmmu_fixture(tmp_path / "data", per_subject=2,
                                 bad_rows={"Art": list(BAD_KINDS), "Math": ["bad_options", "bad_answer"]})
    items, report = load_mmmu(tmp_path / "data")
    assert len(items) == 60
    assert report.skipped == summary.bad
    assert report.skipped_counts == {"missing_image": 1, "bad_options": 3, "unknown_question_type": 1,
                                     "bad_answer": 2, "bad_image": 1}
    assert report.rows_read == 68 and report.to_dict()["skipped_counts"]["bad_options"] == 3
    assert not (tmp_path / "PWNED").exists()  # the options string was never executed


def test_options_parsing_is_literal_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_options("['a', \"b\", 3]") == ["a", "b", "3"]
    for bad in ("__import__('os').system('touch PWNED')", "['a',", "{'a': 1}", "[['nested']]", None):
        with pytest.raises(BadRow) as err:
            parse_options(bad)
        assert err.value.reason == "bad_options"
    assert not (tmp_path / "PWNED").exists()


def _row(item_id: str, question: str, images: dict[int, bytes], options: str = "['x', 'y']") -> dict:
    row = {"id": item_id, "question": question, "options": options, "answer": "A",
           "question_type": "multiple-choice", "img_type": "['Photos']", "topic_difficulty": "Hard"}
    row.update({f"image_{n}": data for n, data in images.items()})
    return row


def test_repeated_and_unreferenced_images(tmp_path: Path) -> None:
    rows = [_row("validation_Art_1", "<image 2> vs <image 1>, again <image 2>?", {1: png_bytes(1),
                                                                                   2: png_bytes(2)}),
            _row("validation_Art_2", "What is shown?", {1: png_bytes(1)})]
    write_rows(tmp_path / "Art" / "validation.parquet", rows)  # the un-sharded file name
    items, report = load_mmmu(tmp_path, subjects=["Art"])
    first, second = items
    assert first.image_slots == [2, 1] and first.prompt_text.startswith("<image> vs <image>, again [image 1]?")
    assert second.prompt_text.startswith("<image>\nWhat is shown?") and second.image_slots == [1]
    assert report.unreferenced_images == ["validation_Art_2"]
    assert report.missing_subjects == []


def test_limit_and_errors(fixture_dir: tuple[Path, FixtureSummary], tmp_path: Path) -> None:
    items, _ = load_mmmu(fixture_dir[0], subjects=["Math", "Art"], limit_per_subject=2)
    assert [i.id for i in items] == ["validation_Math_1", "validation_Math_2", "validation_Art_1",
                                     "validation_Art_2"]
    with pytest.raises(ValueError, match="Maths"):
        load_mmmu(fixture_dir[0], subjects=["Maths"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mmmu(tmp_path / "nowhere")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "Art").mkdir()
    pq.write_table(pa.table({"id": ["validation_Art_1"]}), tmp_path / "Art" / "validation.parquet")
    with pytest.raises(ValueError, match=r"Art/validation\.parquet.*missing required columns"):
        load_mmmu(tmp_path, subjects=["Art"])


def test_reads_files_written_by_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    row = _row("validation_Music_1", "<image 1> Which?", {1: png_bytes(1)}, options="['do', 're', 'mi']")
    cols = {k: [v] for k, v in row.items() if k != "image_1"}
    cols["image_1"] = [{"bytes": png_bytes(1), "path": None}]
    ds = datasets.Dataset.from_dict(cols).cast_column("image_1", datasets.Image())
    ds.to_parquet(str(tmp_path / "Music" / "validation-00000-of-00001.parquet"))
    items, report = load_mmmu(tmp_path, subjects=["Music"])
    assert report.items_loaded == 1 and items[0].images[0].size == (9, 8)
    assert items[0].options == ["do", "re", "mi"]


# ------------------------------------------------------------------------------ predictions + CLI

def _responses(items: list[MMMUItem]) -> list[str]:
    """Item 1 of each subject right, item 2 wrong, item 3 cut off (no </think>)."""
    out = []
    for item in items:
        n = int(item.id.rsplit("_", 1)[1])
        gold = item.gold if isinstance(item.gold, str) else item.gold[-1]
        if item.question_type == "multiple-choice":
            wrong = item.all_choices[(item.all_choices.index(gold) + 1) % len(item.all_choices)]
        else:
            wrong = "999"
        out.append({1: f"ok</think>\\boxed{{{gold}}}", 2: f"no</think> The answer is ({wrong})",
                    3: f"thinking about ({gold}) forever"}[n])
    return out


def test_write_predictions_and_cli(loaded: list[MMMUItem], tmp_path: Path) -> None:
    paths = write_predictions(tmp_path / "preds", loaded, _responses(loaded))
    assert set(paths) == set(SUBJECTS)
    entry = json.loads(paths["Art"].read_text())[0]
    assert set(entry) == {"id", "question_type", "answer", "all_choices", "index2ans", "response", "question"}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "app.mmmu", "score", str(tmp_path / "preds"), "--seed", "3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(proc.stdout)
    overall = out["overall"]
    assert overall["num"] == 90 and overall["acc_strict"] == pytest.approx(30 / 90)
    assert overall["unparsed_frac"] == pytest.approx(30 / 90)
    assert 30 / 90 <= overall["acc"] <= 60 / 90
    assert out["subjects"]["Math"]["acc_strict"] == pytest.approx(1 / 3) and len(out["subjects"]) == 30
    assert out["disciplines"]["Tech & Engineering"]["num"] == 21 and len(out["disciplines"]) == 6
    assert out == score_predictions(read_predictions(tmp_path / "preds"), seed=3)  # same seeded figure


def test_multi_sample_predictions_average_per_id(loaded: list[MMMUItem], tmp_path: Path) -> None:
    items = [i for i in loaded if i.subject == "Math"][:2]
    golds = [i.gold if isinstance(i.gold, str) else i.gold[0] for i in items]
    responses = [[f"</think>\\boxed{{{golds[0]}}}", "</think>\\boxed{999}"], f"</think>\\boxed{{{golds[1]}}}"]
    write_predictions(tmp_path / "p", items, responses)
    out = score_predictions(read_predictions(tmp_path / "p"))
    assert out["overall"]["acc_strict"] == pytest.approx(0.75) and out["overall"]["num_responses"] == 3


def test_cli_errors_name_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mmmu_main(["score", str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err
    bad = tmp_path / "preds" / "Art" / "output.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    assert mmmu_main(["score", str(tmp_path / "preds")]) == 2
    assert str(bad) in capsys.readouterr().err
    bad.write_text(json.dumps([{"id": "validation_Art_1", "question_type": "open", "answer": "1"}]))
    assert mmmu_main(["score", str(tmp_path / "preds")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "entry 0" in err and "response" in err


# ----------------------------------------------------------------------------------------------------------
# Issue 22 item 10: outputs of models that never write </think> (the official example outputs' layout)


def _official_layout(root: Path, responses: dict[str, list[str]]) -> Path:
    """<root>/<Subject>/output.json with MC entries as the official llava1.5 example outputs: no think tags."""
    for subject, texts in responses.items():
        entries = [{"id": f"validation_{subject}_{i + 1}", "question_type": "multiple-choice", "answer": "B",
                    "all_choices": ["A", "B", "C", "D"],
                    "index2ans": {"A": "red", "B": "green", "C": "blue", "D": "black"}, "response": text}
                   for i, text in enumerate(texts)]
        (root / subject).mkdir(parents=True, exist_ok=True)
        (root / subject / "output.json").write_text(json.dumps(entries))
    return root


def test_no_think_outputs_are_scored_raw_and_said_loudly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _official_layout(tmp_path / "preds", {"Art": ["B", "(B) green", "A"],
                                                  "Math": ["x</think>\\boxed{B}", "still thinking (B)"]})
    assert mmmu_main(["score", str(root)]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    # Art has no </think> anywhere: scored raw, as the official script (2 of 3 right, none unparsed)
    assert out["subjects"]["Art"]["acc_strict"] == pytest.approx(2 / 3)
    assert out["subjects"]["Art"]["unparsed_frac"] == 0.0
    # Math has a </think>: the R1V3 reading, the cut-off response is unparsed
    assert out["subjects"]["Math"]["acc_strict"] == pytest.approx(1 / 2)
    assert out["settings"]["mode"] == "auto"
    assert out["settings"]["modes"] == {"Art": "raw", "Math": "prefilled"}
    assert "</think>" in captured.err and "Art" in captured.err and "raw" in captured.err
    assert "Math" not in captured.err


def test_explicit_prefilled_on_no_think_outputs_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _official_layout(tmp_path / "preds", {"Art": ["B", "(B) green", "A"]})
    assert mmmu_main(["score", str(root), "--mode", "prefilled"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["overall"]["unparsed_frac"] == 1.0 and out["settings"]["modes"] == {"Art": "prefilled"}
    assert "warning" in captured.err.lower() and "Art" in captured.err and "--mode raw" in captured.err


def test_auto_mode_follows_the_mode_a_folder_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder written by MMMUEvalCallback records its extraction mode in scores.json: auto re-scores with it."""
    root = _official_layout(tmp_path / "preds", {"Art": ["B", "(B) green", "A"]})
    (root / "scores.json").write_text(json.dumps({"settings": {"mode": "prefilled", "seed": 0}}))
    assert mmmu_main(["score", str(root)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["settings"]["modes"] == {"Art": "prefilled"}
    assert "scores.json" in captured.err


# ----------------------------------------------------------------------------------------------------------
# Issue 22 item 11: every item of MMMU-val is kept, unresolvable image markers stay as text


def test_official_counts_keep_every_item(tmp_path: Path) -> None:
    from tests.mmmu_fixture import (
        MATH_7_OPTIONS,
        OFFICIAL_VAL_ITEMS,
        OFFICIAL_VAL_MC,
        OFFICIAL_VAL_OPEN,
        write_official_counts_fixture,
    )

    summary = write_official_counts_fixture(tmp_path)
    items, report = load_mmmu(tmp_path)
    assert not report.skipped, report.skipped
    assert len(items) == report.items_loaded == OFFICIAL_VAL_ITEMS
    kinds = [i.question_type for i in items]
    assert kinds.count("multiple-choice") == OFFICIAL_VAL_MC and kinds.count("open") == OFFICIAL_VAL_OPEN
    per_subject = {s: sum(1 for i in items if i.subject == s) for s in SUBJECTS}
    assert per_subject == {s: sum(1 for v in summary.items.values() if v["subject"] == s) for s in SUBJECTS}
    math_7 = next(i for i in items if i.id == "validation_Math_7")
    assert math_7.options == MATH_7_OPTIONS and math_7.image_slots == [1] and len(math_7.images) == 1
    assert "A. <image 7>, <image 8>" in math_7.prompt_text and math_7.prompt_text.count("<image>") == 1
    assert report.unresolved_markers == {"validation_Math_7": list(range(7, 31))}
    assert report.to_dict()["unresolved_markers"]["validation_Math_7"][-1] == 30
