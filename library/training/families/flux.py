"""FLUX.1 as a model family for the shared training loop: what is model-specific about loading, encoding
prompts and images, running the denoiser, drawing sample images and naming the result."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn

from library.inference.flux_generate import SampleSettings, decode_images, sample_latents
from library.memory.fp8 import enable_fp8_linear
from library.models.autoencoder.loading import load_autoencoder
from library.models.autoencoder.model import AutoEncoder
from library.models.flux.loading import load_flux_model, open_flux_checkpoint
from library.models.flux.model import Flux
from library.models.flux.sampling import pack_latents, prepare_img_ids, unpack_latents
from library.models.flux.text_conditioning import FluxTextConditioning, FluxTextEncoder, default_t5_max_length
from library.models.text_encoders.clip import load_clip_text_model
from library.models.text_encoders.t5 import load_t5_encoder
from library.models.text_encoders.tokenizers import load_clip_tokenizer, load_t5_tokenizer
from library.training.sample_prompts import SamplePrompt

logger = logging.getLogger(__name__)

TEXT_KEYS = ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask")


@dataclass(frozen=True)
class FluxModelFiles:
    flux: str
    clip_l: str
    t5xxl: str
    ae: str
    clip_l_tokenizer: str | None = None
    t5xxl_tokenizer: str | None = None


@dataclass(frozen=True)
class FluxTextSettings:
    t5xxl_max_token_length: int | None = None  # None: 256 for schnell, 512 for dev
    apply_t5_attn_mask: bool = False


class FluxLatentCodec:
    """The AE as the dataset's latent encoder (see library/data/encode_caches.py: LatentEncoder)."""

    cache_suffix = "flux"
    latent_downscale = 8
    latent_channels = 16

    def __init__(self, ae: AutoEncoder):
        self.ae = ae

    @torch.no_grad()
    def encode_latents(self, images: Tensor) -> Tensor:
        param = next(self.ae.parameters())
        return self.ae.encode(images.to(param.device, param.dtype)).float()


class FluxTextCodec:
    """CLIP-L + T5-XXL as the dataset's text encoder; cache files as upstream writes them (``*_flux_te.npz`` with
    ``apply_t5_attn_mask``), the T5 length checked from the stored shapes."""

    cache_suffix = "flux"
    text_cache_keys = TEXT_KEYS

    def __init__(self, text: FluxTextEncoder):
        self.text = text

    @property
    def text_cache_fingerprint(self) -> dict[str, object]:
        return {"apply_t5_attn_mask": self.text.apply_t5_attn_mask}

    @property
    def text_cache_shapes(self) -> dict[str, tuple[int | None, ...]]:
        length = self.text.t5_max_length
        return {"t5_out": (length, None), "txt_ids": (length, 3), "t5_attn_mask": (length,)}

    def encode_text(self, captions: list[str]) -> dict[str, Tensor]:
        device = next(self.text.t5.parameters()).device
        cond = self.text.encode(captions, device)
        return {key: getattr(cond, key) for key in TEXT_KEYS}


