"""The one LoRA implementation every architecture shares: the module, the network holding them, merging.

A ``LoRAModule`` adds ``multiplier * alpha / rank * up(down(x))`` to a Linear or Conv2d by overriding that
instance's ``forward``; ``remove`` puts back exactly what was there (an fp8 upcast patch included). Files per
architecture (``networks/lora_flux.py``) only choose targets, ranks and names. Saved keys are upstream's:
``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``. A module split into parts (FLUX.1's
``split_qkv``) is saved fused: stacked downs, block-diagonal ups, alpha times the number of parts, so that any
loader treating the file as one plain LoRA applies exactly the trained delta.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from library.errors import UserError
from library.io.safetensors_file import atomic_save_file, read_header
from library.training.metadata import additional_network_hashes

logger = logging.getLogger(__name__)

SAVED_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def lora_scale(alpha: float | Tensor | None, rank: int) -> float:
    """``alpha / rank``; an alpha of None or 0 means alpha = rank (no scaling), as upstream."""
    alpha = float(alpha) if alpha is not None else 0.0
    return (alpha if alpha else float(rank)) / rank


def lora_delta(down: Tensor, up: Tensor) -> Tensor:
    """``up @ down`` in fp32, shaped like the base weight (Linear, Conv2d 1x1 or 3x3)."""
    down, up = down.float(), up.float()
    if down.ndim == 2:
        return up @ down
    if down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


def merge_lora_weight(
    weight: Tensor,
    down: Tensor,
    up: Tensor,
    alpha: float | Tensor | None,
    multiplier: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """``W + multiplier * alpha / rank * up @ down``, computed in fp32 (on ``device`` if given) and returned in
    ``weight``'s dtype and device. The single merge rule for training, inference and the LoRA tools."""
    device = weight.device if device is None else device
    delta = lora_delta(down.to(device), up.to(device)) * (multiplier * lora_scale(alpha, down.shape[0]))
    return (weight.to(device).float() + delta).to(weight.device, weight.dtype)


def fuse_split_lora(downs: Sequence[Tensor], ups: Sequence[Tensor], alpha: float) -> tuple[Tensor, Tensor, float]:
    """One (down, up, alpha) equal in effect to per-part LoRAs of one rank each: downs stacked, ups placed
    block-diagonally, alpha times the number of parts so that ``alpha / rank`` is unchanged."""
    rank, parts = downs[0].shape[0], len(ups)
    down = torch.cat(list(downs), dim=0)
    up = down.new_zeros(sum(u.shape[0] for u in ups), rank * parts)
    row = 0
    for j, part in enumerate(ups):
        up[row : row + part.shape[0], j * rank : (j + 1) * rank] = part
        row += part.shape[0]
    return down, up, alpha * parts


def split_fused_lora(
    down: Tensor, up: Tensor, alpha: float, split_dims: Sequence[int]
) -> tuple[list[Tensor], list[Tensor], float]:
    """Inverse of ``fuse_split_lora``; ValueError when the up weight is not block-diagonal."""
    parts = len(split_dims)
    if down.shape[0] % parts or up.shape[1] != down.shape[0] or up.shape[0] != sum(split_dims):
        raise ValueError(f"shapes {tuple(down.shape)}/{tuple(up.shape)} do not split into {parts} parts")
    rank = down.shape[0] // parts
    ups, row = [], 0
    for j, size in enumerate(split_dims):
        rows = up[row : row + size]
        off_diagonal = torch.cat((rows[:, : j * rank], rows[:, (j + 1) * rank :]), dim=1)
        if off_diagonal.count_nonzero():
            raise ValueError("the up weight is not block-diagonal (not trained with split parts)")
        ups.append(rows[:, j * rank : (j + 1) * rank].clone())
        row += size
    return [d.clone() for d in down.chunk(parts, dim=0)], ups, alpha / parts


@dataclass(frozen=True)
class LoRATarget:
    """One layer to adapt: its upstream LoRA name, the layer, rank, alpha and optional output split."""

    name: str
    module: nn.Module
    dim: int
    alpha: float | None
    split_dims: tuple[int, ...] | None = None


