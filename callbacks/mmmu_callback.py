"""MMMU evaluation inside a Lightning run: sample answers, score them with the official rules, log, write files.

`MMMUEvalCallback` loads MMMU once (HF layout ``<data_dir>/<Subject>/<split>-*.parquet``; missing subjects
and skipped rows are logged by id), then evaluates every ``every_n_steps`` optimiser steps during ``fit``
and/or at the end of each validation epoch (``fit`` and ``validate``; never during the sanity check).

An evaluation samples ``num_samples`` responses per question with the module's rollout engine
(``pl_module.rollout``; modules without one, such as SFT, get an ``HFRolloutEngine``), scores each sample
with ``modules.mmmu_rules.score_item`` and averages the samples of a question before the instance-weighted
aggregation (the paper's Avg@5 at temperature 1.0 is ``num_samples=5, temperature=1.0``). It writes

* ``<out_dir>/step_<k>/<Subject>/output.json``: the official parse-and-eval layout, one entry per sample,
  so ``python -m app.mmmu score <out_dir>/step_<k> --seed <seed>`` reproduces every figure;
* ``<out_dir>/step_<k>/scores.json``: the aggregate, the settings and what was missing or skipped;

and logs ``mmmu/acc``, ``mmmu/acc_strict``, ``mmmu/unparsed_frac``, ``mmmu/response_length`` (tokens),
``mmmu/truncated_frac``, ``mmmu/num``, ``mmmu/discipline/<name>`` and ``mmmu/subject/<name>`` (acc) to
every logger at ``trainer.global_step``; ``pl_module.log(..., logger=False)`` also puts them in
``trainer.callback_metrics`` so a checkpoint can monitor ``mmmu/acc``. Discipline names are written with
``_and_`` for `` & `` and ``_`` for spaces (``Art_and_Design``).

Judge mode (``judge=OptionJudge(...)``, recipe.md section 6.2): each rank sends the multiple-choice
responses the official rules cannot parse to a judge model, which maps the text after ``</think>`` to an
option; ``mmmu/acc_judge`` (strict rules, or the judge chose the gold), ``mmmu/judged_frac`` and
``mmmu/judge_errors`` are logged beside ``acc`` and ``acc_strict``, ``scores.json`` gets a ``judge``
summary and ``step_<k>/judge.json`` lists every judged response, which ``app.mmmu score`` replays.

Sampling is reproducible and leaves training untouched: the engine's state (``state_dict``) is saved, the
engine is reseeded with ``seed + rank`` for the evaluation and the state is restored afterwards, so the
training rollouts are the same with or without this callback (an engine whose ``reseed`` is a no-op, such
as vLLM's, samples the evaluation from its own seed and call count). Each module's train/eval mode is
restored after.

Several processes: rank r evaluates items r, r+W, r+2W, ... and the per-question results are gathered
with ``torch.distributed.all_gather_object``; every rank then aggregates the same list (the seeded scoring
is deterministic), rank 0 writes the files. Generation calls the unwrapped policy, so this suits DDP; with
sharded strategies (FSDP) the ranks' batch counts may differ by one, which sharded forwards do not allow.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.mmmu import LoadReport, MMMUItem, load_mmmu, write_predictions
from datamodules.prompting import PromptCollator
from datamodules.types import PromptRecord
from modules.mmmu_judge import OptionJudge, apply_judge, needs_judge, verdict_record
from modules.mmmu_rules import EXTRACTION_MODES, aggregate, score_item

PREFIX = "mmmu"


def metric_tag(name: str) -> str:
    """A discipline or subject name as a metric-tag component (no spaces or ``&``)."""
    return name.replace(" & ", "_and_").replace("&", "_and_").replace(" ", "_")


def prompt_record(item: MMMUItem) -> PromptRecord:
    """The prompt of an item as a record whose question already holds options and instruction."""
    record = item.to_prompt_record()
    record.options = []
    return record


def gather_objects(obj: Any) -> list[Any]:
    """``[obj]`` in one process; the list of every rank's ``obj`` (rank order) under torch.distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


@contextmanager
def seeded_engine(engine: Any, seed: int) -> Iterator[None]:
    """Seed the engine for the duration (``reseed``, else its torch ``generator``), then restore its state."""
    state = engine.state_dict()
    generator = getattr(engine, "generator", None)
    if callable(getattr(engine, "reseed", None)):
        engine.reseed(seed)
    elif isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
    try:
        yield
    finally:
        if state:
            engine.load_state_dict(state)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the duration; every submodule's own mode is restored after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


