"""FLUX.1 latent packing, position ids, the sampling schedule and the Euler flow sampler."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from einops import rearrange, repeat
from torch import Tensor

from library.models.flow_shift import resolution_mu, time_shift


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, H, W] latents -> [B, (H/2)(W/2), 4C] tokens of 2x2 patches."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height`` x ``width``."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, w=width // 2, ph=2, pw=2)


def prepare_img_ids(batch_size: int, height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """Position ids [B, (H/2)(W/2), 3] for a latent of ``height`` x ``width``: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return repeat(ids, "h w c -> b (h w) c", b=batch_size)


def latent_size(height: int, width: int) -> tuple[int, int]:
    """Latent height and width for an image size (a multiple of 16 pixels, as BFL rounds up)."""
    return 2 * math.ceil(height / 16), 2 * math.ceil(width / 16)


def get_schedule(num_steps: int, image_seq_len: int, shift: bool = True) -> list[float]:
    """Timesteps from 1 to 0; dev shifts them towards noise for larger images, schnell does not."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        timesteps = time_shift(resolution_mu(image_seq_len), 1.0, timesteps)
    return timesteps.tolist()


def denoise(
    model: Callable[..., Tensor],
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    vec: Tensor,
    timesteps: list[float],
    guidance: float = 3.5,
    txt_attention_mask: Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Tensor:
    """Euler integration of the flow predicted by ``model`` (a Flux or a wrapper with its keyword arguments)
    from t=timesteps[0] to t=timesteps[-1]."""
    batch = img.shape[0]
    guidance_vec = torch.full((batch,), guidance, device=img.device, dtype=img.dtype)
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((batch,), t_curr, dtype=img.dtype, device=img.device)
        pred = model(
            img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, y=vec, timesteps=t_vec,
            guidance=guidance_vec, txt_attention_mask=txt_attention_mask,
        )  # fmt: skip
        img = img + (t_prev - t_curr) * pred
        if on_step:
            on_step(i)
    return img
