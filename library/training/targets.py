"""Training targets: what the shared loop trains and how the result is written.

``NetworkTarget`` trains a LoRA/OFT network (``--network_module``) attached to the family's models; full
fine-tuning and ControlNet targets follow the same small contract (``module``, ``set_train``, ``save``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
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
                 unet_only: bool, text_encoder_only: bool, example_module: str) -> NetworkOptions:  # fmt: skip
        if not module:
            raise UserError(f"--network_module is required (e.g. {example_module})")
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
        raise UserError(f"--network_module {name}: cannot import ({e.msg}); check the module name") from None


def trained_text_encoders(network: nn.Module) -> set[int]:
    """Indices of the text encoders (in the family's order, as the network's ``text_encoder_prefixes``) that have
    network modules."""
    prefixes = getattr(network, "text_encoder_prefixes", ())
    names = [m.name for m in getattr(network, "text_encoder_adapters", [])]
    return {i for i, prefix in enumerate(prefixes) if any(n.startswith(prefix + "_") for n in names)}


class NetworkTarget:
    """A LoRA/OFT network attached to the denoiser (and optionally the text encoders)."""

    def __init__(
        self,
        network: nn.Module,
        trains_text_encoders: bool,
        save_dtype: torch.dtype | None,
        prepared: nn.Module | None = None,
        max_norm: float | None = None,
        block_swaps: list | None = None,
    ):
        self.module = prepared if prepared is not None else network  # what accelerate prepared (DDP-wrapped or not)
        self.network = network
        self.trains_text_encoders = trains_text_encoders
        self.save_dtype = save_dtype
        self.max_norm = max_norm  # --scale_weight_norms
        self.block_swaps = block_swaps or []  # GGPO reads base weights, which block swap may be moving

    def set_train(self, train: bool) -> None:
        self.module.train(train)

    def set_batch_multipliers(self, multipliers: torch.Tensor | None) -> None:
        """Per-sample network multipliers ([B], from each dataset's ``network_multiplier``) for the next
        forward; None restores 1.0."""
        self.network.set_multiplier(1.0 if multipliers is None else multipliers)

    def scale_weight_norms(self) -> dict[str, float]:
        """--scale_weight_norms: upstream's max-norm regularization of each LoRA module's delta, logged as
        upstream logs it."""
        if not self.max_norm:
            return {}
        device = next(self.network.parameters()).device
        scaled, mean_norm, max_key_norm = self.network.apply_max_norm_regularization(self.max_norm, device)
        return {"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm,
                "max_norm/max_key_norm": max_key_norm}  # fmt: skip

    def before_optimizer_step(self) -> None:
        """GGPO (``ggpo_beta``/``ggpo_sigma``): the norms its weight perturbation uses, from this step's gradients."""
        if hasattr(self.network, "update_grad_norms"):
            for swap in self.block_swaps:
                swap.synchronize()
            self.network.update_grad_norms()
            self.network.update_norms()

    @contextlib.contextmanager
    def without_adapter(self) -> Iterator[None]:
        """The base model alone inside the block (the network's multipliers are kept for afterwards)."""
        self.network.set_enabled(False)
        try:
            yield
        finally:
            self.network.set_enabled(True)

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        """Write the network; weights that are NaN or infinite are never written (the previous file stays)."""
        broken = [k for k, v in self.network.state_dict().items() if not bool(torch.isfinite(v).all())]
        if broken:
            raise UserError(f"not saving {path}: {len(broken)} network tensors are NaN or infinite (e.g. {broken[0]}); "
                            "lower the learning rate or check the data")  # fmt: skip
        self.network.save_weights(path, self.save_dtype, metadata)
