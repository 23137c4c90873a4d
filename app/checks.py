"""Pre-flight checks on the parsed config, before any weights load: mistakes that would otherwise surface minutes
later, deep in a traceback (or not at all). Each raises a `UserError` naming the key and what to do.

Run by the CLI (`R1VCLI.before_instantiate_classes`) for `fit`: GPUs asked for on a machine without CUDA, a vLLM
rollout engine without vLLM installed, FSDP2 (`ModelParallelStrategy`) sizes that would not shard, a curriculum
overlay on an SFT run, data files that match nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from jsonargparse import Namespace

from app.errors import UserError
from app.resume import is_subclass, value_of


def _class_path(spec: Any) -> str | None:
    return spec.get("class_path") if isinstance(spec, Namespace | dict) else None


def check_accelerator(trainer: Namespace) -> None:
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"trainer.accelerator is {accelerator!r} but this machine has no CUDA GPU",
                            "--trainer.accelerator (configs/r1v3/* and configs/scale/* are for GPU machines)",
                            "on CPU run configs/tiny/*.yaml, or add --trainer.accelerator cpu --trainer.devices 1 "
                            "--trainer.num_nodes 1 --trainer.strategy auto")


def _has_vllm() -> bool:
    if "vllm" in sys.modules:  # None: imports of it are blocked
        return sys.modules["vllm"] is not None
    return importlib.util.find_spec("vllm") is not None


def check_rollout_engine(model: Namespace) -> None:
    rollout = value_of(model.get("init_args"), "rollout")
    if is_subclass(_class_path(rollout), "modules.vllm_engine.VLLMRolloutEngine") and \
            not _has_vllm():
        raise UserError(f"the rollout engine {_class_path(rollout)} needs vLLM, which is not installed",
                        "--model.init_args.rollout",
                        "install the extra (`pip install -e .[vllm]`; on CPU see docs), or use "
                        "--model.init_args.rollout modules.rollout.HFRolloutEngine")


def _world_size(trainer: Namespace) -> int | None:
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if isinstance(devices, int):
        return devices * nodes
    if isinstance(devices, list | tuple):
        return len(devices) * nodes
    if isinstance(devices, str) and devices.isdigit():
        return int(devices) * nodes
    return None  # "auto" / "-1": known only once the accelerator is up


def check_fsdp2_sizes(trainer: Namespace) -> None:
    strategy = trainer.get("strategy")
    if not is_subclass(_class_path(strategy), "lightning.pytorch.strategies.ModelParallelStrategy"):
        return
    init = strategy.get("init_args") or Namespace()
    # modules.sharding.FSDP2Strategy: tensor parallel 1 and data parallel over every rank by default
    fsdp2 = is_subclass(_class_path(strategy), "modules.sharding.FSDP2Strategy")
    dp, tp = init.get("data_parallel_size", "auto"), init.get("tensor_parallel_size", 1 if fsdp2 else "auto")
    world = _world_size(trainer)
    nodes = trainer.get("num_nodes") or 1
    tp_eff = (world // nodes if world else None) if tp == "auto" else tp
    if dp != "auto":
        dp_eff = dp
    elif fsdp2:
        dp_eff = world // tp_eff if world and isinstance(tp_eff, int) else None
    else:
        dp_eff = nodes  # Lightning's defaults: data parallel over nodes, tensor within
    where = "--trainer.strategy.init_args.data_parallel_size / tensor_parallel_size"
    if world and isinstance(dp_eff, int) and isinstance(tp_eff, int) and dp_eff * tp_eff != world:
        raise UserError(f"ModelParallelStrategy: data_parallel_size {dp_eff} x tensor_parallel_size {tp_eff} "
                        f"!= {world} processes (num_nodes x devices)", where,
                        f"make the product {world}, e.g. data_parallel_size {world} and tensor_parallel_size 1")
    if world and world > 1 and dp_eff == 1:
        raise UserError(f"ModelParallelStrategy with data_parallel_size 1 over {world} processes shards nothing "
                        "(this app applies FSDP2 fully_shard over the data-parallel ranks; the default sizes put "
                        "every device in the tensor-parallel dimension)", where,
                        f"set data_parallel_size {world} and tensor_parallel_size 1")


def check_curriculum(config: Namespace) -> None:
    callbacks = config.trainer.get("callbacks") or []
    curriculum = [c for c in callbacks if is_subclass(_class_path(c), "callbacks.curriculum.CurriculumCallback")]
    if not curriculum:
        return
    model = _class_path(config.get("model"))
    sft = (config.get("data") or Namespace()).get("mode") == "sft" or \
        not is_subclass(model, "modules.grpo_module.GRPOModule")
    if sft:
        raise UserError(f"a curriculum (CurriculumCallback) on an SFT run ({model}, data.mode "
                        f"{config.data.get('mode')!r}): it orders prompts by GRPO rewards and pass rates, which SFT "
                        "does not produce", "--config configs/curriculum/*.yaml (trainer.callbacks)",
                        "put the overlay on a GRPO config: --config configs/tiny/grpo.yaml --config "
                        "configs/curriculum/<strategy>.yaml")


def check_data_files(data: Namespace, subcommand: str) -> None:
    from datamodules.vlm_datamodule import expand_files

    keys = ["train_files", "val_files"] if subcommand == "fit" else ["val_files"]
    for key in keys:
        spec = data.get(key)
        if spec:
            try:
                expand_files(spec)
            except FileNotFoundError as err:
                raise UserError(f"data.{key}: no data file matches {spec!r}", f"--data.{key}",
                                "generate the embedded default with `python -m app.make_data artifacts/data`, "
                                "or point it at .parquet/.jsonl files, a folder or a glob") from err


def preflight(config: Namespace, subcommand: str) -> None:
    """All checks that apply to `subcommand`; the first failure raises."""
    if subcommand not in ("fit", "validate", "test", "predict"):
        return
    check_accelerator(config.trainer)
    check_fsdp2_sizes(config.trainer)
    if isinstance(config.get("model"), Namespace):
        check_rollout_engine(config.model)
    if subcommand == "fit":
        check_curriculum(config)
    if isinstance(config.get("data"), Namespace):
        check_data_files(config.data, subcommand)


def check_config_files(argv: list[str]) -> None:
    """Each `--config FILE` that exists must be valid YAML (jsonargparse's message names no file)."""
    import yaml

    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                yaml.safe_load(f)
        except OSError:
            continue  # a missing file is reported by the parser
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UserError(f"{path}: not valid YAML ({problem}{at})", f"--config {path}",
                            "fix the YAML syntax there (indentation, brackets, `key: value`)") from err
