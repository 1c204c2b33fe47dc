"""The autoencoder as a dataset's latent encoder (library/data/encode_caches.py ``LatentEncoder``), shared by the
families: latents drawn from the posterior (mean + sigma * eps, from a stream keyed by image or sample) as upstream, or its
mean; stored scaled (FLUX.1's caches) or unscaled (SD3's), as each family's upstream caches hold them."""

from __future__ import annotations

import torch
from torch import Tensor

from library.models.autoencoder.model import AutoEncoder
from library.random_streams import keyed_normal


class AutoEncoderLatentCodec:
    def __init__(self, ae: AutoEncoder, cache_suffix: str, *, scaled: bool, sample: bool = True):
        self.ae, self.cache_suffix, self.scaled, self.sample = ae, cache_suffix, scaled, sample
        self.latent_downscale = ae.downscale_factor
        self.latent_channels = ae.latent_channels

    @torch.no_grad()
    def encode_latents(self, images: Tensor, keys: list[tuple] | None = None) -> Tensor:
        """Latents of ``images``; with ``keys`` each image's posterior draw comes from its own keyed stream (the
        same whichever process encodes it), else from the global stream."""
        param = next(self.ae.parameters())
        mean, logvar = self.ae.encode_moments(images.to(param.device, param.dtype))
        z = mean.float()
        if self.sample:
            eps = (torch.randn(mean.shape, device=mean.device) if keys is None
                   else keyed_normal(tuple(mean.shape[1:]), keys).to(mean.device))  # fmt: skip
            z = z + torch.exp(0.5 * logvar.float()) * eps
        return self.ae.params.scale_factor * (z - self.ae.params.shift_factor) if self.scaled else z
