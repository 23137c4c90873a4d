"""FSDP2 sharding of a VLM policy (`torch.distributed.fsdp.fully_shard`), and gathering full weights back.

One home for the sharding policy. Under `lightning.pytorch.strategies.ModelParallelStrategy` (or `FSDP2Strategy`
below, which shards over every rank by default) the modules' `configure_model` calls `FSDP2Sharding.apply`:

- one FSDP unit per repeated transformer block: the language model's decoder layers and the vision encoder's
  layers (the classes the checkpoint lists in `_no_split_modules` that sit in a `ModuleList`);
- then the roots: the inner `model.model` (embeddings, final norm, the rest of the vision tower, connector) and
  `model.lm_head` are each their own unit. The GRPO code calls both directly (`response_hidden` runs
  `model.model`, `token_logprobs` runs `model.lm_head` chunk by chunk), so neither may hide inside a wrapper
  whose forward is never called. The top `...ForConditionalGeneration` holds no parameter of its own.

Parameters become `DTensor`s sharded on dim 0 over the data-parallel mesh; gradients are reduce-scattered with
an average over ranks (as DDP's all-reduce), so the modules' global token-mean denominators carry over unchanged.
`clip_grad_norm_` over the DTensor gradients returns the global norm on every rank.

Activation checkpointing is the modules' `gradient_checkpointing` flag (transformers' own, which also tells the
GRPO forward to drop the shared-prompt KV cache): it composes with `fully_shard`. CPU offload and bf16 parameters
for compute are options here.
"""

from __future__ import annotations

import shutil
from collections.abc import Container, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn


class FSDP2Sharding:
    """How a policy is sharded with FSDP2 (a YAML component: `model.init_args.sharding`).

    Args:
        cpu_offload: keep sharded parameters, gradients and optimizer states in CPU memory (the optimizer step
            runs on CPU); fits much larger models per GPU, much slower.
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3); False keeps them
            until the backward (ZeRO-2-like: more memory, one all-gather less per block).
        param_dtype: dtype blocks compute in (e.g. bfloat16), with float32 shards kept as master weights;
            None computes in the weights' own dtype (use the trainer's `precision: bf16-mixed` autocast instead).
        reduce_dtype: dtype of the gradient reduce-scatter (None: param_dtype, float32 recommended with bf16).
    """

    def __init__(self, cpu_offload: bool = False, reshard_after_forward: bool = True, param_dtype: str | None = None,
                 reduce_dtype: str | None = "float32"):
        self.cpu_offload, self.reshard_after_forward = cpu_offload, reshard_after_forward
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype

    def _kwargs(self, mesh: Any) -> dict[str, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        from modules.loading import DTYPES

        kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward}
        kw["offload_policy"] = (CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.cpu_offload
                                else OffloadPolicy())
        if self.param_dtype is not None:
            reduce = DTYPES[self.reduce_dtype] if self.reduce_dtype else None
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=DTYPES[self.param_dtype], reduce_dtype=reduce)
        return kw

    def apply(self, model: nn.Module, mesh: Any) -> nn.Module:
        """Shard `model` in place over `mesh` (1-D, the data-parallel dimension): blocks, then the roots."""
        from torch.distributed.fsdp import fully_shard

        check_shardable(model)
        kw = self._kwargs(mesh)
        for block in shard_units(model):
            fully_shard(block, **kw)
        fully_shard(model.model, **{**kw, "reshard_after_forward": False})  # roots keep weights until backward
        fully_shard(model.lm_head, **{**kw, "reshard_after_forward": False})
        return model


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (LM decoder layers, vision encoder layers), in module order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(model).__name__} lists no `_no_split_modules`: cannot tell its transformer blocks")
    units = [m for lst in model.modules() if isinstance(lst, nn.ModuleList)
             for m in lst if type(m).__name__ in names]
    if not units:
        raise ValueError(f"{type(model).__name__}: no blocks of {sorted(names)} found in a ModuleList")
    return units


def check_shardable(model: nn.Module) -> None:
    """The layout `apply` relies on: every parameter under `model.model` or `model.lm_head`, untied head."""
    if list(model._parameters) or not hasattr(model, "model") or not hasattr(model, "lm_head"):
        raise ValueError(f"{type(model).__name__}: expected parameters only under `.model` and `.lm_head`")
    emb = model.get_input_embeddings().weight
    if model.lm_head.weight is emb:
        raise ValueError(
            f"{type(model).__name__} ties lm_head to the input embeddings (tie_word_embeddings=true): FSDP2 "
            "sharding here shards the head on its own; train this model with DDP (strategy: ddp) instead")


def is_sharded(model: nn.Module | None) -> bool:
    """True when `model` (or part of it) is managed by FSDP2."""
    if model is None:
        return False
    from torch.distributed.fsdp import FSDPModule

    roots = (model, getattr(model, "model", None), getattr(model, "lm_head", None))  # where `apply` puts units
    return any(isinstance(m, FSDPModule) for m in roots)


