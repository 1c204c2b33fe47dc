"""The autoencoder as a dataset's latent encoder (library/data/encode_caches.py ``LatentEncoder``), shared by the
families: latents drawn from the posterior (mean + sigma * eps, from the global random stream) as upstream, or its
mean; stored scaled (FLUX.1's caches) or unscaled (SD3's), as each family's upstream caches hold them."""

from __future__ import annotations

import torch
from torch import Tensor

from library.models.autoencoder.model import AutoEncoder


class AutoEncoderLatentCodec:
    def __init__(self, ae: AutoEncoder, cache_suffix: str, *, scaled: bool, sample: bool = True):
        self.ae, self.cache_suffix, self.scaled, self.sample = ae, cache_suffix, scaled, sample
        self.latent_downscale = ae.downscale_factor
        self.latent_channels = ae.latent_channels

    @torch.no_grad()
    def encode_latents(self, images: Tensor) -> Tensor:
        param = next(self.ae.parameters())
        mean, logvar = self.ae.encode_moments(images.to(param.device, param.dtype))
        z = mean.float()
        if self.sample:
            z = z + torch.exp(0.5 * logvar.float()) * torch.randn(mean.shape, device=mean.device)
        return self.ae.params.scale_factor * (z - self.ae.params.shift_factor) if self.scaled else z
