"""The paper's model-based verifier (recipe.md section 2.2): R_acc = rule check OR a verifier model says "same".

``VerifierReward`` asks a model served behind an OpenAI-compatible endpoint (``vllm serve <verifier>``)
whether a response's final answer (the last box after ``</think>``, as the rule check reads it) matches the
gold answer, given the question. ``RuleOrVerifier`` is the paper's accuracy: the rule check first, the
verifier asked only for the responses the rules reject, 1.0 when either says yes.

Availability is never the policy's problem: a verifier call that fails (connection refused, timeout after
retries, an HTTP error, or a reply that is neither yes nor no) gives no verdict, the response keeps its rule
score and the failure is counted. Only a verifier that fails more than ``max_error_share`` of its last
``error_window`` calls stops the run, with a message naming the endpoint.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import Any

from modules.answer import THINK_CLOSE, extract_answer
from modules.chat_client import ChatClient, EndpointError, describe, user_turn
from modules.rewards.base import Reward

log = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "You check whether a student's final answer to a problem is correct.\n\n"
    "Problem:\n{question}\n\n"
    "Reference answer: {gold}\n"
    "Student's final answer: {answer}\n\n"
    "Does the student's answer mean the same as the reference answer (the same value, expression, set or "
    "option, possibly written differently)? Reply with one word: yes or no."
)
Query = tuple[str, str, str]  # (question, gold, extracted answer): the cache key
_FIRST_WORD = re.compile(r"[a-z]+")


class VerifierUnavailable(RuntimeError):
    """The verifier failed too many of its recent calls; the message names the endpoint and the last error."""


def parse_verdict(reply: str, yes_words: Sequence[str], no_words: Sequence[str]) -> bool | None:
    """True / False when the reply's first word (after any ``</think>``) is a yes / no word; else None.

    Strict: ``"Yes."``, ``"**No**"``, ``"yes, they match"`` parse; ``"The answers match"``, ``"maybe"``, ``""``
    do not (None: the caller counts it as a failed call, so garbage never turns into a reward).

    >>> parse_verdict("Yes.", ["yes"], ["no"]), parse_verdict("I think so", ["yes"], ["no"])
    (True, None)
    """
    text = reply.rsplit(THINK_CLOSE, 1)[-1].lower()
    word = _FIRST_WORD.search(text)
    if word is None or text[:word.start()].strip(" \t\n*_`'\"#>:-") != "":
        return None
    if word.group(0) in yes_words:
        return True
    if word.group(0) in no_words:
        return False
    return None


def question_text(record: Mapping[str, Any], max_chars: int) -> str:
    """The record's question (cut to ``max_chars``), with its options lettered for multiple choice."""
    question = str(record.get("question") or "(not given)")[:max_chars]
    options = record.get("options") or []
    if options:
        question += "\nOptions:\n" + "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options[:26]))
    return question


