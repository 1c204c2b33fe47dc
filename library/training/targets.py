"""Training targets: what the shared loop trains and how the result is written.

``NetworkTarget`` trains a LoRA/OFT network (``--network_module``) attached to the family's models; full
fine-tuning and ControlNet targets follow the same small contract (``module``, ``set_train``, ``save``).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from library.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkOptions:
    module: str
    dim: int | None
    alpha: float
    dropout: float | None
    args: dict[str, str]
    weights: str | None
    dim_from_weights: bool
    train_unet: bool
    train_text_encoder: bool

    @classmethod
    def from_cli(cls, module: str | None, dim: int | None, alpha: float, dropout: float | None,
                 args: list[str] | None, weights: str | None, dim_from_weights: bool,
                 unet_only: bool, text_encoder_only: bool) -> NetworkOptions:  # fmt: skip
        if not module:
            raise UserError("--network_module is required (e.g. networks.lora_flux)")
        if unet_only and text_encoder_only:
            raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
        if dim_from_weights and not weights:
            raise UserError("--dim_from_weights needs --network_weights")
        parsed = {}
        for entry in args or []:
            key, sep, value = entry.partition("=")
            if not sep or not key.strip():
                raise UserError(f"--network_args {entry!r}: expected key=value")
            parsed[key.strip()] = value.strip()
        return cls(module, dim, alpha, dropout, parsed, weights, dim_from_weights, not text_encoder_only, not unet_only)


def import_network_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise UserError(f"--network_module {name}: cannot import ({e.msg}); use networks.lora_flux") from None


class NetworkTarget:
    """A LoRA/OFT network attached to the denoiser (and optionally the text encoders)."""

    def __init__(
        self,
        network: nn.Module,
        trains_text_encoders: bool,
        save_dtype: torch.dtype | None,
        prepared: nn.Module | None = None,
    ):
        self.module = prepared if prepared is not None else network  # what accelerate prepared (DDP-wrapped or not)
        self.network = network
        self.trains_text_encoders = trains_text_encoders
        self.save_dtype = save_dtype

    def set_train(self, train: bool) -> None:
        self.module.train(train)

    def set_batch_multipliers(self, multipliers: torch.Tensor | None) -> None:
        """Per-sample network multipliers ([B], from each dataset's ``network_multiplier``) for the next
        forward; None restores 1.0."""
        self.network.set_multiplier(1.0 if multipliers is None else multipliers)

    def scale_weight_norms(self, max_norm: float) -> dict[str, float]:
        """--scale_weight_norms: upstream's max-norm regularization of each LoRA module's delta, logged as
        upstream logs it."""
        device = next(self.network.parameters()).device
        scaled, mean_norm, max_key_norm = self.network.apply_max_norm_regularization(max_norm, device)
        return {"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm,
                "max_norm/max_key_norm": max_key_norm}  # fmt: skip

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        self.network.save_weights(path, self.save_dtype, metadata)
