"""Pure answer extraction and normalisation for reasoning-model responses.

Owns: splitting a response into reasoning and answer (``</think>``), finding the last balanced
``\\boxed{...}``, reading numbers the way humans write them (``1,000``, ``1\\,000``, ``3e8``,
``1.2\\times10^{-3}``, ``30°``, ``12 cm``, ``\\frac{1}{2}``) and matching multiple-choice letters.

Everything here is total and bounded: functions return ``None`` rather than raise, every scan is linear in
the input, and no ``int()`` is ever applied to a digit run (Python refuses ``int()`` beyond 4,300 digits).
See ``shared/docs/answer-checking.md`` for the measured blind spots of math-verify this module designs
around.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Inputs longer than this are not numbers anyone writes by hand; refusing them keeps parsing O(1)-ish.
MAX_NUMBER_CHARS = 10_000

_BOX_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_BOX_OPENER = re.compile(r"\\(?:boxed|fbox)\s*\{")

# ---------------------------------------------------------------------------------------------- thinking


def split_thinking(response: str) -> tuple[str | None, str | None]:
    """Split a response at its LAST ``</think>`` into (reasoning, answer text).

    The ``<think>`` opening is optional (chat templates pre-fill it); when present at the start it is removed
    from the reasoning. A response that never closes its thinking has no answer: ``(response, None)``.

    >>> split_thinking("<think>2+2</think> \\\\boxed{4}")
    ('2+2', ' \\\\boxed{4}')
    >>> split_thinking("still thinking")
    ('still thinking', None)
    """
    if not isinstance(response, str):
        return None, None
    cut = response.rfind(THINK_CLOSE)
    if cut < 0:
        return response, None
    reasoning = response[:cut]
    stripped = reasoning.lstrip()
    if stripped.startswith(THINK_OPEN):
        reasoning = stripped[len(THINK_OPEN) :]
    return reasoning, response[cut + len(THINK_CLOSE) :]


# ---------------------------------------------------------------------------------------------- boxes


def _box_spans(text: str) -> tuple[int, list[tuple[int, int, int]]]:
    """One linear pass: (number of box openers, balanced boxes as (opener start, content start, end)).

    Braces are matched with a stack, so every box's closing brace is found in one pass however many
    ``\\boxed{`` there are. Escaped braces ``\\{`` / ``\\}`` are literal characters and do not count.
    """
    stack: list[tuple[bool, int, int]] = []  # (is_box, opener start, content start)
    spans: list[tuple[int, int, int]] = []
    openers = 0
    for m in _BOX_TOKEN.finditer(text):
        tok = m.group()
        if tok in ("\\{", "\\}"):
            continue
        if tok == "{":
            stack.append((False, m.start(), m.end()))
        elif tok == "}":
            if stack:
                is_box, start, content = stack.pop()
                if is_box:
                    spans.append((start, content, m.start()))
        else:
            openers += 1
            stack.append((True, m.start(), m.end()))
    return openers, spans


def last_boxed(text: str | None) -> str | None:
    """Content of the last balanced ``\\boxed{...}`` / ``\\fbox{...}`` (by opening position), or None.

    Nested braces are handled; a box whose braces never close is ignored (an earlier balanced box wins).

    >>> last_boxed("\\\\boxed{1} then \\\\boxed{\\\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    >>> last_boxed("\\\\boxed{7} \\\\boxed{8")
    '7'
    """
    if not isinstance(text, str) or "\\" not in text:
        return None
    _, spans = _box_spans(text)
    if not spans:
        return None
    _, content, end = max(spans)
    return text[content:end]


def count_boxed(text: str | None) -> int:
    """Number of ``\\boxed{`` / ``\\fbox{`` openers in ``text``, balanced or not."""
    if not isinstance(text, str):
        return 0
    return sum(1 for _ in _BOX_OPENER.finditer(text))


def extract_answer(response: str | None) -> str | None:
    """The graded candidate: the last balanced box in the answer part (after the last ``</think>``).

    A box that only appears inside the reasoning does not count, and neither does an unclosed thinking.
    """
    _, answer = split_thinking(response)
    if answer is None:
        return None
    content = last_boxed(answer)
    return content.strip() if content is not None else None


# ---------------------------------------------------------------------------------------------- text

_WRAPPER = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}"
)
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_SIZING = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg|displaystyle)(?![A-Za-z])")


def _unwrap(text: str) -> str:
    """Replace ``\\text{x}``-style wrappers by their content (innermost first, bounded passes)."""
    for _ in range(4):
        new = _WRAPPER.sub(r"\1", text)
        if new == text:
            break
        text = new
    return text


def normalize_text(text: str | None) -> str:
    """Canonical form for string equality: NFKC, no ``$``/spacing/sizing commands, no whitespace, lowercase.

    ``\\text{}``-style wrappers are unwrapped, ``\\dfrac``/``\\tfrac`` become ``\\frac``, and a trailing
    period is dropped.

    >>> normalize_text("$\\\\text{ New York }.$")
    'newyork'
    """
    if not isinstance(text, str):
        return ""
    out = unicodedata.normalize("NFKC", text)
    out = _unwrap(out)
    out = out.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("$", "")
    out = _SPACING.sub("", out)
    out = _SIZING.sub("", out)
    out = "".join(out.split()).lower()
    return out.rstrip(".")


# ---------------------------------------------------------------------------------------------- numbers

_NUM = r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)"
_INT = r"[-+]?\d+"
_PLAIN = re.compile(rf"({_NUM})")
_E_NOTATION = re.compile(rf"({_NUM})[eE]({_INT})")
_TIMES_TEN = re.compile(rf"(?:({_NUM})\*)?10\^(?:\{{({_INT})\}}|({_INT}))")
_SLASH = re.compile(rf"({_NUM})/({_NUM})")
_FRAC = re.compile(rf"([-+]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_INTEGER = re.compile(r"([-+]?)(\d+(?:,\d{3})*)")
_TRAILING_WRAPPED_UNIT = re.compile(r"\\(?:text|mathrm|mbox|textrm)\s*\{[^{}]*\}\s*$")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_PERCENT = re.compile(r"\\?%")
_TIMES = re.compile(r"\\times|\\cdot|×|·")
_UNIT_TAIL = re.compile(r"(?<=[\d.}])\s*([A-Za-zµμΩ][A-Za-zµμΩ0-9/^{}*\s.]*)$")
_UNIT_TOKEN = re.compile(r"[A-Za-zµμΩ]+")
_UNIT_ZONE = 48
# Units people append to numeric answers. A whitelist, so that ``3x`` or ``2\pi`` are never read as numbers;
# one-letter units (``m``, ``s``) count only after a space, so ``2n`` or ``5k`` stay expressions.
UNITS = frozenset(
    "m cm mm km nm um µm μm kg g mg s ms min h hr hrs hour hours day days year years n kn j kj w kw mw v mv "
    "a ma ω ohm ohms hz khz mhz pa kpa mpa atm bar mol l ml k c f deg degree degrees rad percent units unit "
    "meter meters metre metres second seconds gram grams dollars dollar cents inch inches ft feet mph kmh "
    "cal kcal ev kev mev".split()
)


def _strip_units(text: str) -> str:
    """Drop a trailing unit: anything in a final ``\\text{}``, else a whitelisted unit expression."""
    text = _TRAILING_WRAPPED_UNIT.sub("", text).strip()
    offset = max(0, len(text) - _UNIT_ZONE)  # units are short: searching only the tail keeps this linear
    m = _UNIT_TAIL.search(text, offset)
    if m is None:
        return text
    tokens = _UNIT_TOKEN.findall(m.group(1))
    spaced = m.start(1) > m.start()
    if all(t.lower() in UNITS and (len(t) > 1 or spaced) for t in tokens):
        text = text[: m.start()].strip()
    return text


def _clean_number(text: str) -> str | None:
    """Reduce a numeric answer to the small grammar parse_number reads, or None if it is too long."""
    if not isinstance(text, str) or len(text) > MAX_NUMBER_CHARS:
        return None
    out = unicodedata.normalize("NFKC", text).replace("$", "").replace("{,}", "").replace("−", "-")
    out = _SIZING.sub("", out)
    out = _DEGREE.sub("", out)
    out = _PERCENT.sub("", out).strip()
    out = _strip_units(out)
    out = _unwrap(out)
    out = _SPACING.sub("", out)
    out = _TIMES.sub("*", out).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    out = "".join(out.split())
    while len(out) >= 2 and out[0] == "{" and out[-1] == "}":
        out = out[1:-1]
    return out


def _to_float(num: str) -> float:
    """float() of a matched _NUM, thousands commas removed (float has no digit limit, unlike int)."""
    return float(num.replace(",", ""))


def _parse_clean(s: str) -> float | None:
    """Evaluate one of the supported grammars on a cleaned string; None if none matches fully."""
    if m := _PLAIN.fullmatch(s):
        return _to_float(m.group(1))
    if m := _E_NOTATION.fullmatch(s):
        return float(f"{_to_float(m.group(1))}e{m.group(2)}")
    if m := _TIMES_TEN.fullmatch(s):
        mantissa = _to_float(m.group(1)) if m.group(1) else 1.0
        return float(f"{mantissa}e{m.group(2) or m.group(3)}")
    if m := _SLASH.fullmatch(s):
        den = _to_float(m.group(2))
        return _to_float(m.group(1)) / den if den != 0 else None
    if m := _FRAC.fullmatch(s):
        den = _to_float(m.group(3))
        if den == 0:
            return None
        value = _to_float(m.group(2)) / den
        return -value if m.group(1) == "-" else value
    return None


def parse_number(text: str | None) -> float | None:
    """Read a human-written number; None when it is not one (never raises).

    Handles thousands commas (``1,000``), thin spaces (``1\\,000``), scientific notation (``3e8``,
    ``1.2\\times10^{-3}``), percentages (``50%`` -> 50.0, the sign is dropped), degrees (``30°``,
    ``30^\\circ``), trailing units (``12 cm``, ``5\\text{ apples}``) and fractions (``\\frac{1}{2}``, ``3/4``).
    Non-finite results (``1e999``, a 5000-digit integer) are None.

    >>> parse_number("1.2\\\\times10^{-3}")
    0.0012
    >>> parse_number("3x") is None
    True
    """
    try:
        cleaned = _clean_number(text) if isinstance(text, str) else None
        value = _parse_clean(cleaned) if cleaned else None
    except (ValueError, OverflowError, ZeroDivisionError):
        return None
    return value if value is not None and math.isfinite(value) else None


def canonical_integer(text: str | None) -> str | None:
    """The digit string of an integer literal (``"1,000"`` -> ``"1000"``, ``"-007 cm"`` -> ``"-7"``), else None.

    Lets integers of any length compare exactly, where a float comparison would lose digits.
    """
    cleaned = _clean_number(text) if isinstance(text, str) else None
    m = _INTEGER.fullmatch(cleaned) if cleaned else None
    if m is None:
        return None
    digits = m.group(2).replace(",", "").lstrip("0") or "0"
    sign = "-" if m.group(1) == "-" and digits != "0" else ""
    return sign + digits


# ---------------------------------------------------------------------------------------------- choices

_LETTER = re.compile(r"(?:\(([A-Za-z])\)|([A-Z]))(?:$|[.:)\s])")
_MARKUP = re.compile(r"[*_`$]")
_LEAD = re.compile(r"^(?:the\s+)?(?:answer|option|choice)\s*(?:is\s*)?:?\s*", re.IGNORECASE)


def _letter_of(candidate: str, n_options: int) -> str | None:
    """The letter a candidate names (``B``, ``(B)``, ``B.``, ``B)``, ``B: text``, ``**B**``)."""
    text = _MARKUP.sub("", _unwrap(unicodedata.normalize("NFKC", candidate))).strip()
    text = _LEAD.sub("", text).strip()
    if len(text) == 1 and text.isascii() and text.isalpha():
        letter = text.upper()
    elif m := _LETTER.match(text):
        letter = (m.group(1) or m.group(2)).upper()
    else:
        return None
    index = ord(letter) - ord("A")
    return letter if n_options == 0 or index < n_options else None


def match_choice(candidate: str | None, options: Sequence[str] | None) -> str | None:
    """Letter ("A".."Z") chosen by ``candidate`` among ``options``, or None.

    Accepts an option's text (normalised, exactly), then the letter forms ``B``, ``(B)``, ``B.``, ``B)``,
    ``B: text``, ``**B**``, ``\\text{(B) ...}``, then a number equal to exactly one numeric option. With no
    options any letter is accepted.

    >>> match_choice("\\\\text{(B) Paris}", ["London", "Paris"])
    'B'
    >>> match_choice("paris", ["London", "Paris"])
    'B'
    """
    if not isinstance(candidate, str) or len(candidate) > MAX_NUMBER_CHARS:
        return None
    opts = [o if isinstance(o, str) else str(o) for o in (options or [])][:26]
    # Option text first: "A dog" among ["The cat", "A dog"] is option B, not the letter A.
    norm = normalize_text(candidate)
    hits = [i for i, o in enumerate(opts) if norm and normalize_text(o) == norm]
    if len(hits) == 1:
        return chr(ord("A") + hits[0])
    letter = _letter_of(candidate, len(opts))
    if letter is not None:
        return letter
    value = parse_number(candidate)
    if value is None:
        return None
    hits = [i for i, o in enumerate(opts) if (v := parse_number(o)) is not None and math.isclose(v, value)]
    return chr(ord("A") + hits[0]) if len(hits) == 1 else None
