"""Helpers the fault-tolerance tests load into real `python -m app fit` subprocesses (by class_path)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modules.rewards import Reward
from modules.vllm_engine import VLLMRolloutEngine


class OddLengthReward(Reward):
    """A reward a random-init model earns half the time (odd-length responses score 1), so GRPO advantages and
    losses are non-zero and depend on exactly which tokens were sampled."""

    name = "odd_length"

    def score_one(self, response: str, record: Mapping[str, Any]) -> float:
        return float(len(response) % 2)


class VerifierDownReward(Reward):
    """A batch reward whose verifier service stays down: the batch call fails, as a remote verifier's client does
    once its retries are spent (an error during training; per-response failures would score 0 instead)."""

    name = "verifier_down"

    def score_one(self, response: str, record: Mapping[str, Any]) -> float:  # pragma: no cover - never reached
        return 0.0

    def __call__(self, responses, records) -> list[float]:
        raise ConnectionError("verifier http://127.0.0.1:9/verify did not answer (3 tries in 30 s)")


class NoSyncVLLMEngine(VLLMRolloutEngine):
    """A broken weight sync: vLLM gets the weights once (the engine is stale after set-up), never the updates."""

    def sync_weights(self, model) -> None:
        pass
