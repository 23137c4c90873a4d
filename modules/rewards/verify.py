"""math-verify under a wall-clock deadline that works from any thread or process.

math-verify's own timeouts use ``signal.alarm``, which only works in the main thread of the main
interpreter; inside a callback thread, a DataLoader worker or a Ray/vLLM worker they silently do nothing,
and some inputs (``10^{10^{10}}``) make sympy run for minutes. So the comparison runs in a child Python
process that we can kill:

* the child is a plain ``subprocess`` (not ``multiprocessing``), so it can be started from daemonic
  processes such as DataLoader workers, where ``multiprocessing`` refuses to have children;
* requests and replies are JSON lines over its stdin/stdout; the parent waits with ``selectors``;
* on a missed deadline the child is killed (SIGKILL) and a fresh one is started immediately, so its import
  time overlaps with the caller's other work. Waiting for a child to become ready has its own, longer,
  deadline (``startup_timeout_s``): a slow start never counts as a wrong answer.

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


class VerifyWorker:
    """One killable child process answering "is candidate equivalent to gold?" with a deadline.

    Thread-safe (calls are serialised by a lock), picklable (the child is not carried over) and lazy (the
    child starts on the first call).

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
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._buffer = b""
        self._no_start_until = 0.0
        self._finalizer: weakref.finalize | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"timeout_s": self.timeout_s, "startup_timeout_s": self.startup_timeout_s, "timeouts": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # ------------------------------------------------------------------------------------------ lifecycle

    def _spawn(self) -> None:
        """Start a child without waiting for it (its imports overlap with the caller's work)."""
        self._proc = subprocess.Popen(
            [sys.executable, "-P", os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self._ready = False
        self._buffer = b""
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill, self._proc)

    def _restart(self) -> None:
        _kill(self._proc)
        self._proc = None
        self._spawn()

    def close(self) -> None:
        """Kill the child (a later call starts a new one)."""
        with self._lock:
            _kill(self._proc)
            self._proc = None
            self._ready = False

    def _read_line(self, deadline: float) -> bytes | None:
        """Next line from the child, or None if the deadline passes or the child dies first."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def _ensure_ready(self) -> bool:
        """Start the child if needed and wait (startup_timeout_s) for its ready line."""
        if self._proc is None or self._proc.poll() is not None:
            if time.monotonic() < self._no_start_until:
                return False
            self._restart()
        if self._ready:
            return True
        if self._read_line(time.monotonic() + self.startup_timeout_s) == READY:
            self._ready = True
            return True
        log.warning("math-verify worker failed to start; symbolic checks return False for a while")
        _kill(self._proc)
        self._proc = None
        self._no_start_until = time.monotonic() + RETRY_AFTER_FAILED_START_S
        return False

    # ------------------------------------------------------------------------------------------ calls

    def equivalent(self, gold: str, candidate: str) -> bool:
        """math-verify's verdict on ``candidate`` vs ``gold``; False on timeout, crash or parse failure."""
        request = json.dumps({"gold": gold, "candidate": candidate}).encode() + b"\n"
        with self._lock:
            if not self._ensure_ready():
                return False
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write(request)
                self._proc.stdin.flush()
            except OSError:
                self._restart()
                return False
            line = self._read_line(time.monotonic() + self.timeout_s)
            if line is None:
                self.timeouts += 1
                self._restart()
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


def serve() -> None:
    """Child loop: one JSON request per stdin line, one ``{"ok": bool}`` reply per stdout line."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    logging.disable(logging.CRITICAL)
    # Pay the imports and sympy's lazy first-use costs (~0.5 s) before announcing readiness, so that the first
    # real comparison is not mistaken for a slow one.
    _compare("\\frac{1}{2}", "0.5")
    _compare("x^2+2x+1", "(x+1)^2")
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
