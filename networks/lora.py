"""The one LoRA implementation every architecture shares: the module, the network holding them, merging.

A ``LoRAModule`` adds ``multiplier * alpha / rank * up(down(x))`` to a Linear or Conv2d; attaching, saving,
loading, optimizer groups and merging are the adapter core LoRA shares with OFT (networks/adapter.py). Which
layers get one, and with which rank, is networks/lora_targets.py, driven by a short file per architecture
(``networks/lora_flux.py``, ``networks/lora_sd3.py``). Saved keys are upstream's: ``<name>.lora_down.weight``,
``<name>.lora_up.weight``, ``<name>.alpha``. A module split into parts (``split_qkv``) is saved fused: stacked
downs, block-diagonal ups, alpha times the number of parts, so that any loader treating the file as one plain
LoRA applies exactly the trained delta. LoRA's own training extras as upstream: LoRA+ ratios (for ``lora_up``),
GGPO weight perturbation, max-norm regularization.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.errors import UserError
from networks.adapter import AdapterModule, AdapterNetwork, load_adapter_file

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
class GGPO:
    """LoRA-GGPO (``ggpo_beta``/``ggpo_sigma`` network_args): in training, each adapted Linear's output gets
    ``x @ N.T`` with N ~ normal(0, s_i / sqrt(out)) per output row i, where s = sigma * |W + dW|_row +
    beta * |grad dW|_row^2. The norms come from ``update_norms``/``update_grad_norms``, called by the loop after
    each backward; before the first call there is no perturbation."""

    beta: float
    sigma: float


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


class LoRAModule(AdapterModule):
    """Low-rank adapter for one Linear or Conv2d; wraps that instance's ``forward`` while applied."""

    PLUS_PARAMS = ("lora_up",)

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
        ggpo: GGPO | None = None,
    ):
        super().__init__(lora_name, org_module, multiplier, lora_dim)
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{lora_name}: LoRA needs a Linear or Conv2d, got {type(org_module).__name__}")
        is_conv = isinstance(org_module, nn.Conv2d)
        in_dim = org_module.in_channels if is_conv else org_module.in_features
        out_dim = org_module.out_channels if is_conv else org_module.out_features
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
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.ggpo = ggpo if isinstance(org_module, nn.Linear) else None
        self.org_weight_norm: Tensor | None = None  # GGPO: mean row norm of the base weight, computed once
        self.weight_norms = self.combined_weight_norms = self.grad_norms = None  # GGPO: [out, 1] row norms

    @property
    def lora_name(self) -> str:
        return self.name

    @property
    def lora_dim(self) -> int:
        return self.dim

    def _pairs(self) -> tuple[list[nn.Module], list[nn.Module]]:
        if self.split_dims is None:
            return [self.lora_down], [self.lora_up]
        return list(self.lora_down), list(self.lora_up)

    def forward(self, x: Tensor, org_forward: Callable[[Tensor], Tensor]) -> Tensor:
        """``org_forward(x)`` (what the base layer computes) plus this adapter's output."""
        out = org_forward(x)
        if self.merged is not None or not self.enabled:
            return out
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return out
        out = out + self.lora_output(x).to(out.dtype)
        if self.training and self.grad_norms is not None and self.combined_weight_norms is not None:
            out = out + self.ggpo_perturbation(x).to(out.dtype)
        return out

    @torch.no_grad()
    def ggpo_perturbation(self, x: Tensor) -> Tensor:
        """``x @ N.T`` with N drawn per call, rows scaled by sigma * combined norm + beta * grad norm^2."""
        weight = self.org_module.weight
        scale = self.ggpo.sigma * self.combined_weight_norms + self.ggpo.beta * self.grad_norms**2
        noise = torch.randn(weight.shape, device=x.device, dtype=x.dtype)
        noise *= (scale / math.sqrt(weight.shape[0])).to(x.device, x.dtype)
        return F.linear(x, noise)

    @torch.no_grad()
    def update_norms(self) -> None:
        """GGPO: row norms of the delta and of base + delta (base from its mean row norm), for the next forward."""
        if self.ggpo is None or not self.training:
            return
        delta = self.delta_weight(multiplier=1.0)
        if self.org_weight_norm is None:
            self.org_weight_norm = _mean_row_norm(self.org_module.weight).to(delta.device)
        self.weight_norms = delta.norm(dim=1, keepdim=True)
        self.combined_weight_norms = torch.sqrt(self.org_weight_norm**2 + delta.pow(2).sum(dim=1, keepdim=True))

    @torch.no_grad()
    def update_grad_norms(self) -> None:
        """GGPO: row norms of the delta's gradient, ``scale * (up @ grad down + grad up @ down)``."""
        if self.ggpo is None or not self.training:
            return
        rows = []
        for down, up in zip(*self._pairs()):
            if down.weight.grad is None or up.weight.grad is None:
                return
            rows.append(up.weight.float() @ down.weight.grad.float() + up.weight.grad.float() @ down.weight.float())
        self.grad_norms = (torch.cat(rows) * self.scale).norm(dim=1, keepdim=True)

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

    def merged_weight(self, weight: Tensor, multiplier: float, device: torch.device | str | None) -> Tensor:
        saved = self.saved_tensors()
        return merge_lora_weight(weight, saved["lora_down.weight"], saved["lora_up.weight"], saved["alpha"],
                                 multiplier, device)  # fmt: skip

    def unmerged_weight(self, weight: Tensor, multiplier: float) -> Tensor:
        return self.merged_weight(weight, -multiplier, None)

    def tensors_from_saved(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A plain pair as it is (no alpha: alpha = rank, as every loader reads such a file); a fused pair split
        into this module's parts (UserError when it does not split)."""
        name, tensors = self.name, dict(tensors)
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            raise UserError(f"LoRA weights for {name}: lora_down.weight and lora_up.weight must come together")
        if "alpha" not in tensors:
            tensors["alpha"] = torch.tensor(float(tensors["lora_down.weight"].shape[0]))
        if self.split_dims is None:
            return tensors
        try:
            downs, ups, alpha = split_fused_lora(tensors["lora_down.weight"], tensors["lora_up.weight"],
                                                 float(tensors["alpha"]), self.split_dims)  # fmt: skip
        except ValueError as e:
            raise UserError(f"LoRA weights for {name} cannot be split into q/k/v parts: {e}") from None
        raw = {"alpha": torch.tensor(alpha)}
        for i, (down, up) in enumerate(zip(downs, ups)):
            raw[f"lora_down.{i}.weight"], raw[f"lora_up.{i}.weight"] = down, up
        return raw

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scale = lora_scale(self.alpha, self.lora_dim)


def _mean_row_norm(weight: Tensor, chunk: int = 1024) -> Tensor:
    """Mean L2 norm of a weight's rows in fp32, a chunk of rows at a time (fp8 weights included)."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    total = sum(rows[i : i + chunk].float().norm(dim=1).sum() for i in range(0, rows.shape[0], chunk))
    return total / rows.shape[0]


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
    return load_adapter_file(path, "LoRA file")


class LoRANetwork(AdapterNetwork):
    """LoRA modules keyed by their upstream names, for the denoiser (``unet_loras``) and the text encoders; LoRA's
    own training extras: LoRA+ ratios, GGPO and max-norm regularization."""

    KIND = "LoRA"
    DIM_NAME = "rank"
    FOREIGN_HINT = "a DoRA/LyCORIS file?"

    def __init__(
        self,
        unet_targets: Iterable[LoRATarget],
        text_encoder_targets: Iterable[LoRATarget],
        text_encoder_prefixes: Sequence[str],
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        ggpo: GGPO | None = None,
        reg_lrs: Mapping[str, float] | None = None,
    ):
        super().__init__(text_encoder_prefixes, multiplier, reg_lrs)
        self._ggpo_started = False

        def build(targets: Iterable[LoRATarget]) -> list[LoRAModule]:
            return [LoRAModule(t.name, t.module, multiplier, t.dim, t.alpha, dropout, rank_dropout, module_dropout,
                               t.split_dims, ggpo) for t in targets]  # fmt: skip

        self.add_adapters(build(text_encoder_targets), text_encoder=True)
        self.add_adapters(build(unet_targets), text_encoder=False)

    def set_loraplus_lr_ratio(
        self, loraplus_lr_ratio: float | None, unet_ratio: float | None, text_encoder_ratio: float | None
    ) -> None:
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = unet_ratio
        self.loraplus_text_encoder_lr_ratio = text_encoder_ratio
        logger.info(f"LoRA+ denoiser lr ratio: {unet_ratio or loraplus_lr_ratio}")
        logger.info(f"LoRA+ text encoder lr ratio: {text_encoder_ratio or loraplus_lr_ratio}")

    def update_grad_norms(self) -> None:
        """GGPO: after backward (and gradient clipping), before the optimizer step, when gradients are synced."""
        for lora in self.loras:
            lora.update_grad_norms()

    def update_norms(self) -> None:
        """GGPO: right after ``update_grad_norms``, before the optimizer step."""
        for lora in self.loras:
            lora.update_norms()
        if not self._ggpo_started:
            ready = [m for m in self.loras if m.grad_norms is not None and m.combined_weight_norms is not None]
            if ready:
                self._ggpo_started = True
                logger.info(f"GGPO: norms of {len(ready)} modules updated; their weights are perturbed from the "
                            f"next step on (beta {ready[0].ggpo.beta}, sigma {ready[0].ggpo.sigma})")  # fmt: skip

    def weight_norms(self) -> Tensor | None:
        """Per-module mean row norm of the delta (GGPO modules, once updated), as upstream logs them."""
        return _stacked_means(lora.weight_norms for lora in self.loras)

    def grad_norms(self) -> Tensor | None:
        return _stacked_means(lora.grad_norms for lora in self.loras)

    def combined_weight_norms(self) -> Tensor | None:
        return _stacked_means(lora.combined_weight_norms for lora in self.loras)

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


def _stacked_means(norms: Iterable[Tensor | None]) -> Tensor | None:
    means = [n.mean(dim=0) for n in norms if n is not None]
    return torch.stack(means) if means else None
