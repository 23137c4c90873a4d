"""Score MMMU predictions in the official parse-and-eval layout.

    python -m app.mmmu score DIR [--seed 0] [--mode auto|prefilled|optional|raw] [--judge-url URL --judge-model NAME]

``DIR/<Subject>/output.json`` holds a list of ``{id, question_type, answer, all_choices, index2ans,
response}``. Several entries with one id are samples and are averaged per id. Prints JSON with overall,
per-discipline and per-subject ``acc`` (official rules, seeded random fallback), ``acc_strict`` (fallback
and unparsed count wrong), ``unparsed_frac`` and ``num``. The fallback draws from a ``random.Random``
seeded by (seed, id, sample), so a figure does not depend on file order.

Extraction mode ``auto`` (the default) decides per file, and says on stderr what it decided:
- a folder written by ``MMMUEvalCallback`` records its mode in ``DIR/scores.json``; auto re-scores with it;
- otherwise a file where some response contains ``</think>`` is read as R1V3 output (``prefilled``: the
  answer after ``</think>``, a response that never closes its thinking is unparsed);
- a file where no response contains ``</think>`` comes from a model that does not think in tags (the
  official example outputs, llava1.5): scoring it ``prefilled`` would make every response unparsed, so it
  is scored ``raw`` (whole response, as the official script) and a warning names it.
An explicit ``--mode prefilled|optional`` on such a file is kept, with a warning. The JSON records the
requested mode and, under ``settings.modes``, the mode used for each subject.

Judge mode adds ``acc_judge`` and ``judged_frac`` (``modules.mmmu_judge``): with ``--judge-url`` the
multiple-choice responses the rules cannot parse are sent to that OpenAI-compatible endpoint; without it, a
``DIR/judge.json`` written by the MMMU callback is replayed (its recorded verdicts), so the logged
``mmmu/acc_judge`` is reproduced without a server. The judged responses are listed under ``judge.items``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modules.mmmu_judge import OptionJudge, apply_judge, needs_judge, verdict_record
from modules.mmmu_rules import EXTRACTION_MODES, SUBJECTS, aggregate, score_item

ENTRY_KEYS = ("id", "question_type", "answer", "response")
SCORE_MODES = ("auto", *EXTRACTION_MODES)
THINK_CLOSE = "</think>"


class ScoreInputError(ValueError):
    """A prediction folder or file that cannot be scored; the message names the path."""


def _check_entry(entry: Any, path: Path, index: int) -> None:
    """Raise ScoreInputError naming the file and entry when an entry is malformed."""
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict):
        raise ScoreInputError(f"{where} is {type(entry).__name__}, expected an object")
    absent = [k for k in ENTRY_KEYS if k not in entry]
    if absent:
        raise ScoreInputError(f"{where} lacks keys {absent}")
    if not isinstance(entry["response"], str):
        raise ScoreInputError(f"{where}: 'response' must be a string")
    if entry["question_type"] == "multiple-choice":
        choices, index2ans = entry.get("all_choices"), entry.get("index2ans")
        if not isinstance(choices, list) or not choices or not isinstance(index2ans, dict):
            raise ScoreInputError(f"{where}: multiple-choice needs non-empty 'all_choices' and 'index2ans'")
        if not all(isinstance(v, str) for v in index2ans.values()):
            raise ScoreInputError(f"{where}: 'index2ans' values must be strings")


def read_predictions(root: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Subject -> entries for every ``<root>/<Subject>/output.json``; ScoreInputError when unusable."""
    base = Path(root)
    if not base.is_dir():
        raise ScoreInputError(f"prediction dir not found: {base}")
    files = sorted(base.glob("*/output.json"))
    if not files:
        raise ScoreInputError(f"{base}: no <Subject>/output.json files")
    out: dict[str, list[dict[str, Any]]] = {}
    for path in files:
        subject = path.parent.name
        if subject not in SUBJECTS:
            raise ScoreInputError(f"{path}: folder {subject!r} is not an MMMU subject")
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ScoreInputError(f"{path}: not readable JSON ({err})") from err
        if not isinstance(entries, list):
            raise ScoreInputError(f"{path}: expected a JSON list, got {type(entries).__name__}")
        for index, entry in enumerate(entries):
            _check_entry(entry, path, index)
        out[subject] = entries
    return out


def recorded_mode(root: str | Path) -> str | None:
    """The extraction mode a folder's ``scores.json`` records (written by MMMUEvalCallback), else None."""
    path = Path(root) / "scores.json"
    try:
        mode = json.loads(path.read_text(encoding="utf-8")).get("settings", {}).get("mode")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return mode if mode in EXTRACTION_MODES else None


def resolve_modes(
    predictions: dict[str, list[dict[str, Any]]], mode: str = "auto", recorded: str | None = None
) -> tuple[dict[str, str], list[str]]:
    """The extraction mode for each subject and the notes to print (see the module docstring)."""
    if mode not in SCORE_MODES:
        raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
    no_think = sorted(s for s, entries in predictions.items()
                      if not any(THINK_CLOSE in e["response"] for e in entries))
    notes: list[str] = []
    if mode == "auto" and recorded is not None:
        notes.append(f"note: scoring with --mode {recorded}, the extraction mode recorded in scores.json")
        return dict.fromkeys(predictions, recorded), notes
    if mode == "auto":
        if no_think:
            notes.append(f"warning: no response contains {THINK_CLOSE} in {len(no_think)} file(s) ({', '.join(no_think)}):"
                         " scored with --mode raw (whole response, as the official MMMU script); pass"
                         " --mode prefilled to count them as unfinished reasoning instead")
        return {s: "raw" if s in no_think else "prefilled" for s in predictions}, notes
    if no_think and mode != "raw":
        notes.append(f"warning: no response contains {THINK_CLOSE} in {len(no_think)} file(s) ({', '.join(no_think)});"
                     f" under --mode {mode} their responses are unparsed (acc_strict 0). For a model that does not"
                     " think in tags use --mode raw (or auto)")
    return dict.fromkeys(predictions, mode), notes


