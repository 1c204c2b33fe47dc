"""Write a trained SD3/SD3.5 model as Stability AI's single file: the MMDiT under ``model.diffusion_model.`` and
the VAE under ``first_stage_model.``, as ``sd3.5_large.safetensors`` and upstream's ``sd3_train.py``. Trained
text encoders go to separate files (``library.models.text_encoders.saving``); ``text_encoders.*`` is never
written."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from library.io.safetensors_stream import save_state
from library.models.autoencoder.model import AutoEncoder
from library.models.checkpoint_kind import DIFFUSION_MODEL_PREFIX, SD3_VAE_PREFIX
from library.models.sd3.model import MMDiT

logger = logging.getLogger(__name__)


def save_sd3_checkpoint(
    mmdit: MMDiT,
    vae: AutoEncoder,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None,
    metadata: Mapping[str, str] | None,
    mem_eff: bool = False,
) -> None:
    """Save MMDiT + VAE with every tensor in ``dtype`` (``--save_precision``; None keeps each tensor's dtype);
    ``metadata`` is the caller's modelspec dict; ``mem_eff`` streams the tensors one at a time."""
    if not isinstance(mmdit, MMDiT) or not isinstance(vae, AutoEncoder):
        raise TypeError(
            f"expected the unwrapped MMDiT and AutoEncoder, got {type(mmdit).__name__}, {type(vae).__name__}"
        )
    state = {DIFFUSION_MODEL_PREFIX + k: v for k, v in mmdit.state_dict().items()}
    state.update({SD3_VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    save_state(state, path, dtype=dtype, metadata=metadata, mem_eff=mem_eff)
    logger.info("saved %s + VAE to %s (%s)", mmdit.params.display_name, path, dtype or "model dtypes")
