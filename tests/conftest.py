"""Shared fixtures: tiny real VLM folders (one per family, built once per session) and per-test hygiene."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from modules.tiny import FAMILIES


@pytest.fixture(autouse=True)
def _seed_and_threads(monkeypatch):
    """Every test starts from the same torch RNG state, on one thread (the machine's cores are shared), and with
    no run seed left behind by an earlier test's `seed_everything` (components default to it)."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """Factory `family -> folder` of a random-init tiny VLM (seed 0), built once per family per session.

    The folders are shared by all tests: treat them as read-only (save changed copies elsewhere).
    """
    from modules.tiny import make_tiny

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
        if family not in built:
            built[family] = make_tiny(tmp_path_factory.mktemp(f"tiny-{family}"), family, seed=0)
        return built[family]

    return get
