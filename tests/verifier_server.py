"""A small OpenAI-compatible chat-completions server for tests, run as a subprocess on localhost.

    python tests/verifier_server.py [--table RULES.json] [--model DIR] [--max-tokens N]

It binds 127.0.0.1 on a free port and prints ``port <n>`` on stdout once it accepts connections. Replies:

* ``--model DIR``: real greedy generation with a transformers causal LM and its tokenizer's chat template
  (``make_tiny_text_lm`` builds a tiny random one, whose replies are garbage to a verdict parser);
* otherwise a table of rules (JSON list), the first whose ``match`` occurs in the last user message wins:
  ``{"match": "\\\\boxed", "reply": "yes", "delay": 0.5, "status": 500, "fail_times": 2}``: sleep ``delay``
  seconds, then answer HTTP ``status`` for the first ``fail_times`` requests that match (every time when
  ``fail_times`` is absent), else ``reply``. No rule matches: the reply "no".

``GET /stats`` returns ``{"requests": n, "spans": [[start, end], ...], "texts": [...], "exchanges":
[[text, reply], ...]}`` (server-side ``time.monotonic`` of each request's arrival and reply), ``POST /reset`` clears them, ``GET /v1/models``
lists the model. Standard library only, plus torch/transformers in ``--model`` mode.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def last_user_text(messages: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


class State:
    def __init__(self, rules: list[dict[str, Any]], model_dir: str | None, max_tokens: int) -> None:
        self.rules, self.lock = rules, threading.Lock()
        self.spans: list[list[float]] = []
        self.texts: list[str] = []
        self.exchanges: list[list[str]] = []  # [user text, reply] in reply order
        self.fails: dict[int, int] = {}
        self.model = self.tokenizer = None
        self.max_tokens = max_tokens
        if model_dir:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            torch.set_num_threads(1)
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
            self.generate_lock = threading.Lock()

    def reply(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[int, str]:
        """(HTTP status, reply text) for one conversation."""
        text = last_user_text(messages)
        with self.lock:
            self.texts.append(text)
        if self.model is not None:
            return 200, self.generate(messages, max_tokens)
        for index, rule in enumerate(self.rules):
            if rule.get("match", "") in text:
                time.sleep(float(rule.get("delay", 0.0)))
                if "status" in rule:
                    with self.lock:
                        self.fails[index] = self.fails.get(index, 0) + 1
                        failing = self.fails[index] <= rule.get("fail_times", float("inf"))
                    if failing:
                        return int(rule["status"]), "injected failure"
                return 200, str(rule.get("reply", ""))
        return 200, "no"

    def generate(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
        with self.generate_lock, torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=min(max_tokens, self.max_tokens), do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep the test output clean
            pass

        def send_json(self, status: int, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/stats":
                with state.lock:
                    self.send_json(200, {"requests": len(state.spans), "spans": state.spans, "texts": state.texts,
                                         "exchanges": state.exchanges})
            elif self.path.rstrip("/") == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{"id": "verifier", "object": "model"}]})
            else:
                self.send_json(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            start = time.monotonic()
            length = int(self.headers.get("Content-Length", 0))
            request = json.loads(self.rfile.read(length) or b"{}")
            if self.path == "/reset":
                with state.lock:
                    state.spans, state.texts, state.fails, state.exchanges = [], [], {}, []
                self.send_json(200, {"ok": True})
                return
            if self.path != "/v1/chat/completions":
                self.send_json(404, {"error": f"no route {self.path}"})
                return
            status, text = state.reply(request.get("messages", []), int(request.get("max_tokens", 16)))
            with state.lock:
                state.spans.append([start, time.monotonic()])
                state.exchanges.append([last_user_text(request.get("messages", [])), text])
            if status != 200:
                self.send_json(status, {"error": {"message": text}})
                return
            self.send_json(200, {"id": "cmpl-test", "object": "chat.completion", "model": request.get("model"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}]})

    return Handler


@contextmanager
def running_server(tmp_path: Path, rules: list[dict[str, Any]] | None = None, model: str | Path | None = None,
                   startup_s: float = 120.0) -> Iterator[str]:
    """Start this server in a subprocess, yield its base URL (``http://127.0.0.1:<port>/v1``), stop it after."""
    cmd = [sys.executable, str(Path(__file__).resolve())]
    if model is not None:
        cmd += ["--model", str(model)]
    else:
        table = tmp_path / f"rules-{time.monotonic_ns()}.json"
        table.write_text(json.dumps(rules or []))
        cmd += ["--table", str(table)]
    log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        port = _read_port(proc, startup_s, log_path)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def _read_port(proc: subprocess.Popen, startup_s: float, log_path: Path) -> int:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(startup_s)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("port "):
        raise RuntimeError(f"verifier test server did not start within {startup_s} s: {line!r} "
                           f"{log_path.read_text()[-2000:]}")
    return int(line.split()[1])


def stats(base_url: str) -> dict[str, Any]:
    """The server's request log (``GET /stats``)."""
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=10) as reply:
        return json.loads(reply.read())


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_tiny_text_lm(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-init tiny Qwen2 causal LM with the project's tiny tokenizer and a ChatML template."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from modules.tiny import SPECS, _text_config, train_tokenizer

    out = Path(out_dir)
    tok = train_tokenizer("llava")
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                         "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                         "{{ '<|im_start|>assistant\\n' }}{% endif %}")
    config = Qwen2Config(**{k: v for k, v in _text_config(SPECS["tiny"], len(tok), tok).items() if k != "model_type"})
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, help="JSON list of reply rules")
    parser.add_argument("--model", help="transformers causal LM folder (real generation)")
    parser.add_argument("--max-tokens", type=int, default=8, help="cap on generated tokens in --model mode")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    rules = json.loads(args.table.read_text()) if args.table else []
    ThreadingHTTPServer.request_queue_size = 1024  # a burst of concurrent clients is not refused (default 5)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(State(rules, args.model, args.max_tokens)))
    server.daemon_threads = True
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
