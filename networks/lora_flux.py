"""LoRA for FLUX.1 and its text encoders: ``--network_module networks.lora_flux``.

Only targets, ranks and names live here; modules, saving, loading and merging are networks/lora.py. Names are
upstream's (kohya-ss/sd-scripts networks/lora_flux.py), which ComfyUI and diffusers read: ``lora_unet_`` + the
BFL module path with dots as underscores, ``lora_te1_`` + CLIP-L's ``text_model.encoder.layers...`` path and
``lora_te3_`` + T5-XXL's ``encoder.block...`` path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from library.errors import UserError
from networks.lora import (
    LoRAModule,
    LoRANetwork,
    LoRATarget,
    dims_from_weights,
    load_lora_file,
    parse_block_selection,
    parse_bool_arg,
    parse_int_list,
    parse_number_arg,
    parse_regex_dims,
)

logger = logging.getLogger(__name__)

__all__ = ["LoRAModule", "LoRANetwork", "create_network", "create_network_from_weights"]

LORA_PREFIX_FLUX = "lora_unet"
LORA_PREFIX_TEXT_ENCODER_CLIP = "lora_te1"
LORA_PREFIX_TEXT_ENCODER_T5 = "lora_te3"
TEXT_ENCODER_PREFIXES = (LORA_PREFIX_TEXT_ENCODER_CLIP, LORA_PREFIX_TEXT_ENCODER_T5)
FLUX_TARGET_BLOCKS = {"double": ("DoubleStreamBlock",), "single": ("SingleStreamBlock",)}
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "T5Attention", "T5DenseGatedActDense")
# rank network_args per layer kind, and the name fragments that pick the layers (first match wins, as upstream)
TYPE_DIMS = {
    "img_attn_dim": ("img_attn",),
    "txt_attn_dim": ("txt_attn",),
    "img_mlp_dim": ("img_mlp",),
    "txt_mlp_dim": ("txt_mlp",),
    "img_mod_dim": ("img_mod",),
    "txt_mod_dim": ("txt_mod",),
    "single_dim": ("single_blocks", "linear"),
    "single_mod_dim": ("modulation",),
}
IN_LAYERS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")  # the order of in_dims
_OTHER_ARGS = {"in_dims", "train_double_block_indices", "train_single_block_indices", "train_blocks", "split_qkv",
               "train_t5xxl", "verbose", "rank_dropout", "module_dropout", "network_reg_dims", "loraplus_lr_ratio",
               "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "conv_dim", "conv_alpha"}  # fmt: skip
KNOWN_ARGS = frozenset(TYPE_DIMS) | _OTHER_ARGS
UNSUPPORTED_ARGS = ("ggpo_beta", "ggpo_sigma", "network_reg_lrs")


@dataclass(frozen=True)
class FluxLoRAOptions:
    """``--network_dim/--network_alpha/--network_args`` for FLUX.1 LoRA, parsed and checked."""

    dim: int = 4
    alpha: float = 1.0
    type_dims: Mapping[str, int] | None = None
    in_dims: Sequence[int] | None = None
    double_blocks: Sequence[bool] | None = None
    single_blocks: Sequence[bool] | None = None
    train_blocks: str = "all"
    split_qkv: bool = False
    train_t5xxl: bool = False
    reg_dims: Mapping[str, int] | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    verbose: bool = False

    @classmethod
    def from_network_args(
        cls, dim: int | None, alpha: float | None, kwargs: Mapping[str, Any], num_double: int, num_single: int
    ) -> FluxLoRAOptions:
        check_network_args(kwargs)
        type_dims = {k: parse_number_arg(kwargs, k, int) for k in TYPE_DIMS if kwargs.get(k) is not None}
        train_blocks = str(kwargs.get("train_blocks") or "all")
        if train_blocks not in ("all", "single", "double"):
            raise UserError(f"--network_args train_blocks={train_blocks}: expected all, single or double")
        double, single = kwargs.get("train_double_block_indices"), kwargs.get("train_single_block_indices")
        double = None if double is None else parse_block_selection(double, num_double, "train_double_block_indices")
        single = None if single is None else parse_block_selection(single, num_single, "train_single_block_indices")
        return cls(
            dim=4 if dim is None else dim,
            alpha=1.0 if alpha is None else alpha,
            type_dims=type_dims or None,
            in_dims=parse_int_list(kwargs, "in_dims", len(IN_LAYERS)),
            double_blocks=double,
            single_blocks=single,
            train_blocks=train_blocks,
            split_qkv=parse_bool_arg(kwargs, "split_qkv"),
            train_t5xxl=parse_bool_arg(kwargs, "train_t5xxl"),
            reg_dims=parse_regex_dims(kwargs, "network_reg_dims"),
            rank_dropout=parse_number_arg(kwargs, "rank_dropout"),
            module_dropout=parse_number_arg(kwargs, "module_dropout"),
            verbose=parse_bool_arg(kwargs, "verbose"),
        )

    def block_dim(self, name: str, path: str) -> int:
        """Rank of a Linear inside a double/single block (0 = no LoRA)."""
        dim = self.regex_dim(name)
        if dim is not None:
            return dim
        dim = self.dim
        for key, fragments in TYPE_DIMS.items():
            if self.type_dims and key in self.type_dims and all(f in name for f in fragments):
                dim = self.type_dims[key]
                break
        kind, index = path.split(".")[:2]
        selection = self.double_blocks if kind == "double_blocks" else self.single_blocks
        return dim if selection is None or selection[int(index)] else 0

    def regex_dim(self, name: str) -> int | None:
        for pattern, dim in (self.reg_dims or {}).items():
            if re.search(pattern, name):
                return dim
        return None


def check_network_args(kwargs: Mapping[str, Any]) -> None:
    unsupported = [k for k in UNSUPPORTED_ARGS if k in kwargs]
    if unsupported:
        raise UserError(f"--network_args {', '.join(unsupported)}: not supported by networks.lora_flux here")
    unknown = sorted(set(kwargs) - KNOWN_ARGS)
    if unknown:
        raise UserError(f"--network_args {', '.join(unknown)}: unknown for networks.lora_flux; known: "
                        f"{', '.join(sorted(KNOWN_ARGS))}")  # fmt: skip
    if "conv_dim" in kwargs or "conv_alpha" in kwargs:
        logger.warning("conv_dim/conv_alpha have no effect on FLUX.1, which has no Conv2d layers")


def _lora_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def _linears_in(root: nn.Module, class_names: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) of every Linear/Conv2d inside modules of the given class names, as upstream finds them."""
    seen = set()
    for path, module in root.named_modules():
        if type(module).__name__ in class_names:
            for child_path, child in module.named_modules():
                full = f"{path}.{child_path}" if path else child_path
                if isinstance(child, (nn.Linear, nn.Conv2d)) and full not in seen:
                    seen.add(full)
                    yield full, child


