"""The data inspector: masked vs supervised text, placeholder runs, counts, the image grid."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from moe_llava_jax.data import inspect
from moe_llava_jax.data.conversation import (
    IMAGE_PLACEHOLDER,
    get_template,
    render_segments,
    tokenize_conversation,
)
from moe_llava_jax.data.pipeline import pad_to
from moe_llava_jax.data.tokenizer import train_bpe_tokenizer

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat colour is the ball?"},
    {"from": "gpt", "value": "It is red."},
    {"from": "human", "value": "And the box?"},
    {"from": "gpt", "value": "Blue."},
]


def expected_rendering(conversation, template, num_image_tokens, pad):
    """What render_tokens must print, built from the template's own (text, supervised) chunks."""
    parts = [
        text if supervised else f"[prompt]{text}[/prompt]"
        for text, supervised in render_segments(conversation, template)
    ]
    text = "".join(parts).replace(IMAGE_PLACEHOLDER, f"<image×{num_image_tokens}>")
    return text + (f"<pad×{pad}>" if pad else "")


def test_render_tokens_marks_prompt_image_answer_and_padding():
    template = get_template("phi")
    texts = [template.system] + [turn["value"] for turn in CONVERSATION] + ["USER: ASSISTANT:"]
    tokenizer = train_bpe_tokenizer(texts * 4, 300)
    ids, labels = tokenize_conversation(CONVERSATION, template, tokenizer, 5)
    pad = 7
    ids = pad_to(ids, len(ids) + pad, tokenizer.pad_id)
    labels = pad_to(labels, len(labels) + pad, -100)
    rendered = inspect.render_tokens(ids, labels, tokenizer)
    assert rendered == expected_rendering(CONVERSATION, template, 5, pad)
    assert "[/prompt] It is red.<|endoftext|>[prompt]USER: And the box?" in rendered
    counts = inspect.token_counts(ids, labels, tokenizer.pad_id)
    assert counts["padding"] == pad and counts["image"] == 5
    assert counts["supervised"] == len(tokenizer.encode(" It is red.<|endoftext|>")) + len(
        tokenizer.encode(" Blue.<|endoftext|>")
    )
    assert counts["tokens"] == counts["image"] + counts["prompt_text"] + counts["supervised"]


def test_inspect_stage_shows_the_training_examples_and_writes_the_grid(micro_config, tmp_path):
    micro_config.stage1.max_length = 48
    out = tmp_path / "grid.png"
    text = inspect.inspect_stage(micro_config, "stage1", 3, out)
    captions = json.loads((Path(micro_config.data.root) / "captions.json").read_text())
    for record in captions[:3]:
        caption = record["conversations"][1]["value"]
        assert f"[prompt]<image×4>[/prompt]{caption}\n<pad×" in text  # plain template, 2x2 patches
    assert "--- record 0 (id 'caption_00000'): tokens " in text
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape[1] > grid.shape[0] > 50 and grid.std() > 10  # three pictures in a row


def test_inspect_reports_records_training_would_skip(micro_config, tmp_path):
    micro_config.stage2.max_length = 8  # the image placeholders no longer fit
    text = inspect.inspect_stage(micro_config, "stage2", 1, tmp_path / "grid.png")
    assert "record 0 (id 'instruct_00000'): skipped: " in text
    assert "placeholders end at token" in text
    assert not (tmp_path / "grid.png").exists()
