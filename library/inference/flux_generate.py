"""Text-to-image with FLUX.1: noise -> Euler flow sampling -> AE decode -> PNG. Shared by
flux_minimal_inference.py and the sample images written during training."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from library.io.atomic import atomic_write
from library.models.flux.model import Flux
from library.models.flux.sampling import denoise, get_schedule, prepare_img_ids, unpack_latents
from library.models.flux.text_conditioning import FluxTextConditioning

logger = logging.getLogger(__name__)


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


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device, offload: bool) -> Iterator[nn.Module]:
    """Move ``module`` to ``device`` for the block; with ``offload`` move it back to the CPU afterwards."""
    module.to(device)
    try:
        yield module
    finally:
        if offload:
            module.to("cpu")


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
) -> Tensor:
    """Sample one image's latents [1, 16, H/8, W/8] for ``cond`` (batch of one)."""
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
    with tqdm(total=steps, desc="sampling", unit="step", disable=not show_progress, leave=False) as bar:

        def model_fn(**kwargs: Tensor) -> Tensor:
            kwargs["img"] = kwargs["img"].repeat(len(conds), 1, 1)
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


@torch.no_grad()
def decode_images(ae: nn.Module, latents: Tensor) -> list[Image.Image]:
    """AE-decode latents and convert [-1, 1] pixels to RGB images."""
    param = next(ae.parameters())
    pixels = ae.decode(latents.to(param.device, param.dtype)).float().clamp(-1, 1)
    arrays = ((pixels.permute(0, 2, 3, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a PNG atomically (a kill never leaves a half-written image)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return Path(path)