class VerifierReward(Reward):
    """1.0 when the verifier model says the extracted answer matches the gold answer, else 0.0.

    Used alone it is a model-only accuracy; ``RuleOrVerifier`` ORs it with the rule check (the paper's R_acc).
    Every distinct (question, gold, answer) of a batch is asked once, concurrently; verdicts are cached (LRU
    of ``cache_size``), failures are not. Responses without a boxed answer after ``</think>`` are never asked.

    Args:
        base_url: OpenAI-compatible server, e.g. ``http://127.0.0.1:8000/v1`` (``vllm serve <verifier>``).
        model: served model name (``--served-model-name`` of vllm serve).
        prompt: user message; ``{question}``, ``{gold}`` and ``{answer}`` are filled in.
        system_prompt: optional system message.
        yes_words: first words of the reply that mean "matches" (compared lower-cased).
        no_words: first words that mean "does not match"; any other reply is a failed call.
        api_key_env: environment variable with a bearer token (None or unset: none sent).
        timeout_s: limit of one request try, in seconds.
        max_retries: further tries after a timeout, connection error, 429 or 5xx.
        retry_backoff_s: wait before the first retry, doubled for each further one.
        concurrency: requests in flight at once.
        max_tokens: reply cap (a one-word verdict needs few; a thinking verifier needs its budget).
        cache_size: verdicts kept (least recently used dropped first).
        max_answer_chars: longer extracted answers are not sent (scored as the rules say).
        max_question_chars: questions are cut to this many characters in the prompt.
        max_error_share: stop the run when more than this share of the last ``error_window`` calls failed
            (1.0: never stop).
        error_window: calls the failure share is measured over; it is checked once that many were made.
    """

    name = "verifier"

    def __init__(self, base_url: str, model: str, prompt: str = DEFAULT_PROMPT, system_prompt: str | None = None,
                 yes_words: list[str] | None = None, no_words: list[str] | None = None,
                 api_key_env: str | None = "OPENAI_API_KEY", timeout_s: float = 60.0, max_retries: int = 2,
                 retry_backoff_s: float = 0.5, concurrency: int = 64, max_tokens: int = 16, cache_size: int = 100_000,
                 max_answer_chars: int = 1000, max_question_chars: int = 8000, max_error_share: float = 0.5,
                 error_window: int = 64) -> None:
        super().__init__()
        missing = [k for k in ("{question}", "{gold}", "{answer}") if k not in prompt]
        if missing:
            raise ValueError(f"verifier prompt must contain {missing} (placeholders filled per item)")
        if not 0 < max_error_share <= 1 or error_window < 1 or cache_size < 0:
            raise ValueError("need 0 < max_error_share <= 1, error_window >= 1, cache_size >= 0")
        self.client = ChatClient(base_url, model, api_key_env, timeout_s, max_retries, retry_backoff_s,
                                 concurrency=concurrency, max_tokens=max_tokens)
        self.prompt, self.system_prompt = prompt, system_prompt
        self.yes_words = [w.lower() for w in (yes_words or ["yes"])]
        self.no_words = [w.lower() for w in (no_words or ["no"])]
        self.cache_size, self.max_answer_chars, self.max_question_chars = cache_size, max_answer_chars, max_question_chars
        self.max_error_share, self.error_window = max_error_share, error_window
        self.cache: OrderedDict[Query, bool] = OrderedDict()
        self.recent: deque[bool] = deque(maxlen=error_window)  # True = that call failed
        self.calls = self.failures = 0  # whole run
        self.failure_kinds: Counter[str] = Counter()  # timeout, connection, http, malformed, unparseable
        self.last_error: str | None = None
        self._stats = self._empty_stats()

    @staticmethod
    def _empty_stats() -> dict[str, float]:
        return {"calls": 0, "errors": 0, "cache_hits": 0, "seconds": 0.0}

    # -- queries ----------------------------------------------------------------------------------------------
    def query(self, response: str, record: Mapping[str, Any]) -> Query | None:
        """The cache key of a response, or None when there is nothing to ask (no answer, no gold, too long)."""
        answer = extract_answer(response) if isinstance(response, str) else None
        gold = str(record.get("answer", "")).strip()
        if not answer or not gold or len(answer) > self.max_answer_chars:
            return None
        return question_text(record, self.max_question_chars), gold, answer

    def conversation(self, query: Query) -> list[dict[str, str]]:
        question, gold, answer = query
        text = self.prompt.replace("{question}", question).replace("{gold}", gold).replace("{answer}", answer)
        return user_turn(text, self.system_prompt)

    def verdicts(self, queries: Sequence[Query | None]) -> list[bool | None]:
        """One verdict per query: True / False, or None (nothing asked, or the call failed)."""
        t0 = time.perf_counter()
        known: dict[Query, bool | None] = {}
        for q in queries:
            if q is not None and q not in known and q in self.cache:
                self.cache.move_to_end(q)
                known[q] = self.cache[q]
                self._stats["cache_hits"] += 1
        ask = list(dict.fromkeys(q for q in queries if q is not None and q not in known))
        replies = self.client.complete_many([self.conversation(q) for q in ask]) if ask else []
        for q, reply in zip(ask, replies, strict=True):
            known[q] = self._record_reply(q, reply)
        self._stats["seconds"] += time.perf_counter() - t0
        self._check_error_share()
        return [None if q is None else known[q] for q in queries]

    def _record_reply(self, query: Query, reply: str | EndpointError) -> bool | None:
        """Parse and cache one reply; count a failure (error or unparseable) and return None for it."""
        verdict = None if isinstance(reply, EndpointError) else parse_verdict(reply, self.yes_words, self.no_words)
        self.calls += 1
        self._stats["calls"] += 1
        self.recent.append(verdict is None)
        if verdict is None:
            self.failures += 1
            self.failure_kinds[reply.kind if isinstance(reply, EndpointError) else "unparseable"] += 1
            self._stats["errors"] += 1
            self.last_error = str(reply) if isinstance(reply, EndpointError) else f"unparseable verdict {describe(reply)!r}"
            if self.failures == 1:
                log.warning("verifier %s: a call failed (the item keeps its rule score): %s", self.client.url,
                            self.last_error)
            return None
        if self.cache_size:
            self.cache[query] = verdict
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return verdict

    def _check_error_share(self) -> None:
        failed = sum(self.recent)
        if len(self.recent) == self.error_window and failed > self.max_error_share * self.error_window:
            raise VerifierUnavailable(
                f"the verifier at {self.client.url} (model {self.client.model!r}) failed {failed} of its last "
                f"{self.error_window} calls, more than max_error_share={self.max_error_share}; last error: "
                f"{self.last_error}. Start it (e.g. `vllm serve <verifier> --port 8000`), check base_url and "
                f"model, or raise max_error_share (1.0 never stops).")

    # -- reward -----------------------------------------------------------------------------------------------
    def __call__(self, responses: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[float]:
        if len(responses) != len(records):
            raise ValueError(f"{self.name}: {len(responses)} responses but {len(records)} records")
        verdicts = self.verdicts([self.query(r, rec) for r, rec in zip(responses, records, strict=True)])
        return [1.0 if v else 0.0 for v in verdicts]

    def score_one(self, response: str, record: Mapping[str, Any]) -> float:
        return self([response], [record])[0]

    def pop_metrics(self) -> dict[str, float]:
        stats, self._stats = self._stats, self._empty_stats()
        return {"reward/verifier_calls": stats["calls"], "reward/verifier_errors": stats["errors"],
                "reward/verifier_cache_hits": stats["cache_hits"], "time/verifier_s": stats["seconds"]}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "cache": OrderedDict(), "recent": deque(maxlen=self.error_window)}


