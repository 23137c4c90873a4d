"""Build a tiny random-init VLM of a real transformers family, fully offline.

The result is an ordinary Hugging Face folder (safetensors weights, tokenizer, processor, ChatML chat template
with the `<think>\\n` pre-fill of the Skywork-R1V3 release), loaded by the same `modules.loading` code as a
real checkpoint. The tokenizer is a byte-level BPE trained here on text shaped like the synthetic tasks
(vocab ~512), so the embedding table stays small.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForImageTextToText, GenerationConfig, PreTrainedTokenizerFast

from modules.stock import save_stock

FAMILIES = ("internvl", "llava", "qwen2_5_vl")
SIZES = ("tiny", "small")

BASE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FAMILY_SPECIAL = {
    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>",
                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    "llava": {"image_token": "<image>"},
    "qwen2_5_vl": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                   "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
}
# Not special tokens (as in the R1V3 tokenizer) but whole vocabulary entries, so the tiny model spends one
# token on each and decoding keeps them.
REASONING_TOKENS = ["<think>", "</think>", "\\boxed{"]

IMAGE_PLACEHOLDER = {
    "internvl": "<IMG_CONTEXT>",
    "llava": "<image>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}


def chat_template(family: str) -> str:
    """ChatML with images at their place in the user turn and `<think>\\n` pre-filled for the assistant."""
    image = IMAGE_PLACEHOLDER[family]
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
    )


@dataclass(frozen=True)
class TinySpec:
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_ffn: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    image_size: int = 112


SPECS = {
    "tiny": TinySpec(256, 4, 4, 2, 512, 128, 2, 4),
    "small": TinySpec(384, 6, 6, 2, 1024, 192, 4, 6),
}


def default_corpus() -> list[str]:
    """Text like the synthetic tasks' questions and reasoning, for training the tiny tokenizer."""
    try:
        from datamodules.synthetic import SYNTH_VOCAB_TEXT

        texts = list(SYNTH_VOCAB_TEXT())
    except ImportError:  # the generator is optional for building a model
        texts = []
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    for c in colours:
        for s in shapes:
            texts.append(f"How many {c} {s}s are there? I count the {c} {s}s: 1, 2, 3. "
                         f"Wait, let me recount. Alternatively, count row by row. Hmm, yes. "
                         f"</think> The answer is \\boxed{{3}}.")
    texts += [str(i) for i in range(100)] + ["A. B. C. D. E. (A) (B) (C) (D) more fewer equal same sum difference "
                                             "points worth each total Image 1 Image 2 Options: answer option"]
    return texts * 4


def train_tokenizer(family: str, vocab_size: int = 512, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ChatML, the family's image tokens and the reasoning markers."""
    special = BASE_SPECIAL + list(FAMILY_SPECIAL[family].values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus or default_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=FAMILY_SPECIAL[family], padding_side="left",
        chat_template=chat_template(family),
    )
    fast.add_tokens(REASONING_TOKENS)
    return fast


def _text_config(spec: TinySpec, vocab: int, tok: PreTrainedTokenizerFast) -> dict:
    return {
        "model_type": "qwen2", "vocab_size": vocab, "hidden_size": spec.text_hidden,
        "num_hidden_layers": spec.text_layers, "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads, "intermediate_size": spec.text_ffn,
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
    }


def build_config(family: str, spec: TinySpec, tok: PreTrainedTokenizerFast):
    """A transformers config of `family` at the tiny sizes; 16 image tokens per 112-px image in each family."""
    from transformers import InternVLConfig, LlavaConfig, Qwen2_5_VLConfig

    vocab = len(tok)
    text = _text_config(spec, vocab, tok)
    vision = {"hidden_size": spec.vision_hidden, "num_hidden_layers": spec.vision_layers,
              "num_attention_heads": spec.vision_heads, "intermediate_size": 2 * spec.vision_hidden}
    if family == "internvl":
        # 112 px / 14-px patches = 8x8, pixel shuffle 0.5 -> 16 tokens, each covering a 28x28 px cell.
        return InternVLConfig(
            vision_config={**vision, "image_size": [spec.image_size] * 2, "patch_size": [14, 14]},
            text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
            image_seq_length=(spec.image_size // 14) ** 2 // 4, tie_word_embeddings=False,
        )
    if family == "llava":
        # SigLIP with 28-px patches: 4x4 = 16 tokens, no CLS token.
        return LlavaConfig(
            vision_config={**vision, "model_type": "siglip_vision_model", "image_size": spec.image_size,
                           "patch_size": 28},
            text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="full", vision_feature_layer=-1,
            image_seq_length=(spec.image_size // 28) ** 2, tie_word_embeddings=False,
        )
    if family == "qwen2_5_vl":
        head_dim = spec.text_hidden // spec.text_heads
        quarter = head_dim // 8
        text_cfg = {**text, "model_type": "qwen2_5_vl_text",
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                        "mrope_section": [head_dim // 2 - 4 * quarter, 2 * quarter, 2 * quarter]}}
        return Qwen2_5_VLConfig(
            vision_config={"depth": spec.vision_layers, "hidden_size": spec.vision_hidden,
                           "intermediate_size": 2 * spec.vision_hidden, "num_heads": spec.vision_heads,
                           "out_hidden_size": spec.text_hidden, "patch_size": 14, "spatial_merge_size": 2,
                           "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [spec.vision_layers - 1]},
            text_config=text_cfg, image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), tie_word_embeddings=False,
        )
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def build_processor(family: str, tok: PreTrainedTokenizerFast, spec: TinySpec):
    """The family's processor with a PIL image processor sized for the tiny model."""
    from modules.processors import InternVLImageProcessorOnly, Qwen2_5_VLImageProcessorOnly

    size = spec.image_size
    if family == "internvl":
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        ip = GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=False,
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return InternVLImageProcessorOnly(ip, tok, image_seq_length=(size // 14) ** 2 // 4,
                                          chat_template=chat_template(family))
    if family == "llava":
        from transformers import LlavaProcessor
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        ip = SiglipImageProcessorPil(size={"height": size, "width": size})
        return LlavaProcessor(ip, tok, patch_size=28, vision_feature_select_strategy="full",
                              num_additional_image_tokens=0, chat_template=chat_template(family))
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = size * size
    ip = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    return Qwen2_5_VLImageProcessorOnly(ip, tok, chat_template=chat_template(family))


def make_tiny(out_dir: str | Path, family: str = "internvl", size: str = "tiny", seed: int = 0,
              vocab_size: int = 512) -> Path:
    """Write a random-init tiny VLM folder; the same seed gives the same files."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = SPECS[size]
    tok = train_tokenizer(family, vocab_size)
    config = build_config(family, spec, tok)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=True, temperature=1.0,
        max_new_tokens=96,
    )
    save_stock(model, build_processor(family, tok, spec), out)
    (out / "r1v_tiny.json").write_text(json.dumps({"family": family, "size": size, "seed": seed,
                                                   "vocab_size": len(tok)}, indent=2) + "\n")
    return out
