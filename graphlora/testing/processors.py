"""Tiny processors for the zoo's models, built offline: a word-level tokenizer with the family's special tokens at
the ids its tiny config uses, a chat template, and the family's image processor at the tiny image sizes.

No hub: the tokenizer is built with ``tokenizers`` from a fixed word list (:data:`WORDS`), so every sample text
made of those words tokenizes without unknown tokens. Families: ``llava`` (``LlavaProcessor``, CLIP image
processor at 16 px: 16 image tokens) and ``qwen2_vl`` (``Qwen2VLProcessor`` without its video processor: images
of any size, resized to multiples of 8 px, one token per 8 x 8 px).
"""

from __future__ import annotations

import transformers

from graphlora.testing.zoo import build_tiny_config

#: The words sample conversations are made of (tests/test_collator.py builds its samples from them).
WORDS = ("what is in the image a cat dog red blue green square circle there are two one three small big on of "
         "picture describe answer yes no color shape left right top bottom it this and with").split()

_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}IMAGE_PLACEHOLDER"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Per family: its special tokens with the ids of its tiny config, what an image part renders as, and the
#: token that marks image positions.
_FAMILIES = {
    "llava": dict(specials={"<image>": 255}, image_text="<image>\n", image_token="<image>"),
    "qwen2_vl": dict(specials={"<|vision_start|>": 251, "<|vision_end|>": 252, "<|video_pad|>": 254,
                               "<|image_pad|>": 255},
                     image_text="<|vision_start|><|image_pad|><|vision_end|>", image_token="<|image_pad|>"),
}
_BASE_SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<|im_start|>": 4, "<|im_end|>": 5}


def processor_families() -> tuple[str, ...]:
    """The zoo families :func:`build_tiny_processor` builds a processor for."""
    return tuple(_FAMILIES)


def build_tiny_tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS` (plus ``user``, ``assistant``, ``system``, punctuation) with the
    family's special tokens at its tiny config's ids and a ChatML-style chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    spec = _FAMILIES[family]
    specials = {**_BASE_SPECIALS, **spec["specials"]}
    vocab = dict(specials)
    taken = set(specials.values())
    next_id = 0
    for word in ["user", "assistant", "system", "\n", ".", ",", "?", "!", ":"] + list(WORDS):
        while next_id in taken:
            next_id += 1
        vocab[word] = next_id
        taken.add(next_id)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Whitespace()])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="<|im_end|>", unk_token="<unk>",
                                                additional_special_tokens=[t for t in specials
                                                                           if t not in ("<pad>", "<s>", "<unk>")])
    fast.chat_template = _CHATML.replace("IMAGE_PLACEHOLDER", spec["image_text"])
    return fast


def build_tiny_processor(family: str):
    """The family's transformers processor for its zoo tiny model (see the module docstring)."""
    if family not in _FAMILIES:
        raise ValueError(f"no tiny processor for {family!r}; families: {', '.join(_FAMILIES)}")
    tokenizer = build_tiny_tokenizer(family)
    config = build_tiny_config(family)
    if family == "llava":
        size = config.vision_config.image_size
        image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                                          crop_size={"height": size, "width": size})
        return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                           patch_size=config.vision_config.patch_size,
                                           vision_feature_select_strategy=config.vision_feature_select_strategy,
                                           num_additional_image_tokens=1, chat_template=tokenizer.chat_template)
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    image_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    image_processor = image_cls(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                temporal_patch_size=vision.temporal_patch_size, min_pixels=unit * unit,
                                max_pixels=(4 * unit) ** 2)
    return _ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      chat_template=tokenizer.chat_template)


class _ImageOnlyQwen2VLProcessor(transformers.Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor (transformers' needs torchvision; the samples hold
    images only): the processor of images and text is transformers' own."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]
