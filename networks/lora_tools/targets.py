"""LoRA module names <-> state-dict weight keys of one model part, derived from the architecture's target list and
naming helpers (networks/lora_targets.py), so the tools name modules exactly as training does."""

from __future__ import annotations

from torch import nn

from library.models.layouts import DENOISER, ENCODER_TITLES, ModelPart
from networks.lora_targets import lora_name, text_encoder_layers, unet_candidates
from networks.lora_tools.families import ToolFamily


def _weight_keys(model: nn.Module, named_layers: list[tuple[str, nn.Module]]) -> dict[str, str]:
    paths = {id(module): path for path, module in model.named_modules()}
    return {name: paths[id(layer)] + ".weight" for name, layer in named_layers}


def lora_weight_keys(family: ToolFamily, part: ModelPart, targets_only: bool) -> dict[str, str]:
    """LoRA name -> the state-dict key of the weight it changes, for every layer of ``part`` a LoRA may hold.

    Denoiser: the training targets (blocks and the extra layers) with ``targets_only``, else every Linear/Conv2d
    (LoRAs from other trainers may hold more). Text encoders: the layers training targets (T5 included)."""
    model = part.build()
    if part.name == DENOISER:
        if targets_only:
            layers = [(c.path, c.layer) for c in unet_candidates(family.arch, model, None, True)]
        else:
            layers = [(p, m) for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        return {lora_name(family.arch.unet_prefix, path): path + ".weight" for path, _ in layers}
    encoders: list[nn.Module | None] = [None] * len(family.encoders)
    encoders[family.encoders.index(part.name)] = model
    return _weight_keys(model, list(text_encoder_layers(family.arch, encoders, train_t5xxl=True)))


def part_title(family: ToolFamily, name: str) -> str:
    """The part's name in messages: "FLUX.1 denoiser", "CLIP-L"..."""
    return f"{family.title} denoiser" if name == DENOISER else ENCODER_TITLES[name]
