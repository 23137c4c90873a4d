"""`--ckpt_path last`: find the run's newest `last*.ckpt` before anything is built, and continue that run.

Lightning keeps a run's checkpoints in `<save_dir>/<name>/<version>/checkpoints` (the first logger's folder) when
`ModelCheckpoint.dirpath` is not set, and every fresh start opens a new `version_N`. Lightning's own `last` looks
only in the folder of the version the *new* process just opened, which is empty, so it warns and trains from
step 0. The CLI resolves `last` first (`resolve_last`), the way a Lightning user expects it to work:

* it searches every folder the configured `ModelCheckpoint`s would write to: a set `dirpath` as is, otherwise
  every version of the first logger (`<save_dir>/<name>/*/checkpoints`), or `<default_root_dir>/checkpoints`
  without a logger; the newest `last*.ckpt` (file, or folder for sharded checkpoints) by modification time wins;
* the loggers are pinned to the version that wrote it (or, with a set `dirpath`, to their newest version), so the
  resumed run writes its TensorBoard curves and its next checkpoints where the interrupted one did: one run, one
  folder, one curve (`callbacks.fault_tolerance.ContinueCurves` drops the steps after the checkpoint that the
  interrupted run had logged);
* nothing found is an error naming the folders searched (`NothingToResume`), never a warning and a fresh start.

A fresh run (no `--ckpt_path`) is unchanged: a new version with its own checkpoints, so it never overwrites them.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint

from app.errors import UserError

_VERSIONED = ("lightning.pytorch.loggers.TensorBoardLogger", "lightning.pytorch.loggers.CSVLogger")
_LAST = re.compile(rf"^{ModelCheckpoint.CHECKPOINT_NAME_LAST}(-(\d+))?{re.escape(ModelCheckpoint.FILE_EXTENSION)}$")


class NothingToResume(UserError):
    """`--ckpt_path last` found no checkpoint."""


@dataclass
class Resume:
    """The checkpoint `last` stands for, and the logger versions the resumed run continues."""

    ckpt_path: str
    versions: dict[int, str] = field(default_factory=dict)  # logger index -> version folder name
    searched: list[str] = field(default_factory=list)


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def is_subclass(class_path: str | None, base: type | str) -> bool:
    cls = _import(class_path) if class_path else None
    base = _import(base) if isinstance(base, str) else base
    return isinstance(cls, type) and isinstance(base, type) and issubclass(cls, base)


def value_of(ns: Any, key: str, default: Any = None) -> Any:
    if isinstance(ns, Namespace | dict):
        value = ns.get(key, default)
        return default if value is None else value
    return default


def default_logger(root: str) -> Namespace:
    """What Lightning builds for `logger: true` (a TensorBoardLogger in `<default_root_dir>/lightning_logs`, version
    the SLURM job id under SLURM), spelled out so its version can be pinned."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                     init_args=Namespace(save_dir=root, name="lightning_logs", version=SLURMEnvironment.job_id()))


def logger_specs(trainer: Namespace) -> list[Namespace]:
    """The trainer's loggers as a list of `Namespace(class_path, init_args)` (`logger: true` spelled out)."""
    logger = trainer.get("logger")
    root = trainer.get("default_root_dir") or os.getcwd()
    if logger is None or logger is True:
        return [default_logger(root)]
    if logger is False:
        return []
    return list(logger) if isinstance(logger, list | tuple) else [logger]


def _versioned(spec: Any) -> bool:
    return isinstance(spec, Namespace) and any(is_subclass(spec.get("class_path"), base) for base in _VERSIONED)


def _logger_root(spec: Namespace, root: str) -> str:
    """`<save_dir>/<name>` of a TensorBoard/CSV logger: the folder of its versions."""
    init = spec.get("init_args") or Namespace()
    name = init.get("name", "lightning_logs")
    return os.path.join(str(value_of(init, "save_dir", root)), str(name or ""))


