"""Recognise what a checkpoint file holds from its tensor names and shapes, without loading it.

Used to reject a wrong file in one line ("--clip_l x.safetensors: expected a CLIP-L text encoder, found
a FLUX.1 AE") instead of a wall of missing keys.
"""

from __future__ import annotations

from library.io.safetensors_file import SafetensorsHeader

# Prefixes under which single-file checkpoints nest their parts.
DIFFUSION_MODEL_PREFIX = "model.diffusion_model."


def _has_prefix(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _clip_kind(header: SafetensorsHeader, prefix: str) -> str | None:
    q = f"{prefix}encoder.layers.0.self_attn.q_proj.weight"
    if q not in header or f"{prefix}embeddings.token_embedding.weight" not in header:
        return None
    width = header.shape(q)[0]
    return {768: "CLIP-L text encoder", 1280: "CLIP-G text encoder"}.get(width, f"CLIP text encoder (width {width})")


def describe_checkpoint(header: SafetensorsHeader) -> str:
    """A short human description of what the file looks like (for error messages and logs)."""
    keys = header.keys()
    for prefix in ("", DIFFUSION_MODEL_PREFIX, "model.", "transformer."):
        if f"{prefix}double_blocks.0.img_attn.qkv.weight" in header:
            return (
                "FLUX.1 dev transformer"
                if f"{prefix}guidance_in.in_layer.weight" in header
                else "FLUX.1 schnell transformer"
            )
    if _has_prefix(keys, "transformer_blocks.") and _has_prefix(keys, "single_transformer_blocks."):
        return "FLUX.1 transformer in diffusers layout"
    if _has_prefix(keys, "joint_blocks.") or _has_prefix(keys, DIFFUSION_MODEL_PREFIX + "joint_blocks."):
        return "SD3/SD3.5 MMDiT checkpoint"
    if _has_prefix(keys, DIFFUSION_MODEL_PREFIX + "input_blocks."):
        return "SD1.x/SD2.x/SDXL checkpoint"
    if _has_prefix(keys, "controlnet_blocks.") or _has_prefix(keys, "controlnet_single_blocks."):
        return "ControlNet"
    if any(".lora_down." in k or ".lora_A." in k or "lora_unet_" in k for k in keys[:200]):
        return "LoRA"
    for prefix in ("", "first_stage_model.", "vae."):
        conv_in = f"{prefix}decoder.conv_in.weight"
        if conv_in in header and f"{prefix}encoder.conv_in.weight" in header:
            channels = header.shape(conv_in)[1]
            return f"{channels}-channel autoencoder (VAE/AE)"
    for prefix in ("text_model.", ""):
        kind = _clip_kind(header, prefix)
        if kind:
            return kind
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in header:
        return "T5 text encoder"
    if "shared.weight" in header and _has_prefix(keys, "decoder.block."):
        return "T5 encoder-decoder"
    return f"an unrecognised model ({len(keys)} tensors, e.g. {', '.join(keys[:3])})"
