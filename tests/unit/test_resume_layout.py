"""`--ckpt_path last` finds every shipped config's checkpoints, and the resumed run writes where the first one did.

For each shipped config (and each overlay on the base its header names), parsed by the real CLI in a temporary
working folder: a real Trainer built from the config's loggers and checkpoint callbacks says where a fresh run
keeps `last.ckpt` (Lightning's own rule); a `last.ckpt` is put there; then `app.resume.resolve_last` must find it,
and a second Trainer built from the config with the pinned logger versions must use that same folder, where
Lightning alone (the bug of issue 27) opens a new version. tests/integration/test_resume.py runs the real thing.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from importlib import import_module
from pathlib import Path

import pytest
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from app.cli import R1VCLI, cli_main
from app.resume import NothingToResume, logger_specs, pin_versions, resolve_last

ROOT = Path(__file__).resolve().parents[2]
BASES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/*.yaml")
               if p.parent.name in ("tiny", "r1v3"))


def _overlays() -> list[tuple[str, str]]:
    """(base, overlay) for every overlay, on the base its header's example command names."""
    out = []
    for p in sorted((ROOT / "configs").glob("*/*.yaml")):
        if p.parent.name in ("scale", "curriculum"):
            m = re.search(r"--config (configs/\S+\.yaml) --config " + re.escape(str(p.relative_to(ROOT))), p.read_text())
            assert m, f"{p}: its header names no base config (`--config BASE --config {p.relative_to(ROOT)}`)"
            out.append((m.group(1), str(p.relative_to(ROOT))))
    return out


COMBOS = [(b,) for b in BASES] + _overlays()


class _Parsed(Exception):
    def __init__(self, config: Namespace) -> None:
        self.config = config


@pytest.fixture
def parse(monkeypatch, tmp_path):
    """`configs -> trainer Namespace`, parsed by the real CLI (nothing instantiated), relative paths under tmp."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])

    def stop(self):
        raise _Parsed(self.config[self.subcommand])

    monkeypatch.setattr(R1VCLI, "before_instantiate_classes", stop)

    def run(*configs: str) -> Namespace:
        args = ["fit"] + [a for c in configs for a in ("--config", str(ROOT / c))]
        with pytest.raises(_Parsed) as parsed:
            cli_main(args)
        return parsed.value.config.trainer

    return run


def _class(spec: Namespace) -> type:
    module, _, name = spec.class_path.rpartition(".")
    return getattr(import_module(module), name)


def _build(spec: Namespace):
    return _class(spec)(**(spec.get("init_args") or Namespace()).as_dict())


def _last_path(trainer_cfg: Namespace) -> Path:
    """Where Lightning's first ModelCheckpoint puts `last.ckpt` for this config (a real Trainer decides)."""
    callbacks = [_build(c) for c in trainer_cfg.get("callbacks") or [] if issubclass(_class(c), ModelCheckpoint)]
    loggers = [_build(s) for s in logger_specs(trainer_cfg)]
    trainer = Trainer(logger=loggers or False, callbacks=callbacks, default_root_dir=trainer_cfg.default_root_dir,
                      accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)
    ckpt = trainer.checkpoint_callback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Checkpoint directory ... exists and is not empty": that's the point
        ckpt.setup(trainer, None, "fit")  # resolves its folder the way a fit does
    return Path(ckpt.dirpath) / "last.ckpt"


def _id(combo: tuple[str, ...]) -> str:
    return "+".join(str(Path(c).with_suffix("")).removeprefix("configs/") for c in combo)


@pytest.mark.parametrize("configs", COMBOS, ids=[_id(c) for c in COMBOS])
def test_ckpt_path_last_finds_the_run_and_the_resumed_run_writes_in_the_same_folder(parse, configs):
    parsed = parse(*configs)
    with pytest.raises(NothingToResume, match="no checkpoint to resume from"):
        resolve_last(parsed.clone())

    first = _last_path(parsed.clone())
    first.parent.mkdir(parents=True)
    first.write_bytes(b"")  # the first run's `last`

    assert _last_path(parsed.clone()) != first  # Lightning alone: a new version, `last` not found (issue 27)

    trainer_cfg = parsed.clone()
    resume = resolve_last(trainer_cfg)
    assert Path(resume.ckpt_path).resolve() == first.resolve()
    pin_versions(trainer_cfg, resume.versions)
    assert _last_path(trainer_cfg).resolve() == first.resolve()  # the resumed run keeps writing there


def test_newest_last_of_several_runs_wins_and_its_version_continues(parse):
    parsed = parse("configs/tiny/grpo.yaml")
    paths = []
    for mtime in (200, 100):  # version_0 written last
        path = _last_path(parsed.clone())
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))
        paths.append(path)
    assert [p.parent.parent.name for p in paths] == ["version_0", "version_1"]
    resume = resolve_last(parsed.clone())
    assert Path(resume.ckpt_path) == paths[0] and resume.versions == {0: "version_0"}
