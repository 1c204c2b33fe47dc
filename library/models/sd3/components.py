"""Where each SD3 component comes from: the checkpoint users give holds the MMDiT and often the VAE and text
encoders (``…_incl_clips``, ``…_incl_clips_t5xxl``); separate files may be given for any of them. An explicit file
always wins over an embedded copy (upstream silently ignores ``--clip_g``/``--t5xxl`` then), and the log says where
each component came from. Shared by the training family and ``sd3_minimal_inference.py``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError
from library.models.sd3.loading import SD3Checkpoint, open_sd3_checkpoint
from library.models.sd3.model import MMDiT
from library.models.sd3.text_conditioning import SD3TextEncoder, load_sd3_tokenizers
from library.models.text_encoders.clip import load_clip_text_model
from library.models.text_encoders.t5 import load_t5_encoder

logger = logging.getLogger(__name__)

_ENCODERS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}


@dataclass(frozen=True)
class ComponentSource:
    path: str
    prefix: str  # inside the file ("" for a file of its own)
    option: str  # named in errors

    def describe(self) -> str:
        return f"from {self.option} {self.path}" if not self.prefix else f"embedded in {self.path} ({self.prefix}*)"


@dataclass(frozen=True)
class SD3Files:
    checkpoint: SD3Checkpoint
    clip_l: ComponentSource
    clip_g: ComponentSource
    t5xxl: ComponentSource
    vae: ComponentSource


def resolve_sd3_files(
    checkpoint: str | Path,
    *,
    clip_l: str | None = None,
    clip_g: str | None = None,
    t5xxl: str | None = None,
    vae: str | None = None,
    checkpoint_option: str = "--pretrained_model_name_or_path",
) -> SD3Files:
    """Read the checkpoint's header and decide where each component comes from: the given file, else the copy
    embedded in the checkpoint, else a one-line error naming the option to give."""
    opened = open_sd3_checkpoint(checkpoint, checkpoint_option)
    path = str(opened.path)
    given = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl}
    sources = {}
    for role, name in _ENCODERS.items():
        if given[role]:
            if role in opened.embedded:
                logger.info("--%s %s is used instead of the %s embedded in the checkpoint", role, given[role], name)
            sources[role] = ComponentSource(given[role], "", f"--{role}")
        elif role in opened.embedded:
            sources[role] = ComponentSource(path, opened.embedded[role], checkpoint_option)
        else:
            raise UserError(f"--{role} is required: {path} holds no {name} (give the {name} file)")
    if vae:
        sources["vae"] = ComponentSource(vae, "", "--vae")
    elif opened.vae_prefix is not None:
        sources["vae"] = ComponentSource(path, opened.vae_prefix, checkpoint_option)
    else:
        raise UserError(f"--vae is required: {path} holds no VAE (first_stage_model.*); give the SD3 VAE file")
    files = SD3Files(opened, **sources)
    logger.info("%s from %s; CLIP-L %s; CLIP-G %s; T5-XXL %s; VAE %s", opened.params.display_name, path,
                files.clip_l.describe(), files.clip_g.describe(), files.t5xxl.describe(), files.vae.describe())  # fmt: skip
    return files


@dataclass(frozen=True)
class SD3TextSettings:
    t5_max_length: int = 256
    apply_lg_attn_mask: bool = False
    apply_t5_attn_mask: bool = False
    clip_l_tokenizer: str | None = None
    clip_g_tokenizer: str | None = None
    t5xxl_tokenizer: str | None = None


def load_sd3_text_encoder(
    files: SD3Files,
    settings: SD3TextSettings,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    dtypes: tuple[torch.dtype | None, torch.dtype | None, torch.dtype | None] = (None, None, None),
) -> SD3TextEncoder:
    """CLIP-L and CLIP-G (both with their projections; identity for a CLIP-L file without one) and T5-XXL, frozen;
    each in ``dtype`` unless ``dtypes`` gives it its own (encoders that full fine-tuning trains)."""
    l_dtype, g_dtype, t5_dtype = (d or dtype for d in dtypes)
    clip_l = load_clip_text_model(files.clip_l.path, dtype=l_dtype, device=device, option=files.clip_l.option,
                                  expect_width=768, prefix=files.clip_l.prefix, with_projection=True)  # fmt: skip
    clip_g = load_clip_text_model(files.clip_g.path, dtype=g_dtype, device=device, option=files.clip_g.option,
                                  expect_width=1280, prefix=files.clip_g.prefix, with_projection=True)  # fmt: skip
    t5 = load_t5_encoder(files.t5xxl.path, dtype=t5_dtype, device=device, option=files.t5xxl.option,
                         prefix=files.t5xxl.prefix)  # fmt: skip
    tokenizers = load_sd3_tokenizers(settings.clip_l_tokenizer, settings.clip_g_tokenizer, settings.t5xxl_tokenizer)
    try:
        return SD3TextEncoder(clip_l, clip_g, t5, *tokenizers, t5_max_length=settings.t5_max_length,
                              apply_lg_attn_mask=settings.apply_lg_attn_mask,
                              apply_t5_attn_mask=settings.apply_t5_attn_mask)  # fmt: skip
    except ValueError as e:
        raise UserError(f"the text encoders do not fit together ({e}): check --clip_l, --clip_g and --t5xxl") from None


def check_text_fits(mmdit: MMDiT, text: SD3TextEncoder, files: SD3Files) -> None:
    """The MMDiT's text and pooled widths must be what these encoders give (a one-line error otherwise)."""
    params = mmdit.params
    pooled = text.clip_l.config.projection_dim + text.clip_g.config.projection_dim
    if params.context_in_dim != text.context_width or params.adm_in_dim != pooled:
        raise UserError(
            f"{files.checkpoint.path}: the MMDiT takes text width {params.context_in_dim} and pooled width "
            f"{params.adm_in_dim}, but T5 gives {text.context_width} and CLIP-L + CLIP-G pooled {pooled}: "
            "the text encoders belong to another model"
        )