def _version_name(version: int | str) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def checkpoint_folders(trainer: Namespace) -> list[str]:
    """Glob patterns of every folder the configured checkpoint callbacks write `last` to."""
    root = trainer.get("default_root_dir") or os.getcwd()
    callbacks = trainer.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
    dirpaths = [value_of(c.get("init_args"), "dirpath") for c in callbacks
                if isinstance(c, Namespace) and is_subclass(c.get("class_path"), ModelCheckpoint)]
    if not dirpaths and trainer.get("enable_checkpointing") is not False:
        dirpaths = [None]  # Lightning adds a ModelCheckpoint of its own
    dirpaths += [value_of(c.get("init_args"), "dirpath") for c in callbacks if isinstance(c, Namespace)
                 and is_subclass(c.get("class_path"), "callbacks.fault_tolerance.PreemptionCheckpoint")
                 and value_of(c.get("init_args"), "dirpath")]
    loggers = logger_specs(trainer)
    folders: list[str] = []
    for dirpath in dirpaths:
        if dirpath:
            folder = str(dirpath)
        elif not loggers:
            folder = os.path.join(root, "checkpoints")
        elif _versioned(loggers[0]):
            version = value_of(loggers[0].get("init_args"), "version")
            sub = glob.escape(_logger_root(loggers[0], root))
            folder = os.path.join(sub, "*" if version is None else glob.escape(_version_name(version)), "checkpoints")
        else:  # a logger whose folder is only known once it runs (WandB, MLflow, ...): Lightning's rule applies
            continue
        if folder not in folders:
            folders.append(folder)
    return folders


def find_last(folders: list[str]) -> str | None:
    """The newest `last.ckpt` / `last-vN.ckpt` (file or sharded folder) in `folders` (glob patterns)."""
    found = []
    for pattern in folders:
        for folder in glob.glob(pattern) if glob.has_magic(pattern) else [pattern]:
            if os.path.isdir(folder):
                found += [os.path.join(folder, n) for n in os.listdir(folder) if _LAST.match(n)]
    return max(found, key=os.path.getmtime) if found else None


def _newest_version(logger_root: str) -> str | None:
    if not os.path.isdir(logger_root):
        return None
    subs = [d for d in os.listdir(logger_root) if os.path.isdir(os.path.join(logger_root, d))]
    numbered = [d for d in subs if re.fullmatch(r"version_\d+", d)]
    if numbered:
        return max(numbered, key=lambda d: int(d.split("_")[1]))
    return max(subs, key=lambda d: os.path.getmtime(os.path.join(logger_root, d))) if subs else None


def resolve_last(trainer: Namespace) -> Resume:
    """The checkpoint `--ckpt_path last` means for this trainer config, and the logger versions to continue.

    Raises:
        NothingToResume: no `last*.ckpt` in any folder the config's checkpoints go to.
    """
    folders = checkpoint_folders(trainer)
    path = find_last(folders)
    if path is None:
        searched = "\n".join(f"    {f}" for f in folders) or "    (none: the config saves no checkpoints)"
        raise NothingToResume(
            "--ckpt_path last: no checkpoint to resume from",
            where=f"searched for last*.ckpt in:\n{searched}",
            fix="check --trainer.default_root_dir (and the logger's save_dir) are those of the run to resume, "
                "or start a fresh run: leave out --ckpt_path")
    root = trainer.get("default_root_dir") or os.getcwd()
    versions: dict[int, str] = {}
    for i, spec in enumerate(logger_specs(trainer)):
        if not _versioned(spec) or value_of(spec.get("init_args"), "version") is not None:
            continue
        logger_root = _logger_root(spec, root)
        ckpt_folder = os.path.dirname(os.path.abspath(path))
        if i == 0 and os.path.dirname(os.path.dirname(ckpt_folder)) == os.path.abspath(logger_root):
            versions[i] = os.path.basename(os.path.dirname(ckpt_folder))
        elif (newest := _newest_version(logger_root)) is not None:
            versions[i] = newest
    return Resume(ckpt_path=path, versions=versions, searched=folders)


def pin_versions(trainer: Namespace, versions: dict[int, str]) -> None:
    """Write the resumed versions into the trainer config (`logger: true` becomes the logger Lightning would
    build, spelled out)."""
    if not versions:
        return
    specs = logger_specs(trainer)
    for i, version in versions.items():
        specs[i].init_args.version = version
    logger = trainer.get("logger")
    trainer.logger = specs if isinstance(logger, list | tuple) else specs[0]
