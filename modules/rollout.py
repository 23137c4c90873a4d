"""Rollout engines: prompt batch + group size -> Rollouts. Chosen in YAML by `class_path`.

`HFRolloutEngine` samples with the training model itself (KV cache, temperature, top-p, EOS stop), encoding
each prompt once per group by default. Its random generator is part of the checkpoint, so a resumed run samples
the same tokens as an uninterrupted one. `modules.vllm_engine.VLLMRolloutEngine` has the same interface.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from datamodules.types import PromptBatch, Rollouts
from modules.policy import SamplingParams, sample

log = logging.getLogger(__name__)


class RolloutEngine:
    """Interface: `generate(model, batch, group_size, ...) -> Rollouts`; state for exact resume."""

    def setup(self, model: nn.Module, processor: Any, device: torch.device, seed: int) -> None:
        raise NotImplementedError

    def generate(self, model: nn.Module, batch: PromptBatch, group_size: int,
                 temperature: float | None = None, max_new_tokens: int | None = None) -> Rollouts:
        raise NotImplementedError

    def sync_weights(self, model: nn.Module) -> None:
        """Called after each optimiser step; engines that hold their own copy of the weights refresh it."""

    def reseed(self, seed: int) -> None:
        """Restart the sampler's randomness from `seed` (validation samples from its own stream)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class HFRolloutEngine(RolloutEngine):
    """Sampling with the policy's own forward (Hugging Face model, KV cache).

    Args:
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling mass.
        max_new_tokens: response length cap; responses that hit it are marked truncated.
        share_prompt: encode each prompt and its images once per group and repeat its KV cache G times
            (False copies the prompt G times before the forward, as other tools do).
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64,
                 share_prompt: bool = True):
        self.params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self.share_prompt = share_prompt
        self.generator: torch.Generator | None = None
        self._pending_state: tuple[torch.Tensor, str] | None = None  # from a checkpoint, until `setup`
        self.tokenizer = None

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    def setup(self, model: nn.Module, processor: Any, device: torch.device, seed: int) -> None:
        self.tokenizer = getattr(processor, "tokenizer", processor)
        device = torch.device(device)
        if self.generator is None or self.generator.device.type != device.type:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        if self._pending_state is not None:  # restored before the generator moved to this device
            self._restore(*self._pending_state)

    def eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end, int) and end != self.tokenizer.unk_token_id:
            ids.add(end)
        return sorted(i for i in ids if i is not None)

    def generate(self, model: nn.Module, batch: PromptBatch, group_size: int,
                 temperature: float | None = None, max_new_tokens: int | None = None) -> Rollouts:
        sp = SamplingParams(
            temperature=self.params.temperature if temperature is None else temperature,
            top_p=self.params.top_p,
            max_new_tokens=self.params.max_new_tokens if max_new_tokens is None else max_new_tokens,
        )
        was_training = model.training
        model.eval()
        try:
            ids, mask, truncated = sample(model, batch, group_size, sp, self.eos_ids(),
                                          self.tokenizer.pad_token_id, self.generator, self.share_prompt)
        finally:
            model.train(was_training)
        texts = self.tokenizer.batch_decode(ids * mask + self.tokenizer.pad_token_id * (1 - mask),
                                            skip_special_tokens=True)
        return Rollouts(prompts=batch, response_ids=ids, response_mask=mask, truncated=truncated,
                        texts=texts, group_size=group_size)

    def reseed(self, seed: int) -> None:
        if self.generator is not None:
            self.generator.manual_seed(seed)

    def state_dict(self) -> dict:
        if self.generator is None:
            return {}
        return {"generator": self.generator.get_state(), "device": self.generator.device.type}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self._pending_state = (state["generator"], state.get("device", "cpu"))
            if self.generator is not None and self.generator.device.type == self._pending_state[1]:
                self._restore(*self._pending_state)

    def _restore(self, rng_state: torch.Tensor, device_type: str) -> None:
        """Continue the saved random stream. A CPU state cannot seed a CUDA generator (nor the reverse): a run
        resumed on another kind of device restarts sampling from the seed, and says so."""
        self._pending_state = None
        if self.generator.device.type == device_type:
            self.generator.set_state(rng_state)
        else:
            log.warning("the rollout RNG state was saved on %s but sampling now runs on %s: it restarts from the "
                        "seed, so this resumed run will not repeat an uninterrupted one exactly", device_type,
                        self.generator.device.type)