def flux_block_layers(flux: nn.Module, train_blocks: str = "all") -> Iterator[tuple[str, nn.Module]]:
    kinds = ("double", "single") if train_blocks == "all" else (train_blocks,)
    yield from _linears_in(flux, [c for kind in kinds for c in FLUX_TARGET_BLOCKS[kind]])


def flux_in_layers(flux: nn.Module, layer: str) -> Iterator[tuple[str, nn.Module]]:
    for path, module in flux.named_modules():
        if (path == layer or path.startswith(layer + ".")) and isinstance(module, nn.Linear):
            yield path, module


def text_encoder_layers(text_encoders: Any, train_t5xxl: bool) -> Iterator[tuple[str, nn.Module]]:
    """(LoRA name, layer) for CLIP-L (``lora_te1_``) and, with ``train_t5xxl``, T5-XXL (``lora_te3_``).

    Paths are rebuilt from the encoder stack so they read as upstream's transformers 4 layout
    (``text_model.encoder.layers.N...`` for CLIP) whatever wraps or flattens the model."""
    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    for index, encoder in enumerate(encoders[:2]):
        if encoder is None or (index == 1 and not train_t5xxl):
            continue
        anchor, root = ("encoder.layers.", "text_model.") if index == 0 else ("encoder.block.", "")
        for path, layer in _linears_in(encoder, TEXT_ENCODER_TARGETS):
            at = path.find(anchor)
            yield _lora_name(TEXT_ENCODER_PREFIXES[index], root + path[at:] if at >= 0 else path), layer


