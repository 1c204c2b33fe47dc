"""Text-to-image with SD3/SD3.5: noise -> Euler flow sampling with a fixed shift -> VAE decode. Shared by
sd3_minimal_inference.py and the sample images written during training.

The sampler is upstream's (kohya-ss sd-scripts ``sd3_minimal_inference.do_sample`` and ``sd3_train_utils``,
after SAI's reference): sigmas sigma(t) = s*tau/(1 + (s-1)*tau), tau = t/1000, for timesteps linspace(1000,
1000*sigma(1/1000), steps), then 0; x = sigma_0 * noise; per step the model gets t = sigma*1000 and predicts the
velocity v; denoised = x - v*sigma (classifier-free guidance mixes the denoised values); x += (x - denoised)/sigma
* (sigma_next - sigma).

Noise comes from one CPU generator seeded with the seed, drawn in fp32, then moved and cast, so a seed gives the
same image in training samples and in the inference script on any device and in any dtype (upstream's training
samples do this; its inference script draws on the device and in the model dtype, so its seeds differ there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from library.errors import UserError
from library.inference.images import decode_images
from library.models.autoencoder.model import SD3_SCALE_FACTOR, SD3_SHIFT_FACTOR
from library.models.sd3.text_conditioning import SD3TextEncoder

logger = logging.getLogger(__name__)

SD3_SHIFT = 3.0
NUM_TIMESTEPS = 1000
LATENT_CHANNELS = 16
PIXELS_PER_TOKEN = 16  # VAE 8x, patch 2x

VelocityModel = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (x, timesteps = sigma*1000, y, context)


@dataclass(frozen=True)
class SD3SampleSettings:
    width: int = 1024
    height: int = 1024
    steps: int = 50
    cfg_scale: float = 5.0  # != 1 with a negative conditioning runs classifier-free guidance
    seed: int = 0
    shift: float = SD3_SHIFT

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"sampling steps must be at least 1, got {self.steps}")
        if self.shift <= 0:
            raise UserError(f"the sampling shift must be > 0, got {self.shift}")

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) rounded down to multiples of 16 pixels (at least 16)."""
        return sd3_image_size(self.width, self.height)


def sd3_image_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) rounded down to multiples of 16 pixels, at least 16: one MMDiT token per 16x16 pixels."""
    return tuple(max(PIXELS_PER_TOKEN, v - v % PIXELS_PER_TOKEN) for v in (width, height))


def shift_sigma(tau: Tensor, shift: float) -> Tensor:
    """The shifted flow sigma s*tau/(1 + (s-1)*tau) for tau in [0, 1]."""
    return shift * tau / (1 + (shift - 1) * tau)


def get_sd3_sigmas(steps: int, shift: float = SD3_SHIFT) -> Tensor:
    """The ``steps + 1`` sigmas from 1 to 0 (fp32, as upstream): the shifted sigma of timesteps evenly spaced from
    1000 down to the smallest of the 1000 training timesteps' (1000 * sigma(1/1000)), then a final 0."""
    sigma_min = shift_sigma(torch.tensor(1.0 / NUM_TIMESTEPS), shift)
    timesteps = torch.linspace(NUM_TIMESTEPS, NUM_TIMESTEPS * sigma_min.item(), steps)
    sigmas = shift_sigma(timesteps / NUM_TIMESTEPS, shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def initial_sd3_noise(seed: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise in fp32 on the CPU from a generator seeded with ``seed`` (same on every device)."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def _model_device(model: VelocityModel, fallback: torch.device) -> torch.device:
    if isinstance(model, nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return fallback


@torch.no_grad()
def sample_sd3_latents(
    model: VelocityModel,
    cond: tuple[Tensor, Tensor],
    negative: tuple[Tensor, Tensor] | None,
    settings: SD3SampleSettings,
    dtype: torch.dtype,
    show_progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> Tensor:
    """Sample one image's (scaled) latents [1, 16, H/8, W/8] in fp32 for ``cond`` = (context, y), batch of one.

    ``model(x, timesteps, y, context)`` predicts the velocity; it runs on its parameters' device (or ``cond``'s for
    a parameterless callable) with x, y and context in ``dtype`` and timesteps (sigma*1000) in fp32. The
    integration itself runs in fp32."""
    device = _model_device(model, cond[0].device)
    width, height = settings.image_size
    shape = (1, LATENT_CHANNELS, height // 8, width // 8)
    sigmas = get_sd3_sigmas(settings.steps, settings.shift).to(device)
    x = sigmas[0] * initial_sd3_noise(settings.seed, shape).to(device)
    use_cfg = negative is not None and settings.cfg_scale != 1.0
    conds = [cond, negative] if use_cfg else [cond]
    context = torch.cat([c[0] for c in conds]).to(device, dtype)
    y = torch.cat([c[1] for c in conds]).to(device, dtype)
    with tqdm(total=settings.steps, desc="sampling", unit="step", disable=not show_progress, leave=False) as bar:
        for i in range(settings.steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            timesteps = (sigma * NUM_TIMESTEPS).expand(len(conds)).float()
            velocity = model(x.to(dtype).repeat(len(conds), 1, 1, 1), timesteps, y, context).float()
            denoised = x - velocity * sigma
            if use_cfg:
                positive, uncond = denoised.chunk(2)
                denoised = uncond + (positive - uncond) * settings.cfg_scale
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
            bar.update(1)
            if on_step:
                on_step(i)
    return x


def check_sd3_vae(vae: nn.Module) -> None:
    """Raise ValueError unless ``vae`` decodes SD3 latents (scale 1.5305, shift 0.0609): a VAE loaded with another
    model's scaling would decode every image wrongly."""
    params = vae.params
    if (params.scale_factor, params.shift_factor) != (SD3_SCALE_FACTOR, SD3_SHIFT_FACTOR):
        raise ValueError(
            f"the VAE uses latent scale {params.scale_factor} and shift {params.shift_factor}; SD3 needs "
            f"{SD3_SCALE_FACTOR} and {SD3_SHIFT_FACTOR} (load it with those factors)"
        )


def decode_sd3_images(vae: nn.Module, latents: Tensor) -> list[Image.Image]:
    """Decode scaled SD3 latents (upstream's ``process_out``: z/1.5305 + 0.0609, inside ``vae.decode``) to RGB."""
    check_sd3_vae(vae)
    return decode_images(vae, latents)


@torch.no_grad()
def generate_sd3_image(
    model: VelocityModel,
    vae: nn.Module,
    text: SD3TextEncoder,
    prompt: str,
    negative_prompt: str | None,
    settings: SD3SampleSettings,
    dtype: torch.dtype,
    device: torch.device | str,
    show_progress: bool = True,
) -> Image.Image:
    """Encode ``prompt`` (and, when ``cfg_scale`` != 1, ``negative_prompt`` or ""), sample and decode one image.
    Prompts are encoded without caption dropout."""
    cond = text.encode([prompt], device).model_inputs()
    negative = None
    if settings.cfg_scale != 1.0:
        negative = text.encode([negative_prompt or ""], device).model_inputs()
    latents = sample_sd3_latents(model, cond, negative, settings, dtype, show_progress)
    return decode_sd3_images(vae, latents)[0]
