"""MMMU judge mode: which responses go to the judge, how its replies parse, acc_judge by hand, the scorer's
live judge against a real localhost server, and the replay of a recorded judge.json without one."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from app.mmmu import main as mmmu_main
from app.mmmu import read_predictions, score_predictions
from modules.mmmu_judge import OptionJudge, apply_judge, needs_judge, parse_judge_letter
from modules.mmmu_rules import score_item
from tests.verifier_server import free_port, running_server, stats

CHOICES = ["A", "B", "C", "D"]
INDEX2ANS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


def entry(n: int, response: str, answer: str = "C", subject: str = "Art", **kw) -> dict:
    return {"id": f"validation_{subject}_{n}", "question_type": "multiple-choice", "answer": answer,
            "all_choices": CHOICES, "index2ans": INDEX2ANS, "response": response,
            "question": "Which colour is the sky?", **kw}


@pytest.mark.parametrize("reply, letter", [
    ("C", "C"), (" (B) green", "B"), ("**D**", "D"), ("Z", "Z"), ("A.", "A"), ("<think>x</think>B", "B"),
    ("E", None), ("The answer is C", None), ("", None), ("c", None), ("CD", None),
])
def test_parse_judge_letter(reply, letter):
    assert parse_judge_letter(reply, CHOICES) == letter


@pytest.mark.parametrize("response, mode, expected", [
    ("think</think> \\boxed{C}", "prefilled", None),  # the rules read it: no judge
    ("think</think> It is **blue**.", "prefilled", "It is **blue**."),
    ("think</think> It must be blue, the third colour of the list.", "prefilled", None),  # option text, > 5 words
    ("still thinking about blue", "prefilled", None),  # never finished thinking: nothing to judge
    ("the sky is blue today", "raw", "the sky is blue today"),
])
def test_needs_judge_only_for_responses_the_rules_cannot_parse(response, mode, expected):
    assert needs_judge(response, "multiple-choice", CHOICES, INDEX2ANS, mode) == expected
    assert needs_judge(response, "open", [], {}, mode) is None


def test_apply_judge_adds_the_judged_gold_only():
    rng = random.Random(0)
    scored = score_item("t</think> **blue**", "multiple-choice", "C", CHOICES, INDEX2ANS, rng)
    assert scored["unparsed"] and not scored["correct_strict"]
    assert apply_judge(scored, "C", {"letter": "C", "reply": "C", "error": None})["correct_judge"] is True
    assert apply_judge(scored, "C", {"letter": "B", "reply": "B", "error": None})["correct_judge"] is False
    assert apply_judge(scored, "C", None) == {**scored, "correct_judge": False, "judged": False}


def write_preds(root: Path, entries: list[dict]) -> Path:
    by_subject: dict[str, list[dict]] = {}
    for e in entries:
        by_subject.setdefault(e["id"].split("_")[1], []).append(e)
    for subject, items in by_subject.items():
        (root / subject).mkdir(parents=True, exist_ok=True)
        (root / subject / "output.json").write_text(json.dumps(items))
    return root


def test_score_with_a_live_judge_then_replay_its_record(tmp_path, capsys):
    entries = [entry(1, "t</think> \\boxed{C}"),                         # rules: right, not asked
               entry(2, "t</think> It is **blue**."),                    # judge says C: rescued
               entry(3, "t</think> It is **green**.", subject="Math"),   # judge says B: wrong
               entry(4, "t</think> It is **purple**."),                  # judge says Z: no option
               entry(5, "t</think> It is **teal**."),                    # garbage reply: error
               {**entry(6, "t</think> 42"), "question_type": "open", "answer": "42", "all_choices": [],
                "index2ans": {}}]
    preds = write_preds(tmp_path / "preds", entries)
    rules = [{"match": "**blue**", "reply": "C"}, {"match": "**green**", "reply": "B. green"},
             {"match": "**purple**", "reply": "Z"}, {"match": "**teal**", "reply": "I am not sure"}]
    with running_server(tmp_path, rules) as url:
        report = score_predictions(read_predictions(preds), judge=OptionJudge(url, "judge", max_retries=0))
        seen = stats(url)
    assert seen["requests"] == 4 and all("Which colour is the sky?" in t and "B. green" in t for t in seen["texts"])
    overall = report["overall"]
    assert overall["acc_strict"] == pytest.approx(2 / 6)  # items 1 and 6
    assert overall["acc_judge"] == pytest.approx(3 / 6)   # + item 2
    assert overall["judged_frac"] == pytest.approx(2 / 6)  # items 2 and 3 got an option
    assert report["judge"]["asked"] == 4 and report["judge"]["decided"] == 2 and report["judge"]["errors"] == 1
    by_id = {j["id"]: j for j in report["judge"]["items"]}
    assert by_id["validation_Art_2"]["letter"] == "C" and by_id["validation_Art_5"]["error"]
    assert report["subjects"]["Math"]["acc_judge"] == 0.0

    (preds / "judge.json").write_text(json.dumps(report["judge"]["items"]))  # as the callback records it
    assert mmmu_main(["score", str(preds)]) == 0  # no server: replays the record
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["overall"] == overall
    assert mmmu_main(["score", str(preds), "--no-judge-record"]) == 0
    assert "acc_judge" not in json.loads(capsys.readouterr().out)["overall"]


def test_a_dead_judge_decides_nothing_and_is_counted(tmp_path):
    preds = write_preds(tmp_path / "preds", [entry(1, "t</think> It is **blue**.")])
    judge = OptionJudge(f"http://127.0.0.1:{free_port()}/v1", "judge", max_retries=0)
    report = score_predictions(read_predictions(preds), judge=judge)
    assert report["overall"]["acc_judge"] == 0.0 and report["judge"]["errors"] == 1
    assert "cannot reach" in report["judge"]["items"][0]["error"]