def split_dims_for(path: str, layer: nn.Module) -> tuple[int, ...] | None:
    """q/k/v (and the MLP input of single blocks) as separate parts, for split_qkv."""
    if path.startswith("double_blocks.") and path.endswith(".qkv"):
        return (layer.out_features // 3,) * 3
    if path.startswith("single_blocks.") and path.endswith(".linear1"):
        hidden = layer.in_features
        return (hidden, hidden, hidden, layer.out_features - 3 * hidden)
    return None


def flux_lora_targets(flux: nn.Module, options: FluxLoRAOptions) -> tuple[list[LoRATarget], list[str]]:
    """Denoiser targets with their ranks, and the names skipped because their rank is 0."""
    targets, skipped = [], []
    for path, layer in flux_block_layers(flux, options.train_blocks):
        name = _lora_name(LORA_PREFIX_FLUX, path)
        dim = options.block_dim(name, path)
        split = split_dims_for(path, layer) if options.split_qkv else None
        if dim:
            targets.append(LoRATarget(name, layer, dim, options.alpha, split))
        else:
            skipped.append(name)
    for layer_name, in_dim in zip(IN_LAYERS, options.in_dims or ()):
        for path, layer in flux_in_layers(flux, layer_name):
            name = _lora_name(LORA_PREFIX_FLUX, path)
            dim = options.regex_dim(name)
            dim = in_dim if dim is None else dim
            if dim:
                targets.append(LoRATarget(name, layer, dim, options.alpha))
            else:
                skipped.append(name)
    return targets, skipped


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    ae: Any,
    text_encoders: Any,
    flux: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRANetwork:
    """Upstream's entry point: a new LoRA for ``flux`` (and CLIP-L, plus T5-XXL with train_t5xxl=True)."""
    options = FluxLoRAOptions.from_network_args(network_dim, network_alpha, kwargs,
                                                len(getattr(flux, "double_blocks", ())),
                                                len(getattr(flux, "single_blocks", ())))  # fmt: skip
    unet_targets, skipped = flux_lora_targets(flux, options)
    te_targets = []
    for name, layer in text_encoder_layers(text_encoders, options.train_t5xxl):
        dim = options.regex_dim(name)
        dim = options.dim if dim is None else dim
        if dim:
            te_targets.append(LoRATarget(name, layer, dim, options.alpha))
        else:
            skipped.append(name)
    logger.info(f"LoRA for FLUX.1: rank {options.dim}, alpha {options.alpha}, blocks {options.train_blocks}, "
                f"split_qkv {options.split_qkv}, T5-XXL {options.train_t5xxl}, dropout {neuron_dropout}/"
                f"{options.rank_dropout}/{options.module_dropout}")  # fmt: skip
    network = LoRANetwork(unet_targets, te_targets, TEXT_ENCODER_PREFIXES, multiplier, neuron_dropout,
                          options.rank_dropout, options.module_dropout)  # fmt: skip
    if options.verbose:
        for lora in network.loras:
            logger.info(f"\t{lora.lora_name:50} {lora.lora_dim}, {float(lora.alpha)}")
        for name in skipped:
            logger.info(f"\tskipped (rank 0): {name}")
    _set_loraplus(network, kwargs)
    return network


def _set_loraplus(network: LoRANetwork, kwargs: Mapping[str, Any]) -> None:
    ratios = [parse_number_arg(kwargs, k) for k in
              ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")]  # fmt: skip
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)


def create_network_from_weights(
    multiplier: float,
    file: str | None,
    ae: Any,
    text_encoders: Any,
    flux: nn.Module,
    weights_sd: dict | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict]:
    """Upstream's entry point: a network shaped like a saved LoRA (rank and alpha per module from the file;
    T5-XXL when it has ``lora_te3_`` keys). Weights are not loaded, so the caller may load or merge them."""
    check_network_args(kwargs)
    if weights_sd is None:
        weights_sd = load_lora_file(file)
    dims = dims_from_weights(weights_sd)
    train_t5xxl = any(name.startswith(LORA_PREFIX_TEXT_ENCODER_T5 + "_") for name in dims)
    unet_layers = [(_lora_name(LORA_PREFIX_FLUX, p), m) for p, m in flux_block_layers(flux)]
    unet_layers += [(_lora_name(LORA_PREFIX_FLUX, p), m) for layer in IN_LAYERS for p, m in flux_in_layers(flux, layer)]
    te_layers = list(text_encoder_layers(text_encoders, train_t5xxl))
    unknown = set(dims) - {name for name, _ in unet_layers + te_layers}
    if unknown:
        names = ", ".join(sorted(unknown)[:6])
        raise UserError(f"LoRA {file or 'weights'}: modules not in this FLUX.1 model or its text encoders: {names}")
    ignored = sorted(set(kwargs) - {"loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"})
    if ignored:
        logger.warning(f"network_args {', '.join(ignored)} do not apply to a network built from a LoRA file")
    network = LoRANetwork(
        [LoRATarget(n, m, *dims[n]) for n, m in unet_layers if n in dims],
        [LoRATarget(n, m, *dims[n]) for n, m in te_layers if n in dims],
        TEXT_ENCODER_PREFIXES,
        multiplier,
    )
    _set_loraplus(network, kwargs)
    if for_inference:
        network.eval().requires_grad_(False)
    return network, weights_sd
