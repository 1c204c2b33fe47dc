"""Write trained text encoders as the separate files users pass back with ``--clip_l``, ``--clip_g`` and
``--t5xxl``: HF transformers layout, named as upstream's ``sd3_train.py`` names them (``<name>_clip_l.safetensors``).

CLIP: ``text_model.*`` plus ``text_projection.weight`` when the encoder has a real projection. The identity
projection that loading adds to SD3's CLIP-L (its file has none) is left out, so the saved file has the layout it
was read from; a projection that training moved away from the identity is written.
T5: ``encoder.*`` plus ``shared.weight``, both from the embedding the encoder runs with.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from library.io.safetensors_stream import save_state
from library.models.text_encoders.clip import PROJECTION

logger = logging.getLogger(__name__)

TEXT_ENCODER_KINDS = ("clip_l", "clip_g", "t5xxl")
_CLIP_TOWER = "text_model."


def text_encoder_path(model_path: str | os.PathLike, kind: str) -> Path:
    """Upstream's file for a trained encoder beside the model file: ``out/x-000002.safetensors`` ->
    ``out/x-000002_clip_l.safetensors``."""
    if kind not in TEXT_ENCODER_KINDS:
        raise ValueError(f"unknown text encoder kind {kind!r}; expected one of {', '.join(TEXT_ENCODER_KINDS)}")
    path = Path(model_path)
    return path.with_name(f"{path.stem}_{kind}{path.suffix or '.safetensors'}")


def _is_identity(weight: Tensor) -> bool:
    rows, cols = weight.shape
    return rows == cols and torch.equal(weight, torch.eye(rows, dtype=weight.dtype, device=weight.device))


def clip_state(
    model: CLIPTextModel | CLIPTextModelWithProjection, *, keep_projection: bool = False
) -> dict[str, Tensor]:
    """``text_model.*`` (+ ``text_projection.weight`` unless it is the identity loading added; ``keep_projection``
    writes it anyway, for a source file that had one)."""
    state = {}
    for key, tensor in model.state_dict().items():
        if key == PROJECTION:
            if keep_projection or not _is_identity(tensor):
                state[key] = tensor
        elif not key.endswith("position_ids"):
            state[_CLIP_TOWER + key.removeprefix(_CLIP_TOWER)] = tensor
    return state


def t5_state(model: T5EncoderModel) -> dict[str, Tensor]:
    """``encoder.*`` + ``shared.weight``; ``shared.weight`` is the embedding the encoder uses, even if loading
    untied the two."""
    state = dict(model.state_dict())
    state["shared.weight"] = model.encoder.embed_tokens.weight
    return state


def save_text_encoder(
    model: CLIPTextModel | CLIPTextModelWithProjection | T5EncoderModel,
    path: str | os.PathLike,
    *,
    kind: str,
    dtype: torch.dtype | None,
    metadata: Mapping[str, str] | None = None,
    mem_eff: bool = False,
    keep_projection: bool = False,
) -> None:
    """Save a trained ``kind`` ("clip_l", "clip_g", "t5xxl") encoder with float tensors in ``dtype`` (None keeps
    them). ``keep_projection``: write CLIP-L's projection even when it is the identity (the source had one)."""
    if kind not in TEXT_ENCODER_KINDS:
        raise ValueError(f"unknown text encoder kind {kind!r}; expected one of {', '.join(TEXT_ENCODER_KINDS)}")
    expected = T5EncoderModel if kind == "t5xxl" else (CLIPTextModel, CLIPTextModelWithProjection)
    if not isinstance(model, expected):
        raise TypeError(f"{kind}: expected the unwrapped transformers model, got {type(model).__name__}")
    if kind == "t5xxl":
        state = t5_state(model)
    else:
        state = clip_state(model, keep_projection=keep_projection or kind == "clip_g")
    save_state(state, path, dtype=dtype, metadata=metadata, mem_eff=mem_eff)
    logger.info("saved %s to %s (%d tensors, %s)", kind, path, len(state), dtype or "model dtypes")
