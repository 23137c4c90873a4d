"""The rollout-sample formatting, rendered by TensorBoard's own Markdown renderer (what the Text tab shows)."""

from __future__ import annotations

import re

import torch
from tensorboard.plugin_util import markdown_to_safe_html

from callbacks.rollout_samples import FILL, GAP, code_block, sample_markdown, side_by_side

CHAT = "user\nQuestion: how many squares?\nassistant\n<think>\n"


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"<pre><code[^>]*>(.*?)</code></pre>", markdown_to_safe_html(markdown), re.S)


def test_code_block_keeps_every_line_and_escapes_tags():
    (block,) = code_blocks(code_block(CHAT))
    assert block.split("\n")[:4] == ["user", "Question: how many squares?", "assistant", "&lt;think&gt;"]


def test_code_block_wraps_long_lines_and_survives_backticks_inside():
    text = "word " * 60 + "\n```python\nx = 1\n```"
    (block,) = code_blocks(code_block(text, width=40))
    lines = block.split("\n")
    assert all(len(line) <= 40 for line in lines)
    assert "".join(lines).replace(" ", "").startswith("word" * 60)  # nothing lost, only wrapped
    assert "```python" in block  # the inner fence is content, not the end of the block


def test_sample_markdown_has_reward_parts_and_two_blocks():
    md = sample_markdown(20, 1, {"id": "val-3", "answer": "7"}, CHAT, "<think>\n3 + 4</think> \\boxed{7}", 0.8,
                         {"accuracy": 1.0, "format": 0.0}, 2, 8)
    assert len(code_blocks(md)) == 2
    html = markdown_to_safe_html(md)
    assert "accuracy 1.00" in html and "format 0.00" in html and "step 20" in html and "sample_1/images" in html


def test_side_by_side_keeps_each_image_and_its_order():
    a, b = torch.zeros(3, 4, 4), torch.ones(3, 6, 5)  # a white image beside it must still show its boundary
    out = side_by_side([a, b])
    assert out.shape == (3, 6, 4 + GAP + 5)
    assert torch.equal(out[:, :4, :4], a) and torch.equal(out[:, :, 4 + GAP :], b)
    assert bool((out[:, :, 4 : 4 + GAP] == FILL).all()) and bool((out[:, 4:, :4] == FILL).all())  # gap and pad
    assert 0 < FILL < 1  # neither a white nor a black background hides the boundary
