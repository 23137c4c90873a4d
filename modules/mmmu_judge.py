"""MMMU judge mode: a model maps an unparsed multiple-choice answer to an option (VLMEvalKit's approach).

The paper's MMMU figure (recipe.md section 6.2) counts an item correct when the last ``\\boxed{}`` equals the
answer or VLMEvalKit's LLM judge, shown only the text after ``</think>``, matches the prediction to the right
option. Here the official MMMU rules go first (``modules.mmmu_rules.score_item``); only the multiple-choice
responses they cannot parse (the official parser fell back to a random letter) are sent to the judge, which
replies with one option letter or ``Z`` (no option). ``acc_judge`` counts an item correct when it is
correct under the strict rules or the judge picked the gold letter; ``judged`` marks the responses the judge
decided. A failed judge call (down, slow, garbage) decides nothing and is counted in ``errors``.

The judge talks to an OpenAI-compatible endpoint (``modules.chat_client``), e.g. ``vllm serve <judge>``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from modules.chat_client import ChatClient, EndpointError, describe, user_turn
from modules.mmmu_rules import answer_candidate, eval_multi_choice, parse_gold, parse_multi_choice_response

JUDGE_PROMPT = (
    "You are given a multiple-choice question, its options and a model's answer. Decide which option the "
    "model's answer chooses.\n\n"
    "Question:\n{question}\n\n"
    "Options:\n{options}\n\n"
    "Model's answer:\n{answer}\n\n"
    "Reply with the letter of the option the answer chooses ({letters}). If it chooses none of the options, "
    "or several, reply Z. Reply with the single letter only."
)
NO_OPTION = "Z"
_LETTER = re.compile(r"^\W*?\(?([A-Z])\)?(?:$|[\s.:,)*])")


@dataclass
class JudgeVerdict:
    """One judge call: the option letter it chose (None: no option, or the call failed), its reply, the error."""

    letter: str | None
    reply: str | None = None
    error: str | None = None


def judge_text(response: str, mode: str = "prefilled") -> str | None:
    """What the judge sees: the text after the last ``</think>`` (the whole response in raw mode, or when think
    tags are optional and absent); None for a response that never finished thinking."""
    if mode == "raw":
        return response.strip()
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1].strip()
    if mode == "optional" and "<think>" not in response:
        return response.strip()
    return None


def needs_judge(response: str, question_type: str, all_choices: Sequence[str], index2ans: Mapping[str, str],
                mode: str = "prefilled") -> str | None:
    """The text to judge when the official rules cannot parse this multiple-choice response, else None."""
    if question_type != "multiple-choice" or not all_choices:
        return None
    candidate = answer_candidate(response, mode)
    if candidate is not None:
        # the fallback does not depend on the rng: any seed says whether the official parser found a letter
        _, fell_back = parse_multi_choice_response(candidate, all_choices, index2ans, random.Random(0))
        if not fell_back:
            return None
    text = judge_text(response, mode)
    return text or None


def parse_judge_letter(reply: str, letters: Sequence[str]) -> str | None:
    """The option letter of a judge reply, ``Z`` for none; None when the reply is not one clean letter.

    >>> parse_judge_letter("B", "ABCD"), parse_judge_letter("(C) because", "ABCD"), parse_judge_letter("E", "ABCD")
    ('B', 'C', None)
    """
    text = reply.rsplit("</think>", 1)[-1].strip()
    match = _LETTER.match(text)
    if match is None:
        return None
    letter = match.group(1)
    return letter if letter in letters or letter == NO_OPTION else None


class OptionJudge:
    """Asks a judge model which option an answer chooses.

    Args:
        base_url: OpenAI-compatible server, e.g. ``http://127.0.0.1:8000/v1`` (``vllm serve <judge>``).
        model: served model name.
        prompt: user message; ``{question}``, ``{options}`` (lettered lines), ``{answer}`` (the text after
            ``</think>``) and ``{letters}`` are filled in.
        system_prompt: optional system message.
        api_key_env: environment variable with a bearer token (None or unset: none sent).
        timeout_s: limit of one request try, in seconds.
        max_retries: further tries after a timeout, connection error, 429 or 5xx.
        concurrency: requests in flight at once.
        max_tokens: reply cap.
        max_answer_chars: the answer text is cut to its last this many characters.
    """

    def __init__(self, base_url: str, model: str, prompt: str = JUDGE_PROMPT, system_prompt: str | None = None,
                 api_key_env: str | None = "OPENAI_API_KEY", timeout_s: float = 60.0, max_retries: int = 2,
                 concurrency: int = 32, max_tokens: int = 8, max_answer_chars: int = 4000) -> None:
        missing = [k for k in ("{question}", "{options}", "{answer}") if k not in prompt]
        if missing:
            raise ValueError(f"judge prompt must contain {missing} (placeholders filled per item)")
        self.client = ChatClient(base_url, model, api_key_env, timeout_s, max_retries, concurrency=concurrency,
                                 max_tokens=max_tokens)
        self.prompt, self.system_prompt, self.max_answer_chars = prompt, system_prompt, max_answer_chars

    def describe(self) -> dict[str, str]:
        return {"url": self.client.url, "model": self.client.model}

    def conversation(self, question: str, index2ans: Mapping[str, str], answer: str) -> list[dict[str, str]]:
        options = "\n".join(f"{letter}. {text}" for letter, text in index2ans.items())
        text = (self.prompt.replace("{question}", question).replace("{options}", options)
                .replace("{letters}", ", ".join(index2ans)).replace("{answer}", answer[-self.max_answer_chars:]))
        return user_turn(text, self.system_prompt)

    def choose(self, items: Sequence[tuple[str, Mapping[str, str], str]]) -> list[JudgeVerdict]:
        """One verdict per (question, index2ans, answer text), asked concurrently."""
        replies = self.client.complete_many([self.conversation(*item) for item in items])
        out = []
        for (_, index2ans, _), reply in zip(items, replies, strict=True):
            if isinstance(reply, EndpointError):
                out.append(JudgeVerdict(None, None, str(reply)))
                continue
            letter = parse_judge_letter(reply, list(index2ans))
            if letter is None:
                out.append(JudgeVerdict(None, reply, f"unparseable judge reply {describe(reply)!r}"))
            else:
                out.append(JudgeVerdict(None if letter == NO_OPTION else letter, reply))
        return out


def apply_judge(scored: dict[str, Any], answer: Any, verdict: JudgeVerdict | Mapping[str, Any] | None) -> dict:
    """``score_item``'s result plus ``correct_judge`` (strict rules, or the judge's letter is the gold) and
    ``judged`` (the judge chose an option for this response)."""
    if isinstance(verdict, Mapping):
        verdict = JudgeVerdict(**verdict)
    letter = verdict.letter if verdict is not None else None
    judged = letter is not None
    correct = bool(scored["correct_strict"]) or (judged and eval_multi_choice(parse_gold(answer), letter))
    return {**scored, "correct_judge": correct, "judged": judged}


def verdict_record(verdict: JudgeVerdict) -> dict[str, Any]:
    """A JSON-ready record of a verdict."""
    return asdict(verdict)