class RuleOrVerifier(Reward):
    """The paper's accuracy reward: 1.0 when the rule check passes, else the verifier's verdict.

    The rule check runs first on every response; only the responses it scores below 1.0 are sent to the
    verifier, and a failed verifier call leaves the rule score. Named ``accuracy``, so it takes the rule
    reward's place (``train/accuracy``, pass rates, validation) in the weighted sum.

    Args:
        verifier: the model verifier (its endpoint, prompt and failure policy).
        rule: the rule check (default ``AccuracyReward()``).

    Logged per step (``pop_metrics``): ``reward/rule_accuracy`` (share the rules pass),
    ``reward/verifier_rescued`` (share the verifier turned to 1.0), ``reward/verifier_errors`` (failed
    calls), ``reward/verifier_calls``, ``reward/verifier_cache_hits`` and ``time/verifier_s``.
    """

    name = "accuracy"

    def __init__(self, verifier: VerifierReward, rule: Reward | None = None) -> None:
        super().__init__()
        if rule is None:
            from modules.rewards.accuracy import AccuracyReward

            rule = AccuracyReward()
        self.verifier, self.rule = verifier, rule
        self._sums = {"n": 0, "rule": 0.0, "rescued": 0.0}

    def __call__(self, responses: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[float]:
        if len(responses) != len(records):
            raise ValueError(f"{self.name}: {len(responses)} responses but {len(records)} records")
        scores = list(self.rule(responses, records))
        misses = [i for i, s in enumerate(scores) if s < 1.0]
        verdicts = self.verifier.verdicts([self.verifier.query(responses[i], records[i]) for i in misses])
        rescued = 0
        for i, verdict in zip(misses, verdicts, strict=True):
            if verdict:
                scores[i], rescued = 1.0, rescued + 1
        self._sums["n"] += len(scores)
        self._sums["rule"] += len(scores) - len(misses)
        self._sums["rescued"] += rescued
        return scores

    def score_one(self, response: str, record: Mapping[str, Any]) -> float:
        return self([response], [record])[0]

    def pop_metrics(self) -> dict[str, float]:
        sums, self._sums = self._sums, {"n": 0, "rule": 0.0, "rescued": 0.0}
        n = max(1, sums["n"])
        return {"reward/rule_accuracy": sums["rule"] / n, "reward/verifier_rescued": sums["rescued"] / n,
                **self.verifier.pop_metrics()}

    def close(self) -> None:
        if callable(getattr(self.rule, "close", None)):
            self.rule.close()
