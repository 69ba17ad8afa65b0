"""Tiny vision-language models of four families, built from configs, with offline processors.

Each builder takes the bundled SmolLM2 tokenizer and returns ``(model, processor)``: random
weights, 2-layer towers of width 16-32, a processor from the family's PIL image processor and
the tokenizer with the family's image tokens, and a ChatML template that renders an image part
as the family's marker (as the real models' templates do). Qwen2-VL's and InternVL's processors
take ``video_processor=None`` (:func:`lorakit.vlm.models.images_only`): their video processor
needs torchvision, which does not work beside torch 2.13.0+cpu here.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

FAMILIES = ("llava", "qwen2_vl", "idefics3", "internvl")


def template(marker: str) -> str:
    """ChatML in which an image part renders as ``marker``."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + marker + ""
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _tokenizer(base: Any, tokens: dict[str, str]) -> Any:
    tokenizer = copy.deepcopy(base)
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens.values())})
    for name, token in tokens.items():
        setattr(tokenizer, name, token)
        setattr(tokenizer, name + "_id", tokenizer.convert_tokens_to_ids(token))
    return tokenizer


def _text(vocab: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=2,
    )


def llava(tokenizer: Any) -> tuple[Any, Any]:
    import transformers as t

    tok = _tokenizer(tokenizer, {"image_token": "<image>"})
    image_processor = t.CLIPImageProcessorPil(
        size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}
    )
    processor = t.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template("<image>"),
    )
    vision = t.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        projection_dim=16,
    )
    config = t.LlavaConfig(
        vision_config=vision,
        text_config=t.LlamaConfig(**_text(len(tok))),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return t.LlavaForConditionalGeneration(config), processor


def qwen2_vl(tokenizer: Any) -> tuple[Any, Any]:
    import transformers as t

    from lorakit.vlm.models import images_only

    tokens = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    }
    tok = _tokenizer(tokenizer, tokens)
    image_processor = t.Qwen2VLImageProcessorPil(
        min_pixels=8 * 8, max_pixels=32 * 32, patch_size=4, merge_size=2, temporal_patch_size=2
    )
    processor = images_only(t.Qwen2VLProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=None,
        chat_template=template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    text = dict(_text(len(tok)), rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(
        depth=2,
        embed_dim=16,
        hidden_size=32,
        num_heads=2,
        mlp_ratio=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in tokens.items()}
    config = t.Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
    )
    return t.Qwen2VLForConditionalGeneration(config), processor


def idefics3(tokenizer: Any) -> tuple[Any, Any]:
    """The demo's assembly (:func:`lorakit.vlm.demo.assemble_vlm`) around a tiny Llama."""
    import transformers as t

    from lorakit.vlm.demo import assemble_vlm

    language_model = t.LlamaForCausalLM(t.LlamaConfig(**_text(len(tokenizer))))
    return assemble_vlm(language_model, tokenizer, vision_layers=2)


def internvl(tokenizer: Any) -> tuple[Any, Any]:
    import transformers as t

    from lorakit.vlm.models import images_only

    tokens = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tok = _tokenizer(tokenizer, tokens)
    image_processor = t.GotOcr2ImageProcessorPil(
        size={"height": 16, "width": 16}, crop_to_patches=False
    )
    processor = images_only(t.InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=None,
        image_seq_length=4,
        chat_template=template("<IMG_CONTEXT>"),
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=[16, 16],
        patch_size=[4, 4],
    )
    config = t.InternVLConfig(
        text_config=t.Qwen2Config(**_text(len(tok))),
        vision_config=vision,
        downsample_ratio=0.5,
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
    )
    return t.InternVLForConditionalGeneration(config), processor


def build(family: str, tokenizer: Any, seed: int = 0) -> tuple[Any, Any]:
    """``(model, processor)`` of ``family``, seeded, in eval mode."""
    torch.manual_seed(seed)
    model, processor = globals()[family](tokenizer)
    processor.tokenizer.padding_side = "right"
    return model.eval(), processor
