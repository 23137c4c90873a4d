"""Image-only processors for VLM families whose stock processor drags in a video processor.

InternVL's and Qwen2.5-VL's stock processors build a video processor that needs torchvision; the CPU install
here has none (its wheels are CUDA-linked), and this project never feeds video. These subclasses drop the video
half and keep everything else, so the app loads a processor on a machine without torchvision.

They are a loading detail only: what they save is the stock folder. `to_dict` names the stock class
(`InternVLProcessor`, `Qwen2_5_VLProcessor`) and `save_pretrained` adds the family's video processor config, so
the folder opens with plain `AutoProcessor` and serves with vLLM without this project. `load_processor` picks
them for a stock folder when torchvision is missing (or always, inside the app: the same class everywhere).
Importing this module also registers them for folders written before the folders were stock.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, InternVLConfig, Qwen2_5_VLConfig
from transformers.models.internvl.processing_internvl import InternVLProcessor
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

PROCESSOR_FILE = "processor_config.json"


class StockSave:
    """Mixin: save as the stock parent class, with the video processor config it would carry."""

    stock_class: type

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = self.stock_class.__name__
        out["video_processor"] = self.video_processor_dict()
        return out

    def video_processor_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        # the tokenizer was told our class name too (tokenizer_config.json)
        for path in Path(save_directory).glob("*.json"):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("processor_class") == type(self).__name__:
                data["processor_class"] = self.stock_class.__name__
                path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return files


def _shared_image_settings(ip: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    d = ip.to_dict()
    return {k: d[k] for k in keys if k in d}


class InternVLImageProcessorOnly(StockSave, InternVLProcessor):
    """InternVL processor without the video processor (no torchvision needed); saves as InternVLProcessor."""

    stock_class = InternVLProcessor

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):
        kwargs.pop("video_processor", None)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )

    def video_processor_dict(self) -> dict[str, Any]:
        """What `InternVLVideoProcessor` saves: frames resized and normalised like the images."""
        shared = _shared_image_settings(self.image_processor, (
            "size", "image_mean", "image_std", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
            "do_convert_rgb", "resample"))
        return {"video_processor_type": "InternVLVideoProcessor", "do_sample_frames": False,
                "initial_shift": True, **shared}


class Qwen2_5_VLImageProcessorOnly(StockSave, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video processor (no torchvision needed); saves as Qwen2_5_VLProcessor."""

    stock_class = Qwen2_5_VLProcessor

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def video_processor_dict(self) -> dict[str, Any]:
        """What `Qwen2VLVideoProcessor` saves, with the image processor's patching and pixel budget."""
        shared = _shared_image_settings(self.image_processor, (
            "size", "image_mean", "image_std", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
            "do_convert_rgb", "resample", "patch_size", "temporal_patch_size", "merge_size", "min_pixels",
            "max_pixels"))
        return {"video_processor_type": "Qwen2VLVideoProcessor", "do_sample_frames": False, **shared}


IMAGE_ONLY = {"InternVLProcessor": InternVLImageProcessorOnly, "Qwen2_5_VLProcessor": Qwen2_5_VLImageProcessorOnly}

AutoProcessor.register(InternVLConfig, InternVLImageProcessorOnly, exist_ok=True)
AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageProcessorOnly, exist_ok=True)


def load_processor(path: str | Path, trust_remote_code: bool = False) -> Any:
    """The processor of a local folder; InternVL / Qwen2.5-VL folders get their image-only twin."""
    cfg = Path(path) / PROCESSOR_FILE
    name = json.loads(cfg.read_text()).get("processor_class") if cfg.exists() else None
    if name in IMAGE_ONLY:
        return IMAGE_ONLY[name].from_pretrained(path, local_files_only=True)
    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
