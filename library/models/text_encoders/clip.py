"""CLIP text encoders (CLIP-L for FLUX.1 and SD3, CLIP-G for SD3) from users' single files.

Files hold ``text_model.*`` keys (the usual layout, optionally with ``text_projection.weight``) or, as
transformers 5 saves CLIPTextModel, the same keys without the ``text_model.`` prefix. The config is read off
the tensors; head dim is 64 as in every CLIP text tower.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.errors import UserError
from library.io.safetensors_file import SafetensorsHeader, iter_tensors, read_header
from library.models.checkpoint_kind import describe_checkpoint, find_clip_layout
from library.models.state_loading import assign_state, check_state_keys

logger = logging.getLogger(__name__)

HEAD_DIM = 64
BOS_ID, EOS_ID = 49406, 49407
_NAMES = {768: "CLIP-L", 1280: "CLIP-G"}
PROJECTION = "text_projection.weight"


def clip_config_from_header(header: SafetensorsHeader, prefix: str, outer: str = "") -> CLIPTextConfig:
    """The config of the CLIP text tower whose keys start with ``prefix`` (``text_projection.weight`` is looked
    up under ``outer``, the prefix of the whole encoder inside the file)."""
    width = header.shape(f"{prefix}encoder.layers.0.self_attn.q_proj.weight")[0]
    layers = {
        int(m.group(1)) for k in header.keys() if (m := re.match(rf"^{re.escape(prefix)}encoder\.layers\.(\d+)\.", k))
    }
    vocab, _ = header.shape(f"{prefix}embeddings.token_embedding.weight")
    positions, _ = header.shape(f"{prefix}embeddings.position_embedding.weight")
    projection_key = f"{outer}{PROJECTION}"
    projection = header.shape(projection_key)[0] if projection_key in header else width
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=header.shape(f"{prefix}encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=max(layers) + 1, num_attention_heads=width // HEAD_DIM, max_position_embeddings=positions,
        projection_dim=projection, hidden_act="gelu" if width == 1280 else "quick_gelu",
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=1,
    )  # fmt: skip


def load_clip_text_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    option: str = "--clip_l",
    expect_width: int | None = 768,
    prefix: str = "",
    with_projection: bool | None = None,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Load a CLIP text encoder; a file of another kind (or CLIP-G where CLIP-L is expected) is a UserError.

    ``prefix``: the encoder's keys in the file (``text_encoders.clip_l.transformer.`` in SD3 checkpoints); keys
    outside it are ignored. ``with_projection``: None builds what the file holds (a ``CLIPTextModelWithProjection``
    when it has ``text_projection.weight``); True always builds one, with an identity projection when the file has
    none (SD3's CLIP-L, as upstream and diffusers do); False builds a ``CLIPTextModel`` and ignores a projection.
    CLIP-G (``expect_width=1280``) always has its projection: a file without one is a UserError.
    """
    header = read_header(path, option)
    what = f"{option} {path}" + (f" under {prefix!r}" if prefix else "")
    expected_name = _NAMES.get(expect_width, "CLIP") if expect_width else "CLIP"
    layout = find_clip_layout(header, prefix)
    if layout is None:
        raise UserError(f"{what}: expected a {expected_name} text encoder, found {describe_checkpoint(header)}")
    config = clip_config_from_header(header, layout, prefix)
    other_widths = set(_NAMES) - {expect_width}
    if expect_width and config.hidden_size in other_widths:  # tiny test models have other widths
        found = _NAMES[config.hidden_size] + " text encoder"
        raise UserError(f"{what}: expected a {expected_name} text encoder, found {found}")
    projection_key = f"{prefix}{PROJECTION}"
    has_projection = projection_key in header
    if expect_width == 1280 and not has_projection and with_projection is not False:
        raise UserError(
            f"{what}: expected a CLIP-G text encoder with {projection_key}, the file has none; "
            "use the complete clip_g.safetensors"
        )
    projected = has_projection if with_projection is None else with_projection
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config) if projected else CLIPTextModel(config)
    model_prefix = "text_model." if projected else ""
    file_keys = {k: model_prefix + k[len(layout) :] for k in header.keys() if k.startswith(layout)
                 and k != projection_key and not k.endswith("position_ids")}  # fmt: skip
    if projected and has_projection:
        file_keys[projection_key] = PROJECTION
    ignored = {projection_key} if has_projection and not projected else set()
    stray = [k for k in header.keys() if k.startswith(prefix) and k not in file_keys and k not in ignored
             and not k.endswith("position_ids")]  # fmt: skip
    found = {file_keys[k]: header.shape(k) for k in file_keys}
    for key in stray:
        found[key] = header.shape(key)
    if projected and not has_projection:
        found[PROJECTION] = (config.projection_dim, config.hidden_size)
    check_state_keys(
        found, {k: tuple(v.shape) for k, v in model.state_dict().items()}, what, f"{expected_name} text encoder"
    )
    state = {file_keys[k]: t.to(dtype) for k, t in iter_tensors(header.path, list(file_keys), device)}
    if projected and not has_projection:
        state[PROJECTION] = torch.eye(config.hidden_size, dtype=dtype, device=device)
        logger.info("%s: no %s in the file, using an identity projection", what, PROJECTION)
    assign_state(model, state)
    logger.info("%s: %d layers, width %d, %s", expected_name, config.num_hidden_layers, config.hidden_size, dtype)
    return model.eval().requires_grad_(False)


def encode_clip_l(model: CLIPTextModel | CLIPTextModelWithProjection, input_ids: Tensor) -> Tensor:
    """The pooled output [B, width] at the end token, which FLUX.1 takes as its vector input."""
    out = model(input_ids=input_ids, output_hidden_states=False)
    return out.pooler_output if hasattr(out, "pooler_output") else out.last_hidden_state[:, 0]


def encode_clip_hidden(
    model: CLIPTextModel | CLIPTextModelWithProjection, input_ids: Tensor, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(penultimate hidden states [B, L, width] without the final layer norm, pooled output [B, dim]) as SD3 uses
    them: the pooled output is ``text_embeds`` (the final-normed end token, projected) when the model has a
    projection. ``attention_mask`` masks padding inside the encoder (SD3's ``--apply_lg_attn_mask``)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return out.hidden_states[-2], pooled


@torch.no_grad()
def make_tiny_clip_state_dict(
    hidden: int = 128, layers: int = 2, intermediate: int = 256, with_projection: bool = False, seed: int = 0
) -> dict[str, Tensor]:
    """A random CLIP text encoder in the single-file layout (``text_model.*``), real vocabulary and 77 positions."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_DIM, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )  # fmt: skip
    model = CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)
    state = model.state_dict()
    if not with_projection:
        state = {f"text_model.{k}": v for k, v in state.items()}
    return {k: v.clone() for k, v in state.items() if not k.endswith("position_ids")}
