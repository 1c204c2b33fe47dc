"""Merging LoRAs: into checkpoints, tensor by tensor, or into one LoRA.

Into a checkpoint: every module of every LoRA is matched to the weight it changes through the part's state-dict
key (library/models/layouts.py), so any layout works: BFL or diffusers FLUX.1, SAI or bare SD3, prefixed or not,
text encoders alone or bundled. A weight the file stores in parts (diffusers' to_q/to_k/to_v) gets the matching
rows of ``lora_up``. Each file tensor is read, merged with ``networks.lora.merge_lora_weight`` in the merge dtype
on the working device, cast to the file's own dtype (fp8 included) unless --save_precision says otherwise, and
streamed to the output before the next is read: RAM holds about one tensor, never the checkpoint.

Into one LoRA: the modules are concatenated along the rank, each part scaled by ``ratio * alpha / rank`` (its
square root on each factor, the sign on up) and alpha set to the total rank, so the result's delta is exactly
the sum of ``ratio_i * delta_i``, whatever the ranks and alphas.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from library.errors import UserError
from library.io.safetensors_stream import PendingTensor
from library.models.layouts import DENOISER, CheckpointFile, ModelPart, stored_rows
from networks.lora import merge_lora_weight
from networks.lora_tools.families import ToolFamily
from networks.lora_tools.lora_files import LoRAFile, LoRAWeights
from networks.lora_tools.targets import lora_weight_keys, part_title

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 22  # rows merged at a time: about this many elements


@dataclass(frozen=True)
class Update:
    """One LoRA module to add to one stored tensor (``weights.up`` holds that tensor's rows only)."""

    weights: LoRAWeights
    ratio: float


@dataclass
class MergeTarget:
    """A checkpoint to merge into, where it is saved, and what each of its tensors gets."""

    file: CheckpointFile
    save_to: Path
    updates: dict[str, list[Update]] = field(default_factory=dict)  # file key -> updates
    merged_modules: int = 0


@dataclass(frozen=True)
class Devices:
    """--loading_device (where file tensors are read to) and --working_device (where they are merged)."""

    loading: str = "cpu"
    working: str = "cpu"


def _places(family: ToolFamily, targets: Sequence[MergeTarget]) -> dict[str, list[tuple[MergeTarget, ModelPart, str]]]:
    places: dict[str, list[tuple[MergeTarget, ModelPart, str]]] = {}
    for target in targets:
        for part in target.file.parts.values():
            for name, key in lora_weight_keys(family, part, targets_only=False).items():
                places.setdefault(name, []).append((target, part, key))
    return places


def _add_updates(target: MergeTarget, part: ModelPart, key: str, name: str, weights: LoRAWeights,
                 lora: LoRAFile, family: ToolFamily) -> None:  # fmt: skip
    source = target.file.source
    recipe = part.recipes[key]
    shape = recipe.shape(source)
    if tuple(weights.weight_shape) != tuple(shape):
        raise UserError(f"{lora.label}: {name} changes a {tuple(weights.weight_shape)} weight, but "
                        f"{part_title(family, part.name)} {key} in {target.file.path} is {tuple(shape)}; was the LoRA "
                        "made for another model size?")  # fmt: skip
    for index, stored in enumerate(recipe.sources):
        rows = LoRAWeights(weights.down, stored_rows(recipe, index, weights.up, source), weights.alpha)
        target.updates.setdefault(stored, []).append(Update(rows, lora.ratio))
    target.merged_modules += 1


def _prefix(name: str) -> str:
    return "_".join(name.split("_")[:2])


def plan_merge(family: ToolFamily, targets: Sequence[MergeTarget], loras: Sequence[LoRAFile]) -> None:
    """Match every LoRA module to the stored tensors it changes. A module whose model was not given (a CLIP-L part
    without --clip_l) is left out with a warning; one that fits none of the given models is a UserError."""
    places = _places(family, targets)
    given = {part.name for target in targets for part in target.file.parts.values()}
    for lora in loras:
        unknown, left_out, merged = [], {}, 0
        for name, weights in lora.modules.items():
            found = places.get(name)
            if found:
                for target, part, key in found:
                    _add_updates(target, part, key, name, weights, lora, family)
                merged += 1
                continue
            prefix = _prefix(name)
            owner = DENOISER if prefix == family.arch.unet_prefix else family.encoder_of_prefix(prefix)
            if owner is not None and owner not in given:
                left_out[owner] = left_out.get(owner, 0) + 1
            else:
                unknown.append(name)
        if unknown:
            models = ", ".join(part_title(family, name) for name in sorted(given))
            raise UserError(f"{lora.label}: {len(unknown)} of its modules are in none of the given models ({models}): "
                            f"{', '.join(sorted(unknown)[:4])}{family.other_family_hint(unknown)}")  # fmt: skip
        for owner, count in left_out.items():
            option = family.model_option if owner == DENOISER else f"--{owner}"
            logger.warning(f"{lora.label}: {count} {part_title(family, owner)} modules left out; give {option} to "
                           "merge them")  # fmt: skip
        if not merged:
            raise UserError(f"{lora.label}: none of its modules belongs to the given models; nothing to merge")
        logger.info(f"{lora.label} x {lora.ratio}: {merged} modules to merge")


def _merged(target: MergeTarget, key: str, merge_dtype: torch.dtype, out_dtype: torch.dtype,
            devices: Devices) -> Tensor:  # fmt: skip
    """One stored tensor with its updates merged, a block of rows at a time (so merging FLUX's largest layer
    needs tens of MB on top of the tensor, not three fp32 copies of it)."""
    tensor = target.file.read_key(key, devices.loading)
    updates = target.updates.get(key)
    if not updates:
        return tensor.to("cpu", out_dtype)
    out = torch.empty(tensor.shape, dtype=out_dtype)
    step = max(1, CHUNK_ELEMENTS // max(1, tensor[0].numel()))
    for start in range(0, tensor.shape[0], step):
        rows = slice(start, start + step)
        weight = tensor[rows].to(devices.working, merge_dtype)
        for update in updates:
            w = update.weights
            weight = merge_lora_weight(weight, w.down, w.up[rows], w.alpha, update.ratio)
        out[rows] = weight.to("cpu", out_dtype)
    return out


def merged_items(target: MergeTarget, merge_dtype: torch.dtype, save_dtype: torch.dtype | None,
                 devices: Devices) -> dict[str, PendingTensor]:  # fmt: skip
    """Every tensor of the file, in file order, made (read, merged, cast) only when it is written. Float tensors
    are saved in ``save_dtype``, or in their own dtype when it is None."""
    items = {}
    for key in target.file.keys():
        info = target.file.source.info(key)
        own = info.torch_dtype
        out_dtype = save_dtype if save_dtype is not None and own.is_floating_point else own
        items[key] = PendingTensor(info.shape, out_dtype, partial(_merged, target, key, merge_dtype, out_dtype,
                                                                  devices))  # fmt: skip
    return items


def _check_shapes(name: str, parts: Sequence[tuple[LoRAWeights, LoRAFile]]) -> None:
    if len({(tuple(w.weight_shape), tuple(w.down.shape[2:])) for w, _ in parts}) > 1:
        found = "; ".join(f"{lora.path.name}: {tuple(w.weight_shape)}" for w, lora in parts)
        raise UserError(f"--models: {name} changes weights of different shapes ({found}); were the LoRAs made for "
                        "different models?")  # fmt: skip


def concat_loras(
    loras: Sequence[LoRAFile], merge_dtype: torch.dtype, shuffle: bool, generator: torch.Generator | None = None
) -> tuple[dict[str, Tensor], list[int]]:
    """One LoRA whose delta is exactly ``sum(ratio_i * delta_i)`` per module (see the module docstring), and the
    rank of each module. ``shuffle`` permutes each module's rank dimension (upstream's --shuffle): same delta."""
    names = list(dict.fromkeys(name for lora in loras for name in lora.modules))
    tensors, ranks = {}, []
    for name in names:
        parts = [(lora.modules[name], lora) for lora in loras if name in lora.modules]
        _check_shapes(name, parts)
        downs, ups = [], []
        for weights, lora in parts:
            scale = lora.ratio * weights.alpha / weights.rank
            if scale == 0:
                continue
            root = math.sqrt(abs(scale))
            downs.append(weights.down.to(merge_dtype) * root)
            ups.append(weights.up.to(merge_dtype) * math.copysign(root, scale))
        if not downs:
            continue
        down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
        if shuffle:
            order = torch.randperm(down.shape[0], generator=generator)
            down, up = down[order], up[:, order]
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        ranks.append(down.shape[0])
    if not tensors:
        raise UserError("--ratios: every ratio is 0; nothing to merge")
    return tensors, ranks
