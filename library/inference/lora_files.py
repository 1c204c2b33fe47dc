"""``--lora_weights path;multiplier`` and ``--merge_lora_weights`` for the inference scripts: build each LoRA (or OFT)
from its file with the family's ``create_network_from_weights`` (``networks.lora_flux``, ``networks.lora_sd3``; for
FLUX.1 ``networks.oft_flux`` when the file's keys are OFT's), then attach it to the models or merge it into their
weights, text-encoder parts included."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from library.errors import UserError
from library.inference.interactive import InlineOptionError
from library.io.safetensors_file import read_header
from networks.adapter import network_module_for_keys

if TYPE_CHECKING:
    from networks.adapter import AdapterNetwork

logger = logging.getLogger(__name__)

# upstream's create_network_from_weights(multiplier, file, vae, text_encoders, model, weights_sd, for_inference)
NetworkFromWeights = Callable[..., "tuple[AdapterNetwork, dict]"]


def network_from_weights_for(module: str) -> NetworkFromWeights:
    """A ``create_network_from_weights`` that reads each file with the network module its keys call for: ``module``
    (the family's LoRA module) or its OFT counterpart (``oft_unet_...`` keys: networks.oft_flux)."""

    def create(multiplier: float, file: str, *args: Any, **kwargs: Any):
        chosen = network_module_for_keys(read_header(file, "--lora_weights").tensors, module, f"--lora_weights {file}")
        return importlib.import_module(chosen).create_network_from_weights(multiplier, file, *args, **kwargs)

    return create


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``"file.safetensors;0.8"`` -> (path, 0.8); no multiplier means 1.0."""
    path, sep, multiplier = spec.rpartition(";") if ";" in spec else (spec, "", "1.0")
    try:
        return path, float(multiplier)
    except ValueError:
        raise UserError(f"--lora_weights {spec!r}: multiplier {multiplier!r} is not a number (use path;0.8)") from None


def apply_lora_files(
    specs: Sequence[str],
    network_from_weights: NetworkFromWeights,
    model: nn.Module,
    text_encoders: list[Any],
    merge: bool,
    device: torch.device | str,
) -> list[AdapterNetwork]:
    """Attach (or, with ``merge``, merge) each ``path;multiplier`` LoRA and return the networks in order; a missing
    file or one that does not fit the models is a UserError naming it. Attached LoRA weights live on the compute
    ``device`` (they are small), so they work when the models are offloaded to the CPU between uses."""
    networks = []
    for spec in specs:
        path, multiplier = parse_lora_spec(spec)
        if not Path(path).is_file():
            raise UserError(f"--lora_weights {path}: file not found")
        network, weights = network_from_weights(multiplier, path, None, text_encoders, model, for_inference=True)
        if merge:
            network.merge_to(text_encoders, model, weights)
        else:
            network.apply_to(text_encoders, model)
            network.load_weights(weights, strict=True)
            network.to(device)
        done = "merged" if merge else "applied"
        logger.info("%s %s x %s: %d modules %s", network.KIND, path, multiplier, len(network.adapters), done)
        networks.append(network)
    return networks


def set_lora_multipliers(networks: Sequence[AdapterNetwork], multipliers: Sequence[float], merged: bool) -> None:
    """The interactive ``--m 0.8,1.0``: one strength per LoRA, in ``--lora_weights`` order (none given: unchanged)."""
    if not multipliers:
        return
    if merged:
        raise InlineOptionError("--m: the LoRAs are merged into the weights (--merge_lora_weights); not adjustable")
    if len(multipliers) != len(networks):
        raise InlineOptionError(f"--m: {len(multipliers)} multipliers for {len(networks)} LoRA(s) in --lora_weights")
    for network, multiplier in zip(networks, multipliers):
        network.set_multiplier(multiplier)
