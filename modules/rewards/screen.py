"""Screen answers that would make math-verify (sympy) run for seconds, before any worker sees them.

Measured with math-verify 0.9 on one core: ``9^{9^{9^{9}}}``, ``10^{10^{10}}``, ``2^{2^{64}}``,
``10^{1000000}``, ``1000000!``, ``(10^{10})!`` and ``e^{e^{e^{10}}}`` each take 1.6 to 5 s or more (sympy
evaluates the integer or float exactly), against 1 to 20 ms for an ordinary answer. What they share, and
what the screen looks for in one linear pass over a short string:

- a tower: a power whose exponent holds another power of a numeric base (a number, ``e``, ``\\pi`` or a
  brace/paren group of those): ``10^{10^{10}}``, ``e^{e^{10}}``, ``{10^{10}}^{10^{10}}``. A power of a
  variable inside an exponent (``e^{-x^2}``) is ordinary and passes;
- an integer exponent above ``MAX_EXPONENT`` (``10^{1000000}``);
- a factorial of an integer above ``MAX_FACTORIAL``, of a bracketed power (``(10^{10})!``), or of a factorial
  (``9!!``, ``(9!)!``: sympy may read ``9!!`` as ``(9!)!``, a 1.8-million-digit number; found by the
  benchmark's fuzzed corpus, 2 s).

Screened answers are not equivalent by math-verify; a byte-equal or normalised-equal answer still scores,
since those checks come first.
"""

from __future__ import annotations

import re

__all__ = ["MAX_EXPONENT", "MAX_FACTORIAL", "too_costly_for_math_verify"]

MAX_EXPONENT = 1000
MAX_FACTORIAL = 1000

_BIG_EXPONENT = re.compile(r"\^\s*\{?\s*[-+]?\s*(\d+)")
_FACTORIAL = re.compile(r"(\d+)\s*!|[)}\]]\s*!")
_CHAINED_FACTORIAL = re.compile(r"!\s*[)}\]]*\s*!")
_NUMERIC_GROUP = re.compile(r"[\d\s.+\-*/^{}()]|\\pi|\\cdot|\\times|\\frac|\be\b|e(?=\s*\^)")
_NUMERIC_ATOM = re.compile(r"(?:\d+(?:\.\d*)?|\\pi|(?<![A-Za-z\\])e)\s*$")


def _exponent_end(text: str, caret: int) -> int:
    """End index of the exponent that follows the ``^`` at ``caret`` (a brace group or one token)."""
    i = caret + 1
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return j + 1
        return len(text)
    m = re.compile(r"\\[A-Za-z]+|\d+|.").match(text, i)
    return m.end() if m else i


def _group_before(head: str) -> str | None:
    """Content of the bracket group that ``head`` ends with (``(...)``, ``{...}``, ``[...]``), else None."""
    if not head or head[-1] not in ")}]":
        return None
    close = head[-1]
    opener = {")": "(", "}": "{", "]": "["}[close]
    depth = 0
    for j in range(len(head) - 1, -1, -1):
        depth += 1 if head[j] == close else -1 if head[j] == opener else 0
        if depth == 0:
            return head[j + 1 : -1]
    return None


def _numeric_base_before(text: str, caret: int, start: int) -> bool:
    """Whether the base of the power whose ``^`` is at ``caret`` (searched from ``start``) is numeric."""
    head = text[start:caret].rstrip()
    group = _group_before(head)
    if group is not None:
        return bool(group.strip()) and not _NUMERIC_GROUP.sub("", group).strip()
    return _NUMERIC_ATOM.search(head) is not None


def _has_tower(text: str) -> bool:
    """A power whose exponent contains a power of a numeric base."""
    carets = [i for i, ch in enumerate(text) if ch == "^"]
    for k, caret in enumerate(carets):
        end = _exponent_end(text, caret)
        for inner in carets[k + 1 :]:
            if inner >= end:
                break
            if _numeric_base_before(text, inner, caret + 1):
                return True
    return False


def too_costly_for_math_verify(text: str) -> bool:
    """True for exponent towers, huge integer exponents and huge factorials (see the module docstring).

    >>> too_costly_for_math_verify("10^{10^{10}}"), too_costly_for_math_verify("e^{-x^2}")
    (True, False)
    """
    if "^" not in text and "!" not in text:
        return False
    for m in _BIG_EXPONENT.finditer(text):
        if len(m.group(1)) > 6 or int(m.group(1)) > MAX_EXPONENT:
            return True
    if _CHAINED_FACTORIAL.search(text):
        return True
    for m in _FACTORIAL.finditer(text):
        if m.group(1) is None:
            group = _group_before(text[: m.start() + 1])
            if group is not None and ("^" in group or "!" in group):
                return True
        elif len(m.group(1)) > 6 or int(m.group(1)) > MAX_FACTORIAL:
            return True
    return _has_tower(text)
