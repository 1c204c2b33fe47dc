"""Write a trained FLUX.1 transformer as one BFL-layout file: the bare keys of BFL's ``flux1-dev.safetensors``,
which ComfyUI, diffusers' single-file loader, upstream and our ``load_flux_model`` all read."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from library.io.safetensors_stream import save_state
from library.models.flux.model import Flux

logger = logging.getLogger(__name__)


def save_flux_checkpoint(
    model: Flux,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None,
    metadata: Mapping[str, str] | None,
    mem_eff: bool = False,
) -> None:
    """Save ``model`` with every tensor in ``dtype`` (``--save_precision``; None keeps each tensor's dtype, so fp8
    weights stay fp8); ``metadata`` is the caller's modelspec/ss_* dict; ``mem_eff`` streams (``--mem_eff_save``)."""
    if not isinstance(model, Flux):
        raise TypeError(f"expected the unwrapped FLUX.1 model, got {type(model).__name__}")
    save_state(model.state_dict(), path, dtype=dtype, metadata=metadata, mem_eff=mem_eff)
    logger.info("saved FLUX.1 %s to %s (%s)", model.params.variant, path, dtype or "model dtypes")
