"""Text-to-image with FLUX.1: noise -> Euler flow sampling -> AE decode -> PNG. Shared by
flux_minimal_inference.py and the sample images written during training."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from library.errors import UserError
from library.inference.images import decode_images, save_png
from library.models.flux.controlnet import FluxControlNet
from library.models.flux.model import Flux
from library.models.flux.sampling import denoise, get_schedule, latent_size, prepare_img_ids, unpack_latents
from library.models.flux.text_conditioning import FluxTextConditioning

logger = logging.getLogger(__name__)

__all__ = [
    "ControlNetInput", "SampleSettings", "control_hint", "decode_images", "initial_noise", "open_control_image",
    "sample_latents", "save_png",
]  # fmt: skip


@dataclass(frozen=True)
class SampleSettings:
    width: int = 1360
    height: int = 768
    steps: int | None = None  # None: 4 for schnell, 50 for dev
    guidance: float = 3.5
    seed: int = 0
    cfg_scale: float = 1.0  # > 1 with a negative prompt runs true classifier-free guidance

    def steps_for(self, is_schnell: bool) -> int:
        return self.steps if self.steps is not None else (4 if is_schnell else 50)


@dataclass(frozen=True)
class ControlNetInput:
    """A ControlNet run at every step with its ``hint`` [1, 3, H, W] (:func:`control_hint`); its samples reach the
    base model scaled by ``scale``."""

    model: FluxControlNet
    hint: Tensor
    scale: float = 1.0


def open_control_image(path: str | os.PathLike, option: str = "--controlnet_image") -> Image.Image:
    """The control image as RGB; a missing or unreadable file is one error line naming ``option``."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{option} {path}: file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{option} {path}: not a readable image ({e})") from None


def control_hint(image: Image.Image, width: int, height: int) -> Tensor:
    """``image`` as upstream's sampler hands it to the ControlNet: RGB, LANCZOS-resized to the pixel size of the
    latents (``width`` x ``height`` rounded up to multiples of 16), in [-1, 1], as a [1, 3, H, W] fp32 tensor."""
    lat_h, lat_w = latent_size(height, width)
    resized = image.convert("RGB").resize((8 * lat_w, 8 * lat_h), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)[None].contiguous()


def initial_noise(seed: int, width: int, height: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Packed noise [1, (H/16)(W/16), 64] drawn as upstream does, so a seed gives upstream's image."""
    tokens = math.ceil(height / 16) * math.ceil(width / 16)
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(1, tokens, 64, device=device, dtype=dtype, generator=generator)


@torch.no_grad()
def sample_latents(
    model: Flux,
    cond: FluxTextConditioning,
    settings: SampleSettings,
    dtype: torch.dtype,
    negative: FluxTextConditioning | None = None,
    show_progress: bool = True,
    control: ControlNetInput | None = None,
) -> Tensor:
    """Sample one image's latents [1, 16, H/8, W/8] for ``cond`` (batch of one); with ``control`` its ControlNet
    runs at every step (with CFG on both halves) and steers the base model."""
    device = next(model.parameters()).device
    is_schnell = not model.params.guidance_embed
    lat_h, lat_w = 2 * math.ceil(settings.height / 16), 2 * math.ceil(settings.width / 16)
    img = initial_noise(settings.seed, settings.width, settings.height, device, dtype)
    steps = settings.steps_for(is_schnell)
    timesteps = get_schedule(steps, img.shape[1], shift=not is_schnell)
    use_cfg = negative is not None and settings.cfg_scale != 1.0
    conds = [negative, cond] if use_cfg else [cond]
    txt = torch.cat([c.t5_out for c in conds]).to(device, dtype)
    vec = torch.cat([c.l_pooled for c in conds]).to(device, dtype)
    txt_ids = torch.cat([c.txt_ids for c in conds]).to(device, dtype)
    mask = torch.cat([c.t5_attn_mask for c in conds]).to(device) if cond.t5_attn_mask is not None else None
    img_ids = prepare_img_ids(len(conds), lat_h, lat_w, device).to(dtype)
    hint = control.hint.to(device, dtype).expand(len(conds), -1, -1, -1) if control is not None else None
    with tqdm(total=steps, desc="sampling", unit="step", disable=not show_progress, leave=False) as bar:

        def model_fn(**kwargs: Tensor) -> Tensor:
            kwargs["img"] = kwargs["img"].repeat(len(conds), 1, 1)
            if control is not None:
                samples = control.model(controlnet_cond=hint, **kwargs)
                kwargs.update(controlnet_block_samples=samples, controlnet_scale=control.scale)
            pred = model(**kwargs)
            if use_cfg:
                uncond, pred = pred.chunk(2)
                pred = uncond + settings.cfg_scale * (pred - uncond)
            return pred

        latents = denoise(
            model_fn, img, img_ids, txt, txt_ids, vec, timesteps, settings.guidance,
            txt_attention_mask=mask, on_step=lambda _: bar.update(1),
        )  # fmt: skip
    return unpack_latents(latents.float(), lat_h, lat_w)
