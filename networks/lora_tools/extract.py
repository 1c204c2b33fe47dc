"""A LoRA from the difference between an original and a tuned checkpoint: per target layer, the rank-``dim`` SVD
of ``W_tuned - W_org`` (upstream's flux_extract_lora algorithm, for every layout and both families).

``lora_up = U * S`` and ``lora_down = Vh`` (first ``rank`` singular triplets, rank = min(dim, out, in)), alpha =
rank, so ``up @ down`` is the best rank-``dim`` approximation of the difference; Conv2d weights are flattened to
(out, in * kh * kw) and the factors reshaped to a kh x kw down and a 1x1 up. Both factors are clamped to the
``clamp_quantile`` quantile of their absolute values (upstream takes the quantile of the signed values, which at
1.0 still clips the negative side); 1.0 clamps nothing. Layers whose weights are identical are left out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from library.errors import UserError
from library.models.layouts import CheckpointFile, ModelPart
from networks.lora_tools.families import ToolFamily
from networks.lora_tools.targets import lora_weight_keys, part_title

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractSettings:
    """--dim, --conv_dim, --clamp_quantile, --device and --save_precision, checked."""

    dim: int = 4
    conv_dim: int | None = None  # rank of Conv2d layers with a kernel larger than 1x1 (None: dim)
    clamp_quantile: float = 0.99
    device: str = "cpu"
    save_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise UserError(f"--dim {self.dim}: the LoRA rank must be at least 1")
        if self.conv_dim is not None and self.conv_dim < 1:
            raise UserError(f"--conv_dim {self.conv_dim}: the rank must be at least 1")
        if not 0 < self.clamp_quantile <= 1:
            raise UserError(f"--clamp_quantile {self.clamp_quantile}: give a value in (0, 1]; 1 clamps nothing")

    def rank_for(self, weight: Tensor) -> int:
        spatial = weight.ndim == 4 and tuple(weight.shape[2:]) != (1, 1)
        return (self.conv_dim or self.dim) if spatial else self.dim


@dataclass(frozen=True)
class PartPair:
    """One model in the original and in the tuned files (e.g. the denoiser, or CLIP-L from --clip_l_org/_tuned)."""

    org_file: CheckpointFile
    org: ModelPart
    tuned_file: CheckpointFile
    tuned: ModelPart


def abs_quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values.abs(), q)`` (linear interpolation) for tensors of any size."""
    flat = values.abs().flatten().float()
    position = q * (flat.numel() - 1)
    low, frac = int(position), position - int(position)
    lower = flat.kthvalue(low + 1).values
    if frac == 0:
        return lower
    return lower + frac * (flat.kthvalue(low + 2).values - lower)


def svd_lora(delta: Tensor, rank: int, clamp_quantile: float) -> tuple[Tensor, Tensor]:
    """(down, up) in fp32 with ``up @ down`` the best rank-``rank`` approximation of ``delta`` (Linear or Conv2d)."""
    out_dim = delta.shape[0]
    matrix = delta.float().reshape(out_dim, -1)
    rank = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if clamp_quantile < 1:
        limit = abs_quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    if delta.ndim == 4:
        return down.reshape(rank, *delta.shape[1:]), up.reshape(out_dim, rank, 1, 1)
    return down, up


def _differences(family: ToolFamily, pair: PartPair, keys: dict[str, str],
                 device: str) -> Iterator[tuple[str, Tensor | None]]:  # fmt: skip
    """(LoRA name, tuned - original in fp32 on ``device``, or None where they are equal) per target layer."""
    title = part_title(family, pair.org.name)
    for name, key in keys.items():
        org_recipe, tuned_recipe = pair.org.recipes.get(key), pair.tuned.recipes.get(key)
        if org_recipe is None or tuned_recipe is None:
            which = pair.org_file if org_recipe is None else pair.tuned_file
            raise UserError(f"{which.path}: the {title} has no {key}; is it complete?")
        org_shape, tuned_shape = org_recipe.shape(pair.org_file.source), tuned_recipe.shape(pair.tuned_file.source)
        if org_shape != tuned_shape:
            raise UserError(f"{pair.tuned_file.path}: {title} {key} is {tuple(tuned_shape)}, but {tuple(org_shape)} "
                            f"in {pair.org_file.path}; the tuned model must have the original's architecture")  # fmt: skip
        tuned = pair.tuned_file.read(tuned_recipe, device).float()
        delta = tuned - pair.org_file.read(org_recipe, device).float()
        yield name, (delta if delta.any() else None)


def extract_lora(
    family: ToolFamily, pairs: list[PartPair], settings: ExtractSettings
) -> tuple[dict[str, Tensor], list[int]]:
    """The LoRA's tensors (upstream's keys, in ``settings.save_dtype``, on the CPU) and the rank of each module."""
    tensors, ranks = {}, []
    for pair in pairs:
        title = part_title(family, pair.org.name)
        keys = lora_weight_keys(family, pair.org, targets_only=True)
        count, extracted = len(keys), 0
        for name, delta in tqdm(_differences(family, pair, keys, settings.device), total=count,
                                desc=f"extracting {title}", unit="layer", leave=False):  # fmt: skip
            if delta is None:
                continue
            down, up = svd_lora(delta, settings.rank_for(delta), settings.clamp_quantile)
            rank = down.shape[0]
            tensors[f"{name}.lora_down.weight"] = down.to("cpu", settings.save_dtype).contiguous()
            tensors[f"{name}.lora_up.weight"] = up.to("cpu", settings.save_dtype).contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=settings.save_dtype)
            ranks.append(rank)
            extracted += 1
        logger.info(f"{title}: {extracted} of {count} layers differ and were extracted "
                    f"({pair.org.description} -> {pair.tuned.description})")  # fmt: skip
    if not ranks:
        raise UserError("the original and tuned models are identical in every LoRA target layer: nothing to extract")
    return tensors, ranks