def read_judge_record(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(id, sample) -> recorded verdict from a ``judge.json`` written by the MMMU callback."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return {(str(e["id"]), int(e.get("sample", 0))): {k: e.get(k) for k in ("letter", "reply", "error")}
                for e in entries}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
        raise ScoreInputError(f"{path}: not a judge record (a JSON list of {{id, sample, letter, reply, "
                              f"error}}): {err}") from err


def judge_verdicts(predictions: dict[str, list[dict[str, Any]]], modes: dict[str, str], judge: OptionJudge | None,
                   recorded: dict[tuple[str, int], dict[str, Any]] | None) -> dict[tuple[str, int], dict]:
    """(id, sample) -> verdict record for every multiple-choice entry the rules cannot parse: asked live
    (``judge``) or looked up (``recorded``; an entry missing there stays undecided)."""
    asks = []
    for subject, entries in predictions.items():
        for entry in entries:
            text = needs_judge(entry["response"], entry["question_type"], entry.get("all_choices") or [],
                               entry.get("index2ans") or {}, modes[subject])
            if text is not None:
                key = (str(entry["id"]), int(entry.get("sample", 0)))
                asks.append((key, (str(entry.get("question", "")), entry.get("index2ans") or {}, text)))
    if judge is not None:
        verdicts = judge.choose([question for _, question in asks])
        return {key: verdict_record(v) for (key, _), v in zip(asks, verdicts, strict=True)}
    recorded = recorded or {}
    return {key: recorded[key] for key, _ in asks if key in recorded}


def score_predictions(
    predictions: dict[str, list[dict[str, Any]]], seed: int = 0, mode: str = "auto",
    judge: OptionJudge | None = None, recorded: dict[tuple[str, int], dict[str, Any]] | None = None,
    folder_mode: str | None = None,
) -> dict[str, Any]:
    """Score every entry (per-entry rng seeded by seed, id and sample index) and aggregate; with a judge or a
    recorded judge (``recorded``), also ``acc_judge`` and the judged entries.

    ``folder_mode`` is the extraction mode a callback folder's ``scores.json`` records (``auto`` uses it);
    ``settings.notes`` holds what ``resolve_modes`` decided, and ``main`` prints it to stderr.
    """
    modes, notes = resolve_modes(predictions, mode, folder_mode)
    judging = judge is not None or recorded is not None
    verdicts = judge_verdicts(predictions, modes, judge, recorded) if judging else {}
    results, judged = [], []
    for subject, entries in predictions.items():
        for entry in entries:
            key = (str(entry["id"]), int(entry.get("sample", 0)))
            rng = random.Random(f"{seed}:{entry['id']}:{entry.get('sample', 0)}")
            scored = score_item(entry["response"], entry["question_type"], entry["answer"],
                                entry.get("all_choices") or [], entry.get("index2ans") or {}, rng, modes[subject])
            if judging:
                scored = apply_judge(scored, entry["answer"], verdicts.get(key))
                if key in verdicts:
                    judged.append({"id": key[0], "subject": subject, "sample": key[1], **verdicts[key]})
            results.append({"id": entry["id"], "subject": subject, **scored})
    report = aggregate(results)
    report["settings"] = {"seed": seed, "mode": mode, "modes": dict(sorted(modes.items())), "notes": notes}
    if judging:
        source = judge.describe() if judge is not None else {"recorded": True}
        report["judge"] = {**source, "asked": len(judged), "decided": sum(j["letter"] is not None for j in judged),
                           "errors": sum(j["error"] is not None for j in judged), "items": judged}
    return report


def build_parser() -> argparse.ArgumentParser:
    """``score DIR [--seed N] [--mode M]``."""
    parser = argparse.ArgumentParser(prog="python -m app.mmmu", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score <DIR>/<Subject>/output.json files, print JSON")
    score.add_argument("dir", type=Path, help="folder in the official parse-and-eval layout")
    score.add_argument("--seed", type=int, default=0, help="seed of the random MC fallback (default 0)")
    score.add_argument("--mode", choices=SCORE_MODES, default="auto",
                       help="answer extraction: auto (default: the mode DIR/scores.json records, else prefilled"
                            " for files with </think> and raw for files without, said on stderr), prefilled"
                            " <think>, optional think tags, or raw (official: whole response)")
    score.add_argument("--judge-url", help="judge mode: OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) "
                                           "asked about multiple-choice responses the rules cannot parse")
    score.add_argument("--judge-model", default="judge", help="the judge's served model name (default: judge)")
    score.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request (default 60)")
    score.add_argument("--no-judge-record", action="store_true",
                       help="ignore DIR/judge.json (by default its recorded verdicts are replayed)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns the exit status (2 on unusable input, message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        judge = recorded = None
        if args.judge_url:
            judge = OptionJudge(args.judge_url, args.judge_model, timeout_s=args.judge_timeout)
        elif (args.dir / "judge.json").is_file() and not args.no_judge_record:
            recorded = read_judge_record(args.dir / "judge.json")
        report = score_predictions(read_predictions(args.dir), seed=args.seed, mode=args.mode, judge=judge,
                                   recorded=recorded, folder_mode=recorded_mode(args.dir))
    except (ScoreInputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in report["settings"]["notes"]:
        print(note, file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
