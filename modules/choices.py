"""Multiple-choice answers: which option letter(s) a boxed answer names, read strictly.

Rules (each closes a way a policy could be paid for a non-answer):
- An option's text alone names that option (``paris`` among ``[London, Paris]`` is B).
- A letter names its option: ``B``, ``(B)``, ``B.``, ``B)``, ``B:``, ``**B**``, ``\\text{(B)}``; LaTeX spacing
  (``\\ ``, ``\\,``, ``\\quad``, ``~``) counts as a space, so ``(B)\\ \\frac{\\sqrt3}{2}`` is read.
- Text after the letter must not contradict it: ``B) 18`` when option B is 15, or ``B: Rome`` when Rome is
  option C, names no option.
- A hedge names no option: an answer that names a second option letter (``A or B``, ``A B C D``,
  ``(B) and (C)``) reads as None, so it can never score. ``choice_letters`` reads such lists as a set, for
  golds that list several letters.
- A bare number equal to exactly one numeric option names that option.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

from modules.answer import MAX_NUMBER_CHARS, _unwrap, normalize_text, parse_number

_SPACES = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|~")
_MARKUP = re.compile(r"[*_`$]")
_LEAD = re.compile(r"^(?:the\s+)?(?:answer|option|choice)\s*(?:is\s*)?:?\s*", re.IGNORECASE)
_HEAD = re.compile(r"(?:\(([A-Za-z])\)|([A-Z]))(?:$|[.:)\s])")
# A further letter in the text after the head: standalone capital, or any letter in parentheses.
_OTHER_LETTER = re.compile(r"(?<![A-Za-z\\])(?:\(([A-Za-z])\)|([A-Z]))(?![A-Za-z])")
_L = r"(?:\([A-Za-z]\)|[A-Z])"
_LIST = re.compile(rf"{_L}(?:\s*(?:,|;|/|&|\band\b|\bor\b|\s)\s*{_L})+\.?", re.IGNORECASE)
_LIST_ITEM = re.compile(r"\(([A-Za-z])\)|([A-Za-z])")


def _plain(candidate: str) -> str:
    """NFKC, wrappers unwrapped, markdown and LaTeX spacing removed, lead-in ("the answer is") dropped."""
    text = _SPACES.sub(" ", _unwrap(unicodedata.normalize("NFKC", candidate)))
    text = _MARKUP.sub("", text).strip()
    return _LEAD.sub("", text).strip()


def _in_range(letter: str, n_options: int) -> bool:
    return n_options == 0 or ord(letter) - ord("A") < n_options


def _option_index(text: str, opts: Sequence[str]) -> int | None:
    """Index of the one option whose text (or numeric value) ``text`` is, else None."""
    norm = normalize_text(text)
    hits = [i for i, o in enumerate(opts) if norm and normalize_text(o) == norm]
    if len(hits) == 1:
        return hits[0]
    value = parse_number(text)
    if value is None:
        return None
    hits = [i for i, o in enumerate(opts) if (v := parse_number(o)) is not None and math.isclose(v, value)]
    return hits[0] if len(hits) == 1 else None


def _rest_agrees(letter: str, rest: str, opts: Sequence[str]) -> bool:
    """Whether the text after a letter is compatible with that letter's option (see the module rules)."""
    if not rest:
        return True
    index = ord(letter) - ord("A")
    own = opts[index] if index < len(opts) else ""
    if own and normalize_text(rest) == normalize_text(own):
        return True
    rest_value, own_value = parse_number(rest), parse_number(own)
    if rest_value is not None and own_value is not None:
        return math.isclose(rest_value, own_value)
    for m in _OTHER_LETTER.finditer(rest):
        if _in_range((m.group(1) or m.group(2)).upper(), len(opts)):
            return False  # a second option letter: a hedge
    other = _option_index(rest, opts)
    return other is None or other == index


def _letter_of(candidate: str, opts: Sequence[str]) -> str | None:
    """The letter a candidate names by its letter forms, or None (no letter, a hedge, or a contradiction)."""
    text = _plain(candidate)
    if len(text) == 1 and text.isascii() and text.isalpha():
        letter, rest = text.upper(), ""
    elif m := _HEAD.match(text):
        letter = (m.group(1) or m.group(2)).upper()
        rest = text[m.end() :].lstrip(" .:)").strip()
    else:
        return None
    if not _in_range(letter, len(opts)):
        return None
    return letter if _rest_agrees(letter, rest, opts) else None


def choice_letters(text: str | None, n_options: int = 0) -> frozenset[str] | None:
    """The set of letters of a letter list (``A, C``, ``A and C``, ``(A) (C)``) naming two or more, else None.

    >>> sorted(choice_letters("C and (A)"))
    ['A', 'C']
    >>> choice_letters("B") is None
    True
    """
    if not isinstance(text, str) or len(text) > MAX_NUMBER_CHARS:
        return None
    plain = " ".join(_plain(text).split())  # one space between tokens: keeps the list regex linear
    if not _LIST.fullmatch(plain):
        return None
    words = re.sub(r"\b(?:and|or)\b", " ", plain, flags=re.IGNORECASE)
    letters = frozenset((m.group(1) or m.group(2)).upper() for m in _LIST_ITEM.finditer(words))
    if len(letters) < 2 or not all(_in_range(letter, n_options) for letter in letters):
        return None
    return letters


def match_choice(candidate: str | None, options: Sequence[str] | None) -> str | None:
    """Letter ("A".."Z") chosen by ``candidate`` among ``options``, or None (see the module rules).

    With no options any single letter is accepted.

    >>> match_choice("\\\\text{(B) Paris}", ["London", "Paris"])
    'B'
    >>> match_choice("paris", ["London", "Paris"])
    'B'
    >>> match_choice("A or B", ["London", "Paris"]) is None
    True
    """
    if not isinstance(candidate, str) or len(candidate) > MAX_NUMBER_CHARS:
        return None
    opts = [o if isinstance(o, str) else str(o) for o in (options or [])][:26]
    # Option text first: "A dog" among ["The cat", "A dog"] is option B, not the letter A.
    norm = normalize_text(candidate)
    hits = [i for i, o in enumerate(opts) if norm and normalize_text(o) == norm]
    if len(hits) == 1:
        return chr(ord("A") + hits[0])
    if (letter := _letter_of(candidate, opts)) is not None:
        return letter
    if _HEAD.match(_plain(candidate)):
        return None  # a letter was written but refused (hedge, contradiction, out of range): no number fallback
    value = parse_number(candidate)
    if value is None:
        return None
    hits = [i for i, o in enumerate(opts) if (v := parse_number(o)) is not None and math.isclose(v, value)]
    return chr(ord("A") + hits[0]) if len(hits) == 1 else None