def shard_for_strategy(model: nn.Module, trainer: Any, sharding: FSDP2Sharding | None) -> nn.Module:
    """Shard `model` when the run's strategy is Lightning's ModelParallelStrategy; else return it as it is."""
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, ModelParallelStrategy):
        return model
    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"ModelParallelStrategy with tensor_parallel_size={mesh['tensor_parallel'].size()}: this app shards "
            "with FSDP2 only; set data_parallel_size to the number of ranks and tensor_parallel_size: 1 "
            "(or use modules.sharding.FSDP2Strategy, which does)")
    return (sharding or FSDP2Sharding()).apply(model, mesh["data_parallel"])


def all_ranks_true(model: nn.Module, flag: bool) -> bool:
    """`flag` and-ed over ranks when `model` is sharded (ranks must run the same forwards); else `flag`."""
    if not is_sharded(model) or not torch.distributed.is_initialized():
        return flag
    device = next(model.parameters()).device  # nccl needs a GPU tensor, gloo a CPU one
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return int(t) == 0


def full_parameters(model: nn.Module, names: Container[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter (or those in `names`), gathering `DTensor` shards one at a time.

    Every rank must iterate it to the end (each gather is a collective); every rank gets the full tensors.
    Names are `named_parameters()` names (FSDP2 adds no wrapper segment).
    """
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        if names is not None and name not in names:
            continue
        t = p.detach()
        yield name, (t.full_tensor() if isinstance(t, DTensor) else t)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict with full tensors on rank 0, on CPU (gathered once); {} on other ranks.

    Collective when `model` is sharded: every rank calls it. Unsharded models return their own state dict.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with FSDP2 over every rank by default (tensor parallel size 1).

    The parent's defaults put the ranks of a node on the tensor-parallel axis (2 CPU processes: data parallel 1,
    tensor parallel 2, i.e. no sharding at all); here `data_parallel_size` defaults to the world size.
    """

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int | str = 1,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """A sharded checkpoint is written to `<path>.partial` and renamed into place by rank 0 once every rank
        has written, so a kill during the save (or a preemption) never leaves a half-written `last.ckpt`."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
        if self.is_global_zero:
            for stale in (tmp, old):
                if stale.exists():
                    shutil.rmtree(stale)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.is_global_zero:
            if path.is_dir():
                path.rename(old)
            elif path.exists():
                path.unlink()
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // int(self._tensor_parallel_size)
        super().setup_environment()


def all_ranks_state(state: Any) -> list[Any]:
    """Every rank's `state` (a picklable object), in rank order, on every rank; [state] when not distributed.

    Collective: Lightning builds the checkpoint dict on every rank (rank 0 writes it), so per-rank state such as a
    sampler's random generator goes in as this list.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, state)
    return out


def rank_state(checkpoint: dict, key: str, rank: int, world_size: int) -> Any:
    """This rank's entry of `checkpoint[key + "_ranks"]` when written by as many ranks, else `checkpoint[key]`."""
    ranks = checkpoint.get(f"{key}_ranks")
    if isinstance(ranks, list) and len(ranks) == world_size:
        return ranks[rank]
    return checkpoint.get(key)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one dict with full tensors, in this process (no process group needed).

    A file is read with `torch.load(weights_only=True)`; a sharded checkpoint (a folder of per-rank shards plus
    Lightning's `meta.pt`, as ModelParallelStrategy writes) is assembled in CPU memory by Lightning's own reader.
    """
    p = Path(path)
    if p.is_dir():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        if not (p / ".metadata").is_file():
            raise FileNotFoundError(f"{p} is a folder but not a sharded checkpoint (no .metadata file)")
        return _load_distributed_checkpoint(p)
    return torch.load(p, map_location="cpu", weights_only=True)  # a checkpoint is data, never code


def load_module_weights(module: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's `state_dict` into `module` (a LightningModule), sharded or not.

    Sharded module: collective (every rank calls it); each rank reads its own shards from a sharded checkpoint
    (or its slice of a full one).
    """
    if is_sharded(getattr(module, "policy", module)):
        from lightning.fabric.strategies.model_parallel import _load_checkpoint

        _load_checkpoint(Path(path), {"state_dict": module}, strict=True, weights_only=True)
        return
    module.load_state_dict(read_checkpoint(path)["state_dict"])


def export_policy(policy: nn.Module, processor: Any, out_dir: str | Path, is_global_zero: bool = True) -> Path | None:
    """Write the policy as a stock Hugging Face folder; a sharded policy's full weights are gathered once, to
    rank 0, which writes. Collective when sharded (every rank calls it); returns the folder on the writing rank."""
    from modules.common import export_hf

    state = full_state_dict(policy) if is_sharded(policy) else None
    if not is_global_zero:
        return None
    return export_hf(policy, processor, out_dir, state_dict=state)
