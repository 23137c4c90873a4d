"""Image-only processors for VLM families whose stock processor drags in a video processor.

InternVL's and Qwen2.5-VL's processors build a video processor that needs torchvision; the CPU install here
has none (its wheels are CUDA-linked), and this project never feeds video. These subclasses drop the video
half and keep everything else, so `AutoProcessor.from_pretrained` works on a machine without torchvision.
Importing this module registers them; it is imported by `modules.loading`.
"""

from __future__ import annotations

import re

from transformers import AutoProcessor, InternVLConfig, Qwen2_5_VLConfig
from transformers.models.internvl.processing_internvl import InternVLProcessor
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin


class InternVLImageProcessorOnly(InternVLProcessor):
    """InternVL processor without the video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
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


class Qwen2_5_VLImageProcessorOnly(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video processor (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


AutoProcessor.register(InternVLConfig, InternVLImageProcessorOnly, exist_ok=True)
AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageProcessorOnly, exist_ok=True)
