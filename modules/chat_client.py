"""A small client for OpenAI-compatible chat-completions endpoints (``vllm serve``, TGI, SGLang, OpenAI).

One home for talking to a judge or verifier model: the reward's model verifier
(``modules.rewards.verifier``) and the MMMU option judge (``modules.mmmu_judge``) both use it. Standard
library only (``urllib`` and a thread pool), so it needs no extra package and runs in any process.

``complete_many`` sends a list of conversations concurrently (``concurrency`` requests in flight; the server
batches them, as vLLM's continuous batching does) and returns, per conversation, the reply text or the
``EndpointError`` that ended its last try. A try fails on a connection error, a timeout, an HTTP status, or a
reply without ``choices[0].message.content``; connection errors, timeouts, 429 and 5xx are retried
``max_retries`` times with exponential backoff, other 4xx are not (a wrong model name will not fix itself).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Message = dict[str, str]
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class EndpointError(RuntimeError):
    """One conversation that got no usable reply; ``kind`` is timeout, connection, http or malformed."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.status = kind, status

    @property
    def retryable(self) -> bool:
        """Timeouts, connection errors, 429 and 5xx may pass; other answers will not change."""
        return self.kind in ("timeout", "connection") or self.status in RETRY_STATUSES


def chat_url(base_url: str) -> str:
    """``<base_url>/chat/completions``; a base without ``/v1`` gets it (``http://host:8000`` is accepted)."""
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions"


class ChatClient:
    """Concurrent, retrying, time-bounded calls to ``POST <base_url>/chat/completions``.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000/v1`` (``vllm serve`` listens on port 8000).
        model: the served model name (``vllm serve PATH --served-model-name NAME``; by default the path).
        api_key_env: environment variable holding a bearer token (unset or empty: no Authorization header).
        timeout_s: limit of one try (connect, and each wait for reply bytes), in seconds.
        max_retries: further tries after a retryable failure (0 = one try).
        retry_backoff_s: wait before the first retry; doubled for each further one.
        concurrency: requests in flight at once.
        max_tokens: reply length cap sent with each request.
        temperature: sampling temperature sent with each request (0 = greedy).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 2, retry_backoff_s: float = 0.5,
                 concurrency: int = 32, max_tokens: int = 16, temperature: float = 0.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout_s <= 0 or max_retries < 0 or retry_backoff_s < 0 or concurrency < 1 or max_tokens < 1:
            raise ValueError(f"need timeout_s > 0, max_retries >= 0, retry_backoff_s >= 0, concurrency >= 1, "
                             f"max_tokens >= 1; got {timeout_s}, {max_retries}, {retry_backoff_s}, {concurrency}, "
                             f"{max_tokens}")
        self.base_url, self.model, self.url = base_url, model, chat_url(base_url)
        self.api_key_env = api_key_env
        self.timeout_s, self.max_retries, self.retry_backoff_s = float(timeout_s), max_retries, retry_backoff_s
        self.concurrency, self.max_tokens, self.temperature = concurrency, max_tokens, temperature
        self.requests = 0  # HTTP requests sent, retries included
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ChatClient({self.url}, model={self.model!r})"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env or "", "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _try_once(self, messages: Sequence[Message]) -> str:
        """One HTTP request; the reply text or EndpointError."""
        body = json.dumps({"model": self.model, "messages": list(messages), "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode()
        request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
        with self._lock:
            self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                payload = reply.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode("utf-8", "replace")
            raise EndpointError("http", f"HTTP {err.code} from {self.url}: {detail}", err.code) from err
        except TimeoutError as err:
            raise EndpointError("timeout", f"no reply from {self.url} within {self.timeout_s:g} s") from err
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError | socket.timeout):
                raise EndpointError("timeout", f"no reply from {self.url} within {self.timeout_s:g} s") from err
            raise EndpointError("connection", f"cannot reach {self.url}: {err.reason}") from err
        except (ConnectionError, OSError) as err:
            raise EndpointError("connection", f"cannot reach {self.url}: {err}") from err
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise EndpointError("malformed", f"{self.url} sent no choices[0].message.content: "
                                             f"{payload[:200]!r}") from err
        if not isinstance(content, str):
            raise EndpointError("malformed", f"{self.url} sent a non-text message content: {content!r}")
        return content

    def complete(self, messages: Sequence[Message]) -> str:
        """The reply to one conversation, with retries; raises the last EndpointError."""
        for attempt in range(self.max_retries + 1):
            try:
                return self._try_once(messages)
            except EndpointError as err:
                if not err.retryable or attempt == self.max_retries:
                    raise
                time.sleep(self.retry_backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def complete_many(self, conversations: Sequence[Sequence[Message]]) -> list[str | EndpointError]:
        """Replies to many conversations, ``concurrency`` at a time, in order; failures as EndpointError."""
        def one(messages: Sequence[Message]) -> str | EndpointError:
            try:
                return self.complete(messages)
            except EndpointError as err:
                return err

        if len(conversations) <= 1:
            return [one(c) for c in conversations]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations))) as pool:
            return list(pool.map(one, conversations))


def user_turn(text: str, system: str | None = None) -> list[Message]:
    """A one-question conversation, with an optional system message first."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def describe(value: Any) -> str:
    """A short, single-line rendering of a reply for log messages."""
    text = str(value).replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."