def _make_pair(org: nn.Module, in_dim: int, out_dim: int, rank: int) -> tuple[nn.Module, nn.Module]:
    if isinstance(org, nn.Conv2d):
        down = nn.Conv2d(in_dim, rank, org.kernel_size, org.stride, org.padding, bias=False)
        return down, nn.Conv2d(rank, out_dim, (1, 1), (1, 1), bias=False)
    return nn.Linear(in_dim, rank, bias=False), nn.Linear(rank, out_dim, bias=False)


class LoRAModule(nn.Module):
    """Low-rank adapter for one Linear or Conv2d; replaces that instance's ``forward`` while applied."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | Tensor | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        split_dims: Sequence[int] | None = None,
    ):
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{lora_name}: LoRA needs a Linear or Conv2d, got {type(org_module).__name__}")
        is_conv = isinstance(org_module, nn.Conv2d)
        in_dim = org_module.in_channels if is_conv else org_module.in_features
        out_dim = org_module.out_channels if is_conv else org_module.out_features
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        self.split_dims = list(split_dims) if split_dims else None
        if self.split_dims is None:
            self.lora_down, self.lora_up = _make_pair(org_module, in_dim, out_dim, lora_dim)
        else:
            if is_conv or sum(self.split_dims) != out_dim:
                raise ValueError(f"{lora_name}: split_dims {self.split_dims} need a Linear with {out_dim} outputs")
            self.lora_down = nn.ModuleList(nn.Linear(in_dim, lora_dim, bias=False) for _ in self.split_dims)
            self.lora_up = nn.ModuleList(nn.Linear(lora_dim, d, bias=False) for d in self.split_dims)
        downs, ups = self._pairs()
        for down in downs:
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        for up in ups:
            nn.init.zeros_(up.weight)
        alpha = float(alpha) if alpha is not None else 0.0
        self.register_buffer("alpha", torch.tensor(alpha if alpha else float(lora_dim)))
        self.scale = lora_scale(alpha, lora_dim)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.enabled = True
        self.merged: float | None = None  # the multiplier merged into the base weight, if any
        self._org = [org_module]  # a list, so the base layer is not a submodule and stays out of state_dict
        self._patch = self._saved_forward = self._org_forward = None

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def applied(self) -> bool:
        return self._patch is not None

    def _pairs(self) -> tuple[list[nn.Module], list[nn.Module]]:
        if self.split_dims is None:
            return [self.lora_down], [self.lora_up]
        return list(self.lora_down), list(self.lora_up)

    def apply_to(self) -> None:
        """Route the base layer's forward through this module (keeping any forward override it already has)."""
        if self.applied:
            raise RuntimeError(f"{self.lora_name} is already applied")
        module = self.org_module
        self._saved_forward = module.__dict__.get("forward")
        self._org_forward = module.forward
        self._patch = self.forward
        module.forward = self._patch

    def remove(self) -> None:
        """Give the base layer back exactly the forward it had before ``apply_to``."""
        module = self.org_module
        if module.__dict__.get("forward") is not self._patch:
            raise RuntimeError(f"{self.lora_name}: the layer's forward was replaced after LoRA; remove in reverse")
        if self._saved_forward is None:
            del module.forward
        else:
            module.forward = self._saved_forward
        self._patch = self._saved_forward = self._org_forward = None

    def forward(self, x: Tensor) -> Tensor:
        out = self._org_forward(x)
        if self.merged is not None or not self.enabled:
            return out
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return out
        return out + self.lora_output(x).to(out.dtype)

    def lora_output(self, x: Tensor) -> Tensor:
        """The adapter's own contribution for input ``x`` (dropouts apply in training mode)."""
        downs, ups = self._pairs()
        x = x.to(downs[0].weight.dtype)
        hidden = [down(x) for down in downs]
        if self.dropout is not None and self.training:
            hidden = [F.dropout(h, p=self.dropout) for h in hidden]
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            hidden = [h * self._rank_mask(h) for h in hidden]
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank had shrunk
        outs = [up(h) for up, h in zip(ups, hidden)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        multiplier = self.multiplier
        if isinstance(multiplier, Tensor):  # one per sample (a dataset's network_multiplier), batch first
            multiplier = multiplier.to(out.device, out.dtype).view(-1, *([1] * (out.ndim - 1)))
        return out * (multiplier * scale)

    def _rank_mask(self, h: Tensor) -> Tensor:
        mask = torch.rand((h.size(0), self.lora_dim), device=h.device) > self.rank_dropout
        if h.ndim == 3:
            mask = mask.unsqueeze(1)
        elif h.ndim == 4:
            mask = mask[:, :, None, None]
        return mask.to(h.dtype)

    def saved_tensors(self, keep_vars: bool = False) -> dict[str, Tensor]:
        """This module's tensors under upstream's key suffixes (split parts fused)."""
        if self.split_dims is None:
            tensors = {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight}
            tensors = {k: v if keep_vars else v.detach() for k, v in tensors.items()}
            return {**tensors, "alpha": self.alpha if keep_vars else self.alpha.detach()}
        downs, ups = self._pairs()
        down, up, alpha = fuse_split_lora([d.weight.detach() for d in downs], [u.weight.detach() for u in ups],
                                          float(self.alpha))  # fmt: skip
        return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha, dtype=self.alpha.dtype)}

    def saved_shapes(self) -> dict[str, tuple[int, ...]]:
        downs, ups = self._pairs()
        if self.split_dims is None:
            return {"lora_down.weight": tuple(downs[0].weight.shape), "lora_up.weight": tuple(ups[0].weight.shape),
                    "alpha": ()}  # fmt: skip
        rank = self.lora_dim * len(downs)
        return {"lora_down.weight": (rank, downs[0].weight.shape[1]), "lora_up.weight": (sum(self.split_dims), rank),
                "alpha": ()}  # fmt: skip

    def delta_weight(self, multiplier: float | None = None) -> Tensor:
        """``multiplier * alpha / rank * up @ down`` in fp32, shaped like the base weight."""
        saved = self.saved_tensors()
        multiplier = self.multiplier if multiplier is None else multiplier
        scale = lora_scale(saved["alpha"], saved["lora_down.weight"].shape[0])
        return lora_delta(saved["lora_down.weight"], saved["lora_up.weight"]) * (multiplier * scale)

    @torch.no_grad()
    def merge_into_base(
        self,
        multiplier: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Add the delta to the base weight (stored in ``dtype`` if given); while applied, forward then adds nothing."""
        if self.merged is not None:
            raise RuntimeError(f"{self.lora_name} is already merged")
        multiplier = self.multiplier if multiplier is None else multiplier
        self._merge(multiplier, dtype, device)
        self.merged = multiplier

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what ``merge_into_base`` added (exact up to rounding in the base weight's dtype)."""
        if self.merged is None:
            raise RuntimeError(f"{self.lora_name} is not merged")
        self._merge(-self.merged, None, None)
        self.merged = None

    def _merge(self, multiplier: float, dtype: torch.dtype | None, device: torch.device | str | None) -> None:
        saved = self.saved_tensors()
        base = self.org_module.weight
        merged = merge_lora_weight(base.data, saved["lora_down.weight"], saved["lora_up.weight"], saved["alpha"],
                                   multiplier, device)  # fmt: skip
        if dtype is None or dtype == base.dtype:
            base.data.copy_(merged)
        else:
            base.data = merged.to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scale = lora_scale(self.alpha, self.lora_dim)


def dims_from_weights(weights_sd: Mapping[str, Tensor]) -> dict[str, tuple[int, float]]:
    """(rank, alpha) per LoRA name in a saved state dict; a missing alpha means alpha = rank."""
    dims = {}
    for key, value in weights_sd.items():
        name, _, suffix = key.partition(".")
        if suffix == "lora_down.weight":
            alpha = weights_sd.get(f"{name}.alpha")
            dims[name] = (value.shape[0], float(alpha) if alpha is not None else float(value.shape[0]))
    return dims


def load_lora_file(path: str | os.PathLike) -> dict[str, Tensor]:
    read_header(path, "LoRA file")
    return load_file(os.fspath(path))


def _names(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


class LoRANetwork(nn.Module):
    """LoRA modules keyed by their upstream names, for the denoiser (``unet_loras``) and the text encoders."""

    def __init__(
        self,
        unet_targets: Iterable[LoRATarget],
        text_encoder_targets: Iterable[LoRATarget],
        text_encoder_prefixes: Sequence[str],
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        self.multiplier = multiplier
        self.text_encoder_prefixes = tuple(text_encoder_prefixes)
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None

        def build(targets: Iterable[LoRATarget]) -> list[LoRAModule]:
            loras = []
            for t in targets:
                if t.name in self._modules:
                    raise ValueError(f"duplicated LoRA name: {t.name}")
                lora = LoRAModule(t.name, t.module, multiplier, t.dim, t.alpha, dropout, rank_dropout, module_dropout,
                                  t.split_dims)  # fmt: skip
                self.add_module(t.name, lora)
                loras.append(lora)
            return loras

        self.text_encoder_loras = build(text_encoder_targets)
        self.unet_loras = build(unet_targets)

    @property
    def loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def apply_to(
        self, text_encoders: Any = None, unet: Any = None, apply_text_encoder: bool = True, apply_unet: bool = True
    ) -> None:
        """Attach to the layers given at construction; parts not applied are dropped (and so not saved), as
        upstream. The model arguments are accepted for upstream's call signature."""
        for keep, loras in ((apply_text_encoder, self.text_encoder_loras), (apply_unet, self.unet_loras)):
            if not keep:
                for lora in loras:
                    delattr(self, lora.lora_name)
                loras.clear()
        logger.info(f"LoRA: {len(self.text_encoder_loras)} text encoder and {len(self.unet_loras)} denoiser modules")
        for lora in self.loras:
            lora.apply_to()

    def remove(self) -> None:
        """Detach every applied module, restoring the original forwards."""
        for lora in reversed(self.loras):
            if lora.applied:
                lora.remove()

    def set_multiplier(self, multiplier: float | Tensor) -> None:
        """One strength for every LoRA, or a [B] tensor: one per sample of the next batch."""
        self.multiplier = multiplier
        for lora in self.loras:
            lora.multiplier = multiplier

    def set_enabled(self, enabled: bool) -> None:
        for lora in self.loras:
            lora.enabled = enabled

    def is_mergeable(self) -> bool:
        return True

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Upstream's saved keys; split modules fused."""
        out = OrderedDict() if destination is None else destination
        for lora in self.loras:
            for suffix, tensor in lora.saved_tensors(keep_vars).items():
                out[f"{prefix}{lora.lora_name}.{suffix}"] = tensor
        return out

    def saved_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"{m.lora_name}.{s}": shape for m in self.loras for s, shape in m.saved_shapes().items()}

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        """Load upstream-keyed tensors (fused parts are split); UserError naming unknown, missing or misshapen keys
        (unknown and missing only when ``strict``)."""
        expected = self.saved_shapes()
        given = {k: (v.reshape(()) if k.endswith(".alpha") and v.numel() == 1 else v) for k, v in state_dict.items()}
        unexpected = sorted(set(given) - set(expected))
        missing = sorted(set(expected) - set(given))
        if strict and (unexpected or missing):
            parts = [f"keys not in this network: {_names(unexpected)}"] if unexpected else []
            parts += [f"missing keys: {_names(missing)}"] if missing else []
            raise UserError(f"LoRA weights do not match the network: {'; '.join(parts)}")
        wrong = [f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in given.items()
                 if k in expected and tuple(v.shape) != expected[k]]  # fmt: skip
        if wrong:
            raise UserError(f"LoRA weights have the wrong shape: {_names(wrong, 3)}; were they made for another model?")
        raw = {}
        for lora in self.loras:
            raw.update(self._raw_tensors(lora, given))
        super().load_state_dict(raw, strict=False, assign=assign)
        return _IncompatibleKeys(missing, unexpected)

    @staticmethod
    def _raw_tensors(lora: LoRAModule, given: Mapping[str, Tensor]) -> dict[str, Tensor]:
        name = lora.lora_name
        tensors = {s: given[f"{name}.{s}"] for s in SAVED_SUFFIXES if f"{name}.{s}" in given}
        if lora.split_dims is None or not tensors:
            return {f"{name}.{s}": v for s, v in tensors.items()}
        if len(tensors) < len(SAVED_SUFFIXES):
            raise UserError(f"LoRA weights for {name} need lora_down, lora_up and alpha together to split q/k/v")
        try:
            downs, ups, alpha = split_fused_lora(tensors["lora_down.weight"], tensors["lora_up.weight"],
                                                 float(tensors["alpha"]), lora.split_dims)  # fmt: skip
        except ValueError as e:
            raise UserError(f"LoRA weights for {name} cannot be split into q/k/v parts: {e}") from None
        raw = {f"{name}.alpha": torch.tensor(alpha)}
        for i, (down, up) in enumerate(zip(downs, ups)):
            raw[f"{name}.lora_down.{i}.weight"], raw[f"{name}.lora_up.{i}.weight"] = down, up
        return raw

    def load_weights(self, file: str | os.PathLike | Mapping[str, Tensor], strict: bool = True):
        """Load a saved LoRA (a path or a state dict) into this network."""
        weights = load_lora_file(file) if isinstance(file, (str, os.PathLike)) else file
        return self.load_state_dict(weights, strict=strict)

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """Write upstream's keys, with the sd-webui-additional-networks hashes when there is metadata."""
        state = {k: v.detach().to("cpu", dtype or v.dtype) for k, v in self.state_dict().items()}
        if metadata:
            metadata = dict(metadata)
            metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = additional_network_hashes(state, metadata)
        atomic_save_file(state, file, metadata or None)

    def merge_into_base(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        for lora in self.loras:
            lora.merge_into_base(dtype=dtype, device=device)

    def unmerge(self) -> None:
        for lora in self.loras:
            if lora.merged is not None:
                lora.unmerge()

    def merge_to(
        self,
        text_encoders: Any,
        unet: Any,
        weights_sd: Mapping[str, Tensor],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Load ``weights_sd`` and merge the modules it holds into their base weights (upstream's entry point)."""
        result = self.load_state_dict(weights_sd, strict=False)
        if result.unexpected_keys:
            raise UserError(f"LoRA weights hold keys not in this network: {_names(result.unexpected_keys)}")
        present = {k.partition(".")[0] for k in weights_sd}
        for lora in self.loras:
            if lora.lora_name in present:
                lora.merge_into_base(dtype=dtype, device=device)
        logger.info(f"merged {len(present)} LoRA modules into the base weights")

    def set_loraplus_lr_ratio(
        self, loraplus_lr_ratio: float | None, unet_ratio: float | None, text_encoder_ratio: float | None
    ) -> None:
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = unet_ratio
        self.loraplus_text_encoder_lr_ratio = text_encoder_ratio
        logger.info(f"LoRA+ denoiser lr ratio: {unet_ratio or loraplus_lr_ratio}")
        logger.info(f"LoRA+ text encoder lr ratio: {text_encoder_ratio or loraplus_lr_ratio}")

    def prepare_optimizer_params(
        self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None, default_lr: float | None
    ) -> tuple[list[dict], list[str]]:
        """Parameter groups and their names as upstream (``textencoder 1 ``, ``unet``, ``unet plus``): one
        learning rate per text encoder, LoRA+ puts ``lora_up`` weights in a group with ``lr * ratio``;
        groups whose lr is 0 or None are left out."""
        te_lrs = _expand_lrs(text_encoder_lr, default_lr, len(self.text_encoder_prefixes))
        self.requires_grad_(True)
        params, descriptions = [], []
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        for i, (prefix, lr) in enumerate(zip(self.text_encoder_prefixes, te_lrs)):
            loras = [lora for lora in self.text_encoder_loras if lora.lora_name.startswith(prefix + "_")]
            groups, kinds = _param_groups(loras, lr, te_ratio)
            params += groups
            descriptions += [f"textencoder {i + 1} " + (" " + k if k else "") for k in kinds]
        if self.unet_loras:
            lr = unet_lr if unet_lr is not None else default_lr
            groups, kinds = _param_groups(self.unet_loras, lr, self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio)
            params += groups
            descriptions += ["unet" + (" " + k if k else "") for k in kinds]
        if not params:
            raise UserError("nothing to train: every learning rate is 0 (--learning_rate, --unet_lr, "
                            "--text_encoder_lr); give a positive one")  # fmt: skip
        return params, descriptions

    prepare_optimizer_params_with_multiple_te_lrs = prepare_optimizer_params

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def get_trainable_params(self) -> Iterable[nn.Parameter]:
        return self.parameters()

    @torch.no_grad()
    def apply_max_norm_regularization(
        self, max_norm_value: float, device: torch.device | str
    ) -> tuple[int, float, float]:
        """Scale down modules whose delta norm exceeds ``max_norm_value`` (``--scale_weight_norms``); returns
        (modules scaled, mean norm, max norm) as upstream."""
        keys_scaled, norms = 0, []
        for lora in self.loras:
            norm = lora.delta_weight(multiplier=1.0).to(device).norm()
            clamped = norm.clamp(min=max_norm_value / 2)
            ratio = float(clamped.clamp(max=max_norm_value) / clamped)
            if ratio != 1:
                keys_scaled += 1
                for param in lora.parameters():
                    param.mul_(ratio**0.5)
            norms.append(float(norm) * ratio)
        return keys_scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)


def _expand_lrs(lrs: float | Sequence[float] | None, default: float | None, count: int) -> list[float | None]:
    if lrs is None or (not isinstance(lrs, (int, float)) and len(lrs) == 0):
        return [default] * count
    if isinstance(lrs, (int, float)):
        return [float(lrs)] * count
    if len(lrs) == 1:
        return [float(lrs[0])] * count
    if len(lrs) != count:
        raise UserError(f"--text_encoder_lr: give 1 or {count} values, got {len(lrs)}")
    return [float(lr) for lr in lrs]


def _param_groups(loras: Sequence[LoRAModule], lr: float | None, plus_ratio: float | None) -> tuple[list, list]:
    plain, plus = [], []
    for lora in loras:
        for name, param in lora.named_parameters():
            (plus if plus_ratio is not None and name.startswith("lora_up") else plain).append(param)
    groups, kinds = [], []
    for kind, params, group_lr in (("", plain, lr), ("plus", plus, None if lr is None else lr * (plus_ratio or 1))):
        if not params:
            continue
        if not group_lr:
            logger.info(f"learning rate {group_lr} for {len(params)} LoRA tensors: not trained")
            continue
        groups.append({"params": params, "lr": group_lr})
        kinds.append(kind)
    return groups, kinds


def parse_bool_arg(kwargs: Mapping[str, Any], key: str, default: bool = False) -> bool:
    """A network_arg given as True/False (any case) or 1/0."""
    value = kwargs.get(key)
    if value is None or isinstance(value, bool):
        return default if value is None else value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise UserError(f"--network_args {key}={value}: expected True or False")
    return text in ("true", "1")


def parse_number_arg(kwargs: Mapping[str, Any], key: str, kind: type = float) -> Any:
    """An optional int/float network_arg; None when absent."""
    value = kwargs.get(key)
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"--network_args {key}={value}: expected a {kind.__name__}") from None


def parse_int_list(kwargs: Mapping[str, Any], key: str, length: int) -> list[int] | None:
    """A list network_arg like ``[4,2,2,2,4]`` (brackets optional) of exactly ``length`` integers."""
    value = kwargs.get(key)
    if value is None:
        return None
    text = str(value).strip() if not isinstance(value, (list, tuple)) else ",".join(map(str, value))
    text = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        numbers = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--network_args {key}={value}: expected {length} comma-separated integers") from None
    if len(numbers) != length:
        raise UserError(f"--network_args {key}={value}: expected {length} numbers, got {len(numbers)}")
    return numbers


def parse_block_selection(value: str, total: int, key: str) -> list[bool]:
    """``all``, ``none`` or indices and ranges like ``0,1,4-5,7`` (0-based, inclusive) -> one flag per block."""
    text = str(value).strip()
    if text == "all":
        return [True] * total
    if text in ("none", ""):
        return [False] * total
    selected = [False] * total
    for part in text.split(","):
        try:
            start, _, end = part.partition("-")
            first, last = int(start), int(end) if end else int(start)
        except ValueError:
            raise UserError(f"--network_args {key}={value}: {part!r} is not an index or a range like 4-5") from None
        if not 0 <= first <= last < total:
            raise UserError(f"--network_args {key}={value}: {part!r} is outside 0-{total - 1} (or reversed)")
        selected[first : last + 1] = [True] * (last - first + 1)
    return selected


def parse_regex_dims(kwargs: Mapping[str, Any], key: str) -> dict[str, int] | None:
    """``regex=rank,regex=rank`` (upstream's network_reg_dims), checked to compile."""
    value = kwargs.get(key)
    if value is None:
        return None
    dims = {}
    for pair in str(value).split(","):
        if not pair.strip():
            continue
        pattern, sep, rank = (s.strip() for s in pair.partition("="))
        try:
            if not sep:
                raise ValueError(pair)
            re.compile(pattern)
            dims[pattern] = int(rank)
        except (re.error, ValueError):
            raise UserError(f"--network_args {key}: {pair.strip()!r} is not regex=rank") from None
    return dims
