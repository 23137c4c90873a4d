"""Pure answer extraction and normalisation for reasoning-model responses.

Owns: splitting a response into reasoning and answer (``</think>``), finding the last balanced
``\\boxed{...}``, reading numbers the way humans write them (``1,000``, ``1\\,000``, ``3e8``,
``1.2\\times10^{-3}``, ``30°``, ``12 cm``, ``\\frac{1}{2}``) exactly, as decimals. Multiple-choice letters are
read in ``modules.choices``.

Digits: every Unicode decimal digit (category Nd: Arabic-Indic ``٤٢``, Devanagari ``४२``, fullwidth ``４２``,
math bold ``𝟒𝟐``) reads as its ASCII digit, in numbers and in text comparison alike. NFKC alone covers only
the compatibility forms (fullwidth, math bold), so the Nd mapping is applied after it.

Everything here is total and bounded: functions return ``None`` rather than raise, every scan is linear in
the input, and no ``int()`` is ever applied to a digit run (Python refuses ``int()`` beyond 4,300 digits).
See ``shared/docs/answer-checking.md`` for the measured blind spots of math-verify this module designs
around.
"""

from __future__ import annotations

import math
import re
import unicodedata
from decimal import Context, Decimal, DecimalException

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Inputs longer than this are not numbers anyone writes by hand; refusing them keeps parsing O(1)-ish.
MAX_NUMBER_CHARS = 10_000

# Precision for divisions (fractions, percent readings); parsing itself is exact. The exponent range is far
# beyond any float: 10^{-400} stays 10^{-400} instead of underflowing to 0.0.
_DECIMALS = Context(prec=50, Emax=10**15, Emin=-(10**15))
_NON_ASCII_DIGIT = re.compile(r"(?![0-9])\d")  # str patterns: \d is every Unicode decimal digit (Nd)

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


def after_last_boxed(text: str | None) -> str | None:
    """The text after the closing brace of the last balanced box, or None when there is no box.

    >>> after_last_boxed("so \\\\boxed{5} cm.")
    ' cm.'
    """
    if not isinstance(text, str) or "\\" not in text:
        return None
    _, spans = _box_spans(text)
    return text[max(spans)[2] + 1 :] if spans else None


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


def ascii_digits(text: str) -> str:
    """Every Unicode decimal digit (Nd) replaced by its ASCII digit: ``"٤٢"`` -> ``"42"``.

    >>> ascii_digits("x=٣.٥")
    'x=3.5'
    """
    if text.isascii():
        return text
    return _NON_ASCII_DIGIT.sub(lambda m: str(unicodedata.decimal(m.group())), text)


def normalize_text(text: str | None) -> str:
    """Canonical form for string equality: NFKC, no ``$``/spacing/sizing commands, no whitespace, lowercase.

    ``\\text{}``-style wrappers are unwrapped, ``\\dfrac``/``\\tfrac`` become ``\\frac``, and a trailing
    period is dropped.

    >>> normalize_text("$\\\\text{ New York }.$")
    'newyork'
    """
    if not isinstance(text, str):
        return ""
    out = ascii_digits(unicodedata.normalize("NFKC", text))
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
_PERCENT_WORD = re.compile(r"\d\s*(?:\\text\s*\{\s*)?percent\b", re.IGNORECASE)
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
    out = ascii_digits(unicodedata.normalize("NFKC", text)).replace("$", "").replace("{,}", "").replace("−", "-")
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


def _dec(num: str) -> Decimal:
    """Exact Decimal of a matched _NUM, thousands commas removed (no digit limit, unlike int)."""
    return Decimal(num.replace(",", ""))


def _scaled(mantissa: str, exponent: str) -> Decimal:
    """``mantissa * 10**exponent`` exactly; an exponent beyond Decimal's range raises DecimalException."""
    return Decimal(f"{mantissa.replace(',', '')}e{exponent}")


def _ratio(num: str, den: str) -> Decimal | None:
    """``num / den`` to 50 significant digits; None for a zero denominator."""
    d = _dec(den)
    return None if d == 0 else _DECIMALS.divide(_dec(num), d)


def _parse_clean(s: str) -> Decimal | None:
    """Evaluate one of the supported grammars on a cleaned string; None if none matches fully."""
    if m := _PLAIN.fullmatch(s):
        return _dec(m.group(1))
    if m := _E_NOTATION.fullmatch(s):
        return _scaled(m.group(1), m.group(2))
    if m := _TIMES_TEN.fullmatch(s):
        return _scaled(m.group(1) or "1", m.group(2) or m.group(3))
    if m := _SLASH.fullmatch(s):
        return _ratio(m.group(1), m.group(2))
    if m := _FRAC.fullmatch(s):
        value = _ratio(m.group(2), m.group(3))
        return -value if value is not None and m.group(1) == "-" else value
    return None


def parse_decimal(text: str | None) -> Decimal | None:
    """Read a human-written number exactly, as a Decimal; None when it is not one (never raises).

    The grammar is ``parse_number``'s; unlike a float, ``2\\times10^{-400}`` stays distinct from
    ``10^{-400}`` and from 0, and ``1e400`` is finite.

    >>> parse_decimal("2\\\\times10^{-400}")
    Decimal('2E-400')
    """
    try:
        cleaned = _clean_number(text) if isinstance(text, str) else None
        value = _parse_clean(cleaned) if cleaned else None
    except (ValueError, ArithmeticError, DecimalException):
        return None
    return value if value is not None and value.is_finite() else None


def parse_number(text: str | None) -> float | None:
    """Read a human-written number as a float; None when it is not one or a float cannot hold it.

    Handles thousands commas (``1,000``), thin spaces (``1\\,000``), scientific notation (``3e8``,
    ``1.2\\times10^{-3}``), percentages (``50%`` -> 50.0, the sign is dropped), degrees (``30°``,
    ``30^\\circ``), trailing units (``12 cm``, ``5\\text{ apples}``) and fractions (``\\frac{1}{2}``, ``3/4``).
    Values out of float range are None, never 0.0 or inf (``2\\times10^{-400}``, ``1e999``, a 5000-digit
    integer); compare such values with ``parse_decimal``.

    >>> parse_number("1.2\\\\times10^{-3}")
    0.0012
    >>> parse_number("3x") is None
    True
    """
    value = parse_decimal(text)
    if value is None:
        return None
    as_float = float(value)
    if not math.isfinite(as_float) or (as_float == 0.0 and value != 0):
        return None
    return as_float


def has_percent(text: str | None) -> bool:
    """True when a number is written as a percentage (``25%``, ``25\\%``, ``25 percent``)."""
    return isinstance(text, str) and (
        _PERCENT.search(text) is not None or _PERCENT_WORD.search(text) is not None
    )


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
