"""Errors a person reads: what is wrong, where (the key or the file), and what to do, as one short block.

`UserError` is raised for mistakes in the command line, the config or the files it names; the CLI prints it with
`format_block` and exits with status 2, without a traceback (`--debug` or `R1V_DEBUG=1` shows one).
`explain_message` turns jsonargparse's messages (a `usage:` screen, "Does not validate against any of the Union
subtypes", a dump of the whole `Namespace`) into that block: the cause, the key, and for a misspelt key or class
name the close matches among the accepted ones ("did you mean `group_size`?").
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Iterable
from importlib import import_module

DEBUG_HINT = "(a traceback: add --debug, or set R1V_DEBUG=1)"

_NOISE = [re.compile(p) for p in (
    r"Does not validate against any of the Union subtypes", r"^Subtypes:", r"^Errors:$",
    r"Expected a <class 'NoneType'>", r"^Given value", r"either not accessible or invalid", r"^tip:",
    r"^Problem with given class_path", r"^Parser key \"[^\"]+\":\s*$", r"^Not a valid subclass of",
    r"^Subclass types expect", r"^Import path .* does not")]


class UserError(Exception):
    """A mistake the user can fix: `what` is wrong, `where` (key, file, folders), and the `fix`."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None) -> None:
        super().__init__(what)
        self.what, self.where, self.fix = what, where, fix

    def __str__(self) -> str:
        return format_block(self.what, self.where, self.fix, header=False)


def format_block(what: str, where: str | None = None, fix: str | None = None, header: bool = True) -> str:
    """`error: WHAT` / `  where: ...` / `  fix: ...`: the cause on the first line, the remedy on the last."""
    lines = [f"error: {what}" if header else what]
    if where:
        lines.append(f"  where: {where}")
    if fix:
        lines.append(f"  fix: {fix}")
    return "\n".join(lines)


def close_matches(word: str, choices: Iterable[str]) -> list[str]:
    return difflib.get_close_matches(word, sorted(set(choices)), n=2, cutoff=0.6)


def did_you_mean(close: list[str], prefix: str = "") -> str:
    """`; did you mean `x`?` for the closest accepted names, or ''."""
    return "; did you mean " + " or ".join(f"`{prefix}{c}`" for c in close) + "?" if close else ""


def _import(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(import_module(module), name) if module else import_module(name)
    except Exception:  # noqa: BLE001 - a suggestion is best effort
        return None


def init_params(class_path: str) -> list[str]:
    """The `__init__` parameters of a class (its config keys)."""
    cls = _import(class_path)
    try:
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        return []


def _causes(message: str) -> tuple[list[str], list[str], list[str]]:
    """jsonargparse's message -> (the lines that say what is wrong, the parser keys, the class paths named)."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    classes = re.findall(r"class_path[ =]'([\w.]+)'", message)
    causes: list[str] = []
    for raw in message.splitlines():
        line = re.sub(r'^Parser key "[^"]+":\s*', "", raw.strip()).lstrip("- ").strip()
        if line and not any(p.search(line) for p in _NOISE) and line not in causes:
            causes.append(line)
    return causes, keys, classes


def _option_key(keys: list[str], name: str) -> str:
    """Parser keys ["model", "rollout"] + option "x" -> "model.init_args.rollout.init_args.x"."""
    parts = [keys[0]] if keys else []
    parts += [f"init_args.{k}" for k in keys[1:]]
    return ".".join([*parts, "init_args", name]) if parts else name


def explain_message(message: str, options: Iterable[str] = ()) -> UserError:
    """A jsonargparse error message (parse or instantiation) -> a `UserError`; `options` are the parser's
    accepted `--keys`, for suggestions."""
    causes, keys, classes = _causes(message)
    text = "\n".join(causes)
    help_fix = "`python -m app fit --help` lists the options"
    if m := re.search(r"Option '(\w+)' is not accepted", text):
        name, cls = m.group(1), classes[-1] if classes else "the class"
        key = _option_key(keys, name)
        close = close_matches(name, init_params(cls)) if classes else []
        fix = (f"use --{key.rsplit('.', 1)[0]}.{close[0]}" if close else
               f"`python -m app fit --model.help {cls}` lists its options")
        return UserError(f"{cls.rsplit('.', 1)[-1]} has no option `{name}`{did_you_mean(close)}",
                         f"--{key} (command line or config file)", fix)
    if m := re.search(r"unrecognized arguments: (--[\w.]+)", text, re.I) or \
            re.search(r"does not accept option '([\w.]+)'", text):
        opt = m.group(1).removeprefix("--")
        close = close_matches(opt, [o.removeprefix("--") for o in options if o.startswith("--")])
        return UserError(f"unknown option `{opt}`{did_you_mean(close)}", f"--{opt} (command line or config file)",
                         f"use --{close[0]}" if close else help_fix)
    if m := re.search(r"module '([\w.]+)' has no attribute '(\w+)'", text):
        module, name = m.groups()
        mod = _import(module)
        names = [n for n, v in vars(mod).items() if isinstance(v, type) and not n.startswith("_")] if mod else []
        close = close_matches(name, names)
        where = f"--{keys[0]}" + "".join(f".init_args.{k}" for k in keys[1:]) if keys else None
        return UserError(f"no class `{name}` in {module}{did_you_mean(close, module + '.')}", where,
                         f"use {module}.{close[0]}" if close else f"a class_path is `package.module.Class`; {help_fix}")
    if m := re.search(r"File does not exist: '([^']+)'", text):
        return UserError(f"config file not found: {m.group(1)}", "--config",
                         "check the path (the shipped configs are under configs/tiny, configs/r1v3, configs/scale, "
                         "configs/curriculum)")
    if m := re.search(r"Expected a <class '(\w+)'>\. Got value: (.*)", text):
        key = ".".join([keys[0], *(f"init_args.{k}" for k in keys[1:])]) if keys else "a value"
        return UserError(f"{key}: expected {m.group(1)}, got {m.group(2)!r}", f"--{key}",
                         f"give a value of type {m.group(1)}")
    what = causes[0] if causes else message.strip().splitlines()[0]
    key = f"--{keys[0]}" if keys else None
    if classes and (m := re.match(r"(\w+)\b", what)) and m.group(1) in init_params(classes[0]):
        key = f"--{'data' if 'datamodule' in classes[0] else 'model'}.init_args.{m.group(1)}"  # "group_size=1: ..."
    elif classes:
        key = f"the {classes[0].rsplit('.', 1)[-1]} config"
    return UserError(what, key, "; ".join(causes[1:3]) or None)
