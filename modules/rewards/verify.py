"""math-verify under a wall-clock deadline that works from any thread or process.

math-verify's own timeouts use ``signal.alarm``, which only works in the main thread of the main
interpreter; inside a callback thread, a DataLoader worker or a Ray/vLLM worker they silently do nothing,
and some inputs (``10^{10^{10}}``) make sympy run for minutes. So the comparison runs in a child Python
process that we can kill:

* the child is a plain ``subprocess`` (not ``multiprocessing``), so it can be started from daemonic
  processes such as DataLoader workers, where ``multiprocessing`` refuses to have children;
* requests and replies are JSON lines over its stdin/stdout; the parent waits with ``selectors``;
* a spare child is kept warm beside the active one: on a missed deadline the active child is killed
  (SIGKILL), the spare takes over at once and a new spare starts in the background, so the next call does
  not wait for math-verify's import. Waiting for a child to become ready has its own, longer, deadline
  (``startup_timeout_s``): a slow start never counts as a wrong answer.

This file is also the child's entry point (``python -P verify.py``); keep its imports to the standard
library so that the child starts without importing the project.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

log = logging.getLogger(__name__)

READY = b"ready\n"
# After a failed start (no ready line in time) stop trying for this long, so one broken environment does not
# cost startup_timeout_s on every call.
RETRY_AFTER_FAILED_START_S = 60.0


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL and reap a child; safe on None and on a child that already exited."""
    if proc is None:
        return
    try:
        proc.kill()
        proc.wait(timeout=5)
    except Exception:  # noqa: BLE001 - best effort cleanup
        pass


class _Child:
    """One started child process, its unread output and whether it has reported ready."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.ready = False
        self.buffer = b""
        self.finalizer = weakref.finalize(self, _kill, self.proc)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.finalizer()

    def read_line(self, deadline: float) -> bytes | None:
        """Next line from the child, or None if the deadline passes or the child dies first."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"


class VerifyWorker:
    """A killable child process answering "is candidate equivalent to gold?" with a deadline, plus a spare.

    Thread-safe (calls are serialised by a lock), picklable (the children are not carried over) and lazy (the
    children start on the first call). A second, spare child is started with the first one and after every
    replacement, so that when a comparison misses its deadline the next call switches to a child that has
    already imported math-verify: a timeout costs ``timeout_s`` once, not a further start-up (~0.8 s) on
    the next, harmless call.

    Args:
        timeout_s: wall-clock limit for one comparison, once the child is ready.
        startup_timeout_s: limit for a fresh child to import math-verify and report ready.
    """

    def __init__(self, timeout_s: float = 2.0, startup_timeout_s: float = 60.0) -> None:
        if timeout_s <= 0 or startup_timeout_s <= 0:
            raise ValueError("timeout_s and startup_timeout_s must be positive")
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.timeouts = 0
        self.calls = 0
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._active: _Child | None = None
        self._spare: _Child | None = None
        self._no_start_until = 0.0

    @property
    def _proc(self) -> subprocess.Popen[bytes] | None:
        """The active child's process (None before the first call and after ``close``)."""
        return self._active.proc if self._active is not None else None

    def __getstate__(self) -> dict[str, Any]:
        return {"timeout_s": self.timeout_s, "startup_timeout_s": self.startup_timeout_s, "timeouts": 0, "calls": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # ------------------------------------------------------------------------------------------ lifecycle

    def _replace_active(self) -> None:
        """Drop the active child; promote the spare (or start one) and start a new spare, without waiting."""
        if self._active is not None:
            self._active.kill()
        spare = self._spare if self._spare is not None and self._spare.alive() else None
        if spare is None and self._spare is not None:
            self._spare.kill()
        self._active = spare if spare is not None else _Child()
        self._spare = _Child()

    def close(self) -> None:
        """Kill both children (a later call starts new ones)."""
        with self._lock:
            for child in (self._active, self._spare):
                if child is not None:
                    child.kill()
            self._active = self._spare = None

    def _ensure_ready(self) -> bool:
        """Start the children if needed and wait (startup_timeout_s) for the active one's ready line."""
        if self._active is None or not self._active.alive():
            if time.monotonic() < self._no_start_until:
                return False
            self._replace_active()
        assert self._active is not None
        if self._active.ready:
            return True
        if self._active.read_line(time.monotonic() + self.startup_timeout_s) == READY:
            self._active.ready = True
            return True
        log.warning("math-verify worker failed to start; symbolic checks return False for a while")
        for child in (self._active, self._spare):
            if child is not None:
                child.kill()
        self._active = self._spare = None
        self._no_start_until = time.monotonic() + RETRY_AFTER_FAILED_START_S
        return False

    # ------------------------------------------------------------------------------------------ calls

    def equivalent(self, gold: str, candidate: str) -> bool:
        """math-verify's verdict on ``candidate`` vs ``gold``; False on timeout, crash or parse failure."""
        request = json.dumps({"gold": gold, "candidate": candidate}).encode() + b"\n"
        with self._lock:
            self.calls += 1
            if not self._ensure_ready():
                return False
            child = self._active
            assert child is not None and child.proc.stdin is not None
            try:
                child.proc.stdin.write(request)
                child.proc.stdin.flush()
            except OSError:
                self._replace_active()
                return False
            line = child.read_line(time.monotonic() + self.timeout_s)
            if line is None:
                self.timeouts += 1
                self._replace_active()
                return False
        try:
            return bool(json.loads(line).get("ok", False))
        except ValueError:
            return False


# ---------------------------------------------------------------------------------------------- child


def _compare(gold: str, candidate: str) -> bool:
    """Child side: parse both as boxed LaTeX and verify, with math-verify's signal timeouts disabled."""
    from math_verify import parse, verify

    parse_kw = {"parsing_timeout": None} if "parsing_timeout" in inspect.signature(parse).parameters else {}
    verify_kw = {"timeout_seconds": None} if "timeout_seconds" in inspect.signature(verify).parameters else {}
    parsed_gold = parse("\\boxed{" + gold + "}", **parse_kw)
    parsed_candidate = parse("\\boxed{" + candidate + "}", **parse_kw)
    if not parsed_gold or not parsed_candidate:
        return False
    return bool(verify(parsed_gold, parsed_candidate, **verify_kw))


# Pairs that touch sympy's lazily built parts (rationals, polynomials, exp, pi, factorials, nested powers):
# measured first-call costs of 0.1 to 0.7 s each, paid before "ready" instead of by a scored call.
WARM_UP = [
    ("\\frac{1}{2}", "0.5"),
    ("x^2+2x+1", "(x+1)^2"),
    ("e^{-x^2}", "2"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
    ("(n+1)!", "2"),
    ("x^{x^{x}}", "2"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\{1,2\\}", "\\{2,1\\}"),
]


def serve() -> None:
    """Child loop: one JSON request per stdin line, one ``{"ok": bool}`` reply per stdout line."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    logging.disable(logging.CRITICAL)
    # Pay the imports and sympy's lazy first-use costs (~0.5 s) before announcing readiness, so that the first
    # real comparison is not mistaken for a slow one.
    for gold, candidate in WARM_UP:
        _compare(gold, candidate)
    out.write(READY)
    out.flush()
    for raw in sys.stdin.buffer:
        try:
            req = json.loads(raw)
            ok = _compare(str(req["gold"]), str(req["candidate"]))
        except Exception:  # noqa: BLE001 - any failure is "not verified"
            ok = False
        out.write(json.dumps({"ok": ok}).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    serve()