class MMMUEvalCallback(Callback):
    """Evaluate on MMMU during training and validation (see the module docstring for files and metrics).

    Args:
        data_dir: MMMU folder in the HF layout ``<data_dir>/<Subject>/<split>-*.parquet``.
        split: MMMU split (validation is the paper's headline; dev has 5 per subject; test has no answers).
        every_n_steps: evaluate during fit each time the optimiser step count reaches a multiple of N
            (None = never during training).
        on_validation: evaluate at the end of every validation epoch (needed for ``validate``).
        limit_per_subject: first N usable questions of each subject (None = all).
        subjects: subjects to evaluate (None = all 30); names as the folders, e.g. ``Computer_Science``.
        num_samples: responses per question, averaged per question (paper: 5, "Avg@5").
        temperature: sampling temperature (paper: 1.0; 0 = greedy).
        max_new_tokens: response budget (paper: 16384; None = the rollout engine's own).
        batch_size: questions per generate call (each brings num_samples responses).
        out_dir: where ``step_<k>/`` folders go (None = ``<trainer.log_dir>/mmmu``).
        seed: seed of the sampler during evaluation and of the official random multiple-choice fallback.
        extraction_mode: answer extraction before the official rules: prefilled (R1V3 template: text after
            ``</think>``), optional (think tags optional), raw (the whole response, as the official script).
        judge: judge mode (``modules.mmmu_judge.OptionJudge``, a model behind an OpenAI-compatible endpoint):
            multiple-choice responses the official rules cannot parse are mapped to an option by the judge;
            adds ``mmmu/acc_judge``, ``mmmu/judged_frac`` and ``mmmu/judge_errors``, and ``judge.json`` (every
            judged response: id, sample, letter, reply, error) in the step folder. None: rules only.
    """

    def __init__(
        self,
        data_dir: str,
        split: str = "validation",
        every_n_steps: int | None = None,
        on_validation: bool = True,
        limit_per_subject: int | None = None,
        subjects: list[str] | None = None,
        num_samples: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        batch_size: int = 8,
        out_dir: str | None = None,
        seed: int = 0,
        extraction_mode: str = "prefilled",
        judge: OptionJudge | None = None,
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("num_samples", num_samples),
                            ("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                            ("limit_per_subject", limit_per_subject)):
            if value is not None and value < 1:
                raise ValueError(f"MMMUEvalCallback.{name} must be >= 1, got {value}")
        if extraction_mode not in EXTRACTION_MODES:
            raise ValueError(f"extraction_mode must be one of {EXTRACTION_MODES}, got {extraction_mode!r}")
        self.data_dir, self.split = data_dir, split
        self.every_n_steps, self.on_validation = every_n_steps, on_validation
        self.limit_per_subject, self.subjects = limit_per_subject, subjects
        self.num_samples, self.temperature, self.max_new_tokens = num_samples, temperature, max_new_tokens
        self.batch_size, self.out_dir, self.seed = batch_size, out_dir, seed
        self.extraction_mode, self.judge = extraction_mode, judge
        self.items: list[MMMUItem] | None = None
        self.load_report: LoadReport | None = None
        self.last_scores: dict[str, Any] | None = None
        self.last_dir: Path | None = None
        self._engine: Any = None
        self._next_step: int | None = None
        self._done_step: int | None = None

    # -- set-up -----------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.items is not None:
            return
        self.items, self.load_report = load_mmmu(self.data_dir, self.split, self.subjects, self.limit_per_subject)
        self._report_load(self.load_report)
        if not self.items:
            raise ValueError(f"MMMU: no usable {self.split!r} items under {self.data_dir} "
                             f"(missing subjects: {self.load_report.missing_subjects}; "
                             f"skipped: {self.load_report.skipped})")

    @staticmethod
    def _report_load(report: LoadReport) -> None:
        """One info line, plus a warning naming every missing subject and skipped id."""
        rank_zero_info(f"MMMU {report.split}: {report.items_loaded} questions from "
                       f"{len(report.subjects_loaded)} subjects ({report.rows_read} rows read)")
        if report.missing_subjects:
            rank_zero_warn(f"MMMU {report.split}: {len(report.missing_subjects)} subjects have no data and are "
                           f"left out of every figure: {report.missing_subjects}")
        for reason, ids in sorted(report.skipped.items()):
            rank_zero_warn(f"MMMU {report.split}: skipped {len(ids)} rows ({reason}): {ids}")
        if report.unreferenced_images:
            rank_zero_info(f"MMMU: images never referenced in the text were put first for "
                           f"{report.unreferenced_images}")
        if report.unresolved_markers:
            rank_zero_info(f"MMMU: image markers with no image column were kept as text (items kept, as the "
                           f"official scoring does): {report.unresolved_markers}")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_steps is not None:
            self._next_step = (trainer.global_step // self.every_n_steps + 1) * self.every_n_steps

    # -- triggers ---------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Fires once the step count reaches the next multiple of N (a batch may hold several steps)."""
        if self._next_step is None or trainer.global_step < self._next_step:
            return
        self._next_step = (trainer.global_step // self.every_n_steps + 1) * self.every_n_steps
        self.evaluate(trainer, pl_module, log_on_step=True)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.on_validation or trainer.sanity_checking:
            return
        self.evaluate(trainer, pl_module, log_on_step=False)

    # -- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, trainer: Trainer, pl_module: LightningModule, log_on_step: bool) -> dict[str, Any]:
        """Generate, gather, score, write and log; returns the scores.json content."""
        if self.items is None:
            self.setup(trainer, pl_module, "validate")
        step = trainer.global_step
        if trainer.state.fn == "fit" and self._done_step == step:
            return self.last_scores or {}  # validation at the same step as the periodic evaluation
        mine = list(enumerate(self.items))[trainer.global_rank::trainer.world_size]
        rank_zero_info(f"MMMU step {step}: {len(self.items)} questions x {self.num_samples} samples "
                       f"(rank 0 shard: {len(mine)}, batch {self.batch_size})")
        engine = self._rollout_engine(pl_module)
        with eval_mode(pl_module), seeded_engine(engine, self.seed + trainer.global_rank):
            rows = self._generate(engine, pl_module, mine, step)
        if self.judge is not None:
            self._ask_judge(rows, step)
        rows = sorted((r for part in gather_objects(rows) for r in part), key=lambda r: r["index"])
        scores = self._score(rows, step)
        metrics = self.metrics(scores, rows)
        if trainer.is_global_zero:
            self.last_dir = self._write(trainer, step, rows, scores)
        self._log(trainer, pl_module, metrics, log_on_step)
        judged = f", acc_judge {metrics[f'{PREFIX}/acc_judge']:.4f}" if self.judge is not None else ""
        rank_zero_info(f"MMMU step {step}: acc {metrics[f'{PREFIX}/acc']:.4f}, acc_strict "
                       f"{metrics[f'{PREFIX}/acc_strict']:.4f}{judged}, unparsed {metrics[f'{PREFIX}/unparsed_frac']:.3f}"
                       f" over {len(rows)} questions" + (f" -> {self.last_dir}" if self.last_dir else ""))
        self.last_scores, self._done_step = scores, step
        return scores

    def _rollout_engine(self, pl_module: LightningModule) -> Any:
        """The module's rollout engine, or an HF sampler of our own for modules without one."""
        engine = getattr(pl_module, "rollout", None)
        if engine is not None:
            return engine
        if self._engine is None:
            from modules.rollout import HFRolloutEngine

            self._engine = HFRolloutEngine(temperature=self.temperature, max_new_tokens=self.max_new_tokens or 64)
        self._engine.setup(pl_module.policy, pl_module.processor, pl_module.device, self.seed)
        return self._engine

    def _generate(self, engine: Any, pl_module: LightningModule, mine: Sequence[tuple[int, MMMUItem]],
                  step: int) -> list[dict[str, Any]]:
        """Sample this rank's questions; one row per question: index, texts, token lengths, truncation."""
        collator = PromptCollator(pl_module.processor, mode="rl", instruction="")
        n_batches, rows = math.ceil(len(mine) / self.batch_size), []
        every = max(1, n_batches // 10)
        for b in range(n_batches):
            chunk = mine[b * self.batch_size:(b + 1) * self.batch_size]
            batch = collator([prompt_record(item) for _, item in chunk]).to(pl_module.device)
            out = engine.generate(pl_module.policy, batch, self.num_samples, temperature=self.temperature,
                                  max_new_tokens=self.max_new_tokens)
            lengths, truncated, g = out.response_mask.sum(1).tolist(), out.truncated.tolist(), self.num_samples
            for j, (index, _) in enumerate(chunk):
                rows.append({"index": index, "texts": list(out.texts[j * g:(j + 1) * g]),
                             "lengths": [int(x) for x in lengths[j * g:(j + 1) * g]],
                             "truncated": [bool(x) for x in truncated[j * g:(j + 1) * g]]})
            if (b + 1) % every == 0 or b + 1 == n_batches:
                rank_zero_info(f"MMMU step {step}: batch {b + 1}/{n_batches}")
        return rows

    def _ask_judge(self, rows: list[dict[str, Any]], step: int) -> None:
        """This rank's judge calls: ``row["judge"][k]`` is the verdict record of sample k, or None (not asked)."""
        asks = []
        for row in rows:
            item = self.items[row["index"]]
            row["judge"] = [None] * len(row["texts"])
            for k, text in enumerate(row["texts"]):
                answer = needs_judge(text, item.question_type, item.all_choices, item.index2ans,
                                     self.extraction_mode)
                if answer is not None:
                    asks.append((row, k, (item.question, item.index2ans, answer)))
        rank_zero_info(f"MMMU step {step}: asking the judge ({self.judge.client.url}) about {len(asks)} "
                       f"responses the rules cannot parse (rank 0)")
        verdicts = self.judge.choose([question for _, _, question in asks]) if asks else []
        for (row, k, _), verdict in zip(asks, verdicts, strict=True):
            row["judge"][k] = verdict_record(verdict)
        errors = sum(v.error is not None for v in verdicts)
        if errors:
            rank_zero_warn(f"MMMU step {step}: {errors} of {len(asks)} judge calls to {self.judge.client.url} "
                           f"failed (those responses count as unparsed in acc_judge); first: "
                           f"{next(v.error for v in verdicts if v.error)}")

    def _score(self, rows: Sequence[dict[str, Any]], step: int) -> dict[str, Any]:
        """Official scoring of every sample (rng seeded by seed, id, sample as `app.mmmu`) and aggregation."""
        results, judged = [], []
        for row in rows:
            item = self.items[row["index"]]
            for k, text in enumerate(row["texts"]):
                sample = k if self.num_samples > 1 else 0
                rng = random.Random(f"{self.seed}:{item.id}:{sample}")
                scored = score_item(text, item.question_type, item.gold, item.all_choices, item.index2ans, rng,
                                    self.extraction_mode)
                if self.judge is not None:
                    verdict = row["judge"][k]
                    scored = apply_judge(scored, item.gold, verdict)
                    if verdict is not None:
                        judged.append({"id": item.id, "subject": item.subject, "sample": sample, **verdict})
                results.append({"id": item.id, "subject": item.subject, **scored})
        scores = aggregate(results)
        if self.judge is not None:
            scores["judge"] = {**self.judge.describe(), "asked": len(judged),
                               "decided": sum(j["letter"] is not None for j in judged),
                               "errors": sum(j["error"] is not None for j in judged), "record": "judge.json",
                               "items": judged}
        report = self.load_report
        scores["settings"] = {
            "step": step, "split": self.split, "seed": self.seed, "mode": self.extraction_mode,
            "num_samples": self.num_samples, "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens, "limit_per_subject": self.limit_per_subject,
        }
        scores["data"] = {"data_dir": str(self.data_dir), "missing_subjects": list(report.missing_subjects),
                          "skipped": dict(report.skipped), "items": len(self.items)}
        return scores

    @staticmethod
    def metrics(scores: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Flat metric dict (``mmmu/...``) from the aggregate and the generated rows."""
        overall = scores["overall"]
        lengths = [x for r in rows for x in r["lengths"]]
        truncated = [x for r in rows for x in r["truncated"]]
        keys = ("acc", "acc_strict", "unparsed_frac", "num", "acc_judge", "judged_frac")
        out = {f"{PREFIX}/{k}": float(overall[k]) for k in keys if k in overall}
        if "judge" in scores:
            out[f"{PREFIX}/judge_errors"] = float(scores["judge"]["errors"])
        out[f"{PREFIX}/response_length"] = sum(lengths) / max(1, len(lengths))
        out[f"{PREFIX}/truncated_frac"] = sum(truncated) / max(1, len(truncated))
        for kind, key in (("discipline", "disciplines"), ("subject", "subjects")):
            for name, values in scores[key].items():
                out[f"{PREFIX}/{kind}/{metric_tag(name)}"] = float(values["acc"])
        return out

    def _write(self, trainer: Trainer, step: int, rows: Sequence[dict[str, Any]],
               scores: dict[str, Any]) -> Path:
        """Predictions in the official layout plus scores.json under ``<out_dir>/step_<k>``."""
        root = Path(self.out_dir) if self.out_dir else Path(trainer.log_dir or trainer.default_root_dir) / PREFIX
        folder = root / f"step_{step}"
        items = [self.items[r["index"]] for r in rows]
        responses = [r["texts"] if self.num_samples > 1 else r["texts"][0] for r in rows]
        write_predictions(folder, items, responses)
        if "judge" in scores:  # the judged responses in their own file; scores.json keeps the summary
            judge = dict(scores["judge"])
            (folder / "judge.json").write_text(json.dumps(judge.pop("items"), indent=2, ensure_ascii=False),
                                               encoding="utf-8")
            scores = {**scores, "judge": judge}
        (folder / "scores.json").write_text(json.dumps(scores, indent=2), encoding="utf-8")
        return folder

    @staticmethod
    def _log(trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float], on_step: bool) -> None:
        """To every logger at the current step, and into callback_metrics (logger=False: no duplicates)."""
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        for name, value in metrics.items():
            pl_module.log(name, value, logger=False, on_step=on_step, on_epoch=not on_step,
                          prog_bar=name == f"{PREFIX}/acc", batch_size=1)
