"""Tiny vision-language checkpoints built offline: a random model of ``tests.helpers.tiny_model``
saved with a real processor (image processor + the tiny tokenizer with the family's image
tokens), so a pruned copy can be reloaded with ``AutoProcessor`` and asked an image+text
prompt. One ``VlmCase`` per family: its builder, a prompt with the family's image
placeholder and the number of image tokens the processor expands it to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPImageProcessor,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Idefics3ImageProcessor,
    Idefics3Processor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from tests.helpers import tiny_model, tiny_tokenizer

# The tiny vision towers see 28x28 images in 14x14 patches (tests.helpers._VISION).
IMAGE_SIZE = 28


@dataclass(frozen=True)
class VlmCase:
    family: str  # config.model_type
    build: Callable[[Path], Any]  # saves model + processor under the path, returns the model
    prompt: str  # text with the family's image placeholder
    image_tokens: int  # image-token ids the processor puts in input_ids for one image

    def __str__(self) -> str:
        return self.family


def _tokenizer(**named: str) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with ``named`` model-specific special tokens (``image_token``,
    ``boi_token``...), added to the vocabulary and saved in tokenizer_config.json so that a
    reloaded tokenizer has the same ``<name>`` and ``<name>_id`` attributes a processor reads."""
    base = tiny_tokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        bos_token=base.bos_token,
        eos_token=base.eos_token,
        unk_token=base.unk_token,
        pad_token=base.pad_token,
        extra_special_tokens=named,
    )


def _save(model: Any, processor: Any, path: Path) -> Any:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model


def llava(path: Path) -> Any:
    """LLaVA: a CLIP image processor and one ``<image>`` token (expanded to 2x2 patches)."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    model = tiny_model("llava")
    model.config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by "default"
        image_token="<image>",
    )
    return _save(model, processor, path)


def gemma3(path: Path) -> Any:
    """Gemma 3: ``<start_of_image>`` in the prompt becomes begin-of-image, 4 soft image
    tokens (``mm_tokens_per_image``) and end-of-image; a SigLIP-style image processor."""
    tokenizer = _tokenizer(
        image_token="<image_soft_token>",
        boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
    )
    model = tiny_model("gemma3")
    # Gemma 3 initialises its projector to zeros, which would make every image look the same.
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        projection.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    model.config.image_token_index = tokenizer.image_token_id
    model.config.boi_token_index = tokenizer.boi_token_id
    model.config.eoi_token_index = tokenizer.eoi_token_id
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        image_seq_length=model.config.mm_tokens_per_image,
    )
    return _save(model, processor, path)


def idefics3(path: Path) -> Any:
    """Idefics3 (SmolVLM's architecture): ``<image>`` becomes
    ``<fake_token_around_image><global-img><image>...<fake_token_around_image>``, one image
    token per image here ((28 / 14)^2 patches shuffled by a scale factor of 2), no splitting."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                "<fake_token_around_image>",
                "<image>",
                "<end_of_utterance>",
                "<global-img>",
            ]
        }
    )
    model = tiny_model("idefics3")
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            size={"longest_edge": IMAGE_SIZE},
            max_image_size={"longest_edge": IMAGE_SIZE},
            do_image_splitting=False,
        ),
        tokenizer=tokenizer,
        image_seq_len=1,
    )
    return _save(model, processor, path)


CASES = (
    VlmCase("llava", llava, "<image> the quick brown", image_tokens=4),  # CLS dropped
    VlmCase("gemma3", gemma3, "<start_of_image> the quick brown", image_tokens=4),
    VlmCase("idefics3", idefics3, "<image> the quick brown", image_tokens=1),
)