class FluxFamily:
    """Holds the four FLUX.1 models and does everything model-specific for training and sampling."""

    name = "flux"
    base_model_version = "flux1"

    def __init__(self, flux: Flux, ae: AutoEncoder, text: FluxTextEncoder, guidance_scale: float):
        self.flux, self.ae, self.text = flux, ae, text
        self.guidance_scale = guidance_scale
        self.latent_codec = FluxLatentCodec(ae)
        self.text_codec = FluxTextCodec(text)

    @property
    def variant(self) -> str:
        return self.flux.params.variant

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.text.clip_l, self.text.t5]

    # --- uncached batches and sampling ---
    def encode_latents(self, images: Tensor) -> Tensor:
        return self.latent_codec.encode_latents(images)

    def encode_text(self, captions: list[str]) -> dict[str, Tensor]:
        return self.text_codec.encode_text(captions)

    # --- the loop's view ---
    def predict(self, noisy_latents: Tensor, t: Tensor, text: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        """The velocity prediction [B, 16, H, W] for latents [B, 16, H, W] at times ``t`` [B]."""
        batch, _, height, width = noisy_latents.shape
        device = noisy_latents.device
        guidance = torch.full((batch,), self.guidance_scale, device=device, dtype=dtype)
        mask = text["t5_attn_mask"].to(device) if self.text.apply_t5_attn_mask else None
        pred = self.flux(
            img=pack_latents(noisy_latents.to(dtype)),
            img_ids=prepare_img_ids(batch, height, width, device).to(dtype),
            txt=text["t5_out"].to(device, dtype),
            txt_ids=text["txt_ids"].to(device, dtype),
            y=text["l_pooled"].to(device, dtype),
            timesteps=t.to(device, dtype),
            guidance=guidance if self.flux.params.guidance_embed else None,
            txt_attention_mask=mask,
        )
        return unpack_latents(pred, height, width)

    @staticmethod
    def image_seq_len(latents: Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    @torch.no_grad()
    def sample_image(self, prompt: SamplePrompt, seed: int, dtype: torch.dtype) -> Image.Image:
        device = next(self.flux.parameters()).device
        cond = FluxTextConditioning(**{k: v for k, v in self.encode_text([prompt.prompt]).items()})
        negative = None
        if prompt.scale != 1.0:
            negative = FluxTextConditioning(**self.encode_text([prompt.negative_prompt or ""]))
        settings = SampleSettings(
            width=16 * math.ceil(prompt.width / 16), height=16 * math.ceil(prompt.height / 16),
            steps=prompt.sample_steps, guidance=prompt.guidance_scale, seed=seed, cfg_scale=prompt.scale,
        )  # fmt: skip
        latents = sample_latents(self.flux, cond.to(device), settings, dtype, negative and negative.to(device), False)
        return decode_images(self.ae, latents)[0]


def load_flux_text_encoder(
    files: FluxModelFiles,
    text_settings: FluxTextSettings,
    *,
    dtype: torch.dtype,
    device: torch.device,
    is_schnell: bool,
) -> FluxTextEncoder:
    """CLIP-L, T5-XXL and their tokenizers, frozen; the T5 length defaults by variant (256 schnell, 512 dev)."""
    clip_l = load_clip_text_model(files.clip_l, dtype=dtype, device=device, option="--clip_l")
    t5 = load_t5_encoder(files.t5xxl, dtype=dtype, device=device, option="--t5xxl")
    for module in (clip_l, t5):
        module.requires_grad_(False).eval()
    return FluxTextEncoder(
        clip_l, t5, load_clip_tokenizer(files.clip_l_tokenizer), load_t5_tokenizer(files.t5xxl_tokenizer),
        text_settings.t5xxl_max_token_length or default_t5_max_length(is_schnell), text_settings.apply_t5_attn_mask,
    )  # fmt: skip


def load_flux_ae(path: str, *, dtype: torch.dtype, device: torch.device) -> AutoEncoder:
    return load_autoencoder(path, dtype=dtype, device=device, option="--ae").requires_grad_(False).eval()


def checkpoint_is_schnell(path: str) -> bool:
    """Whether the FLUX.1 checkpoint is schnell (no guidance embedding), from its header alone."""
    return not open_flux_checkpoint(path).params.guidance_embed


def load_flux_family(
    files: FluxModelFiles,
    text_settings: FluxTextSettings,
    *,
    dtype: torch.dtype,
    device: torch.device,
    fp8_base: bool,
    guidance_scale: float,
) -> FluxFamily:
    """Load all four models onto ``device`` (weights in ``dtype``; FLUX block Linears in fp8 with ``fp8_base``)."""
    flux = load_flux_model(files.flux, dtype=dtype, device=device, fp8_linear=fp8_base)
    if fp8_base:
        logger.info("fp8 base: %d FLUX Linear layers store float8_e4m3fn weights", enable_fp8_linear(flux))
    ae = load_flux_ae(files.ae, dtype=dtype, device=device)
    text = load_flux_text_encoder(files, text_settings, dtype=dtype, device=device,
                                  is_schnell=not flux.params.guidance_embed)  # fmt: skip
    return FluxFamily(flux, ae, text, guidance_scale)
