"""Recognise what a checkpoint file holds from its tensor names and shapes, without loading it.

Used to reject a wrong file in one line ("--clip_l x.safetensors: expected a CLIP-L text encoder, found
a FLUX.1 AE") instead of a wall of missing keys.
"""

from __future__ import annotations

import re

from library.io.safetensors_file import SafetensorsHeader
from library.models.sd3.model import VARIANT_NAMES, sd3_variant

# Prefixes under which single-file checkpoints nest their parts.
DIFFUSION_MODEL_PREFIX = "model.diffusion_model."
SD3_VAE_PREFIX = "first_stage_model."
_SD3_MARKER = "joint_blocks.0.x_block.attn.qkv.weight"
# Text encoders bundled in SAI's SD3 files: name -> (prefix, probe key after the prefix), as upstream detects them.
SD3_EMBEDDED_ENCODERS = {
    "clip_l": ("text_encoders.clip_l.transformer.", "text_model.embeddings.position_embedding.weight"),
    "clip_g": ("text_encoders.clip_g.transformer.", "text_model.embeddings.position_embedding.weight"),
    "t5xxl": ("text_encoders.t5xxl.transformer.", "encoder.block.0.layer.0.SelfAttention.k.weight"),
}
_ENCODER_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}


def _has_prefix(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def find_clip_layout(header: SafetensorsHeader, outer: str) -> str | None:
    """The key prefix of a CLIP text tower under ``outer``: ``outer + "text_model."`` or ``outer`` itself."""
    for prefix in (f"{outer}text_model.", outer):
        if (
            f"{prefix}encoder.layers.0.self_attn.q_proj.weight" in header
            and f"{prefix}embeddings.token_embedding.weight" in header
        ):
            return prefix
    return None


def _clip_kind(header: SafetensorsHeader, prefix: str) -> str | None:
    q = f"{prefix}encoder.layers.0.self_attn.q_proj.weight"
    if q not in header or f"{prefix}embeddings.token_embedding.weight" not in header:
        return None
    width = header.shape(q)[0]
    return {768: "CLIP-L text encoder", 1280: "CLIP-G text encoder"}.get(width, f"CLIP text encoder (width {width})")


def sd3_mmdit_prefix(header: SafetensorsHeader) -> str | None:
    """Where an SD3/SD3.5 MMDiT sits in the file: "model.diffusion_model.", "" (a bare MMDiT) or None."""
    return next((p for p in (DIFFUSION_MODEL_PREFIX, "") if f"{p}{_SD3_MARKER}" in header), None)


def sd3_vae_prefix(header: SafetensorsHeader) -> str | None:
    """The VAE prefix, "first_stage_model.", when the file carries a VAE beside the MMDiT, else None."""
    return SD3_VAE_PREFIX if f"{SD3_VAE_PREFIX}encoder.conv_in.weight" in header else None


def sd3_embedded_encoders(header: SafetensorsHeader) -> dict[str, str]:
    """Text encoders bundled in the file: "clip_l"/"clip_g"/"t5xxl" -> their prefix."""
    return {name: prefix for name, (prefix, probe) in SD3_EMBEDDED_ENCODERS.items() if prefix + probe in header}


def describe_sd3(header: SafetensorsHeader, prefix: str) -> str:
    """E.g. "SD3/SD3.5 MMDiT checkpoint (SD3 Medium, with VAE, CLIP-L, CLIP-G)" or "(SD3.5 Large, MMDiT only)"."""
    qk_norm = f"{prefix}joint_blocks.0.context_block.attn.ln_k.weight" in header
    attn2 = re.compile(rf"^{re.escape(prefix)}joint_blocks\.\d+\.x_block\.attn2\.")
    variant = sd3_variant(qk_norm, any(attn2.match(k) for k in header.keys()))
    parts = ["VAE"] if sd3_vae_prefix(header) else []
    parts += [_ENCODER_NAMES[name] for name in sd3_embedded_encoders(header)]
    packaging = f"with {', '.join(parts)}" if parts else "MMDiT only"
    return f"SD3/SD3.5 MMDiT checkpoint ({VARIANT_NAMES[variant]}, {packaging})"


def describe_checkpoint(header: SafetensorsHeader) -> str:
    """A short human description of what the file looks like (for error messages and logs)."""
    keys = header.keys()
    if "controlnet_blocks.0.weight" in header and "double_blocks.0.img_attn.qkv.weight" in header:
        return f"FLUX.1 {'dev' if 'guidance_in.in_layer.weight' in header else 'schnell'} ControlNet (XLabs layout)"
    for prefix in ("", DIFFUSION_MODEL_PREFIX, "model.", "transformer."):
        if f"{prefix}double_blocks.0.img_attn.qkv.weight" in header:
            return (
                "FLUX.1 dev transformer"
                if f"{prefix}guidance_in.in_layer.weight" in header
                else "FLUX.1 schnell transformer"
            )
    if _has_prefix(keys, "transformer_blocks.") and _has_prefix(keys, "single_transformer_blocks."):
        return "FLUX.1 transformer in diffusers layout"
    sd3_prefix = sd3_mmdit_prefix(header)
    if sd3_prefix is not None:
        return describe_sd3(header, sd3_prefix)
    if _has_prefix(keys, "joint_blocks.") or _has_prefix(keys, DIFFUSION_MODEL_PREFIX + "joint_blocks."):
        return "damaged SD3/SD3.5 MMDiT checkpoint"
    if "transformer_blocks.0.attn.add_q_proj.weight" in header and "pos_embed.proj.weight" in header:
        return "SD3/SD3.5 transformer in diffusers layout"
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
