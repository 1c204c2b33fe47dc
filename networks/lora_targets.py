"""From an architecture's target list to a LoRA network: the shared half of every ``networks/lora_<arch>.py`` (OFT
reads the same target lists: networks/oft.py).

An architecture declares a ``LoRAArchitecture`` (block groups, per-kind rank args, extra layers, text-encoder
slots, its q/k/v split); ``build_network`` and ``build_network_from_weights`` are upstream's ``create_network``
and ``create_network_from_weights`` for it. Names are upstream's and ComfyUI's: the prefix (``lora_unet``,
``lora_te1``...) + the module path with dots as underscores; text-encoder paths are read as transformers 4's
layout (``text_model.encoder.layers.N...`` for CLIP, ``encoder.block.N...`` for T5).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from library.errors import UserError
from networks.lora import GGPO, LoRANetwork, LoRATarget, dims_from_weights, load_lora_file
from networks.lora_args import (
    first_match,
    parse_block_selection,
    parse_bool_arg,
    parse_int_list,
    parse_number_arg,
    parse_regex_values,
    warn_unused_args,
)

logger = logging.getLogger(__name__)

TEXT_ENCODER_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "T5Attention", "T5DenseGatedActDense")
# where the layer stack starts in each encoder's module paths, and the root upstream's names put before it
_TEXT_ENCODER_ANCHORS = {"clip": ("encoder.layers.", "text_model."), "t5": ("encoder.block.", "")}
LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
# network_args that shape nothing and so apply to a network built from a file as well
TRAINING_ARGS = frozenset({"rank_dropout", "module_dropout", "network_reg_lrs", "ggpo_beta", "ggpo_sigma",
                           *LORAPLUS_ARGS})  # fmt: skip
COMMON_ARGS = TRAINING_ARGS | {"split_qkv", "train_t5xxl", "verbose", "network_reg_dims"}


@dataclass(frozen=True)
class TextEncoderSlot:
    """One entry of the ``text_encoders`` list: its LoRA prefix and kind; T5 is trained only with train_t5xxl."""

    prefix: str
    kind: str  # "clip" or "t5"


@dataclass(frozen=True)
class BlockGroup:
    """A list of transformer blocks (``double_blocks``): every Linear inside is a default target."""

    name: str  # its train_blocks value
    path: str  # the ModuleList's attribute path in the model
    indices_arg: str  # the network_arg choosing blocks by index


@dataclass(frozen=True)
class LoRAArchitecture:
    """What a ``networks/lora_<arch>.py`` declares; everything else is shared."""

    title: str
    module: str
    block_groups: tuple[BlockGroup, ...]
    type_dims: Mapping[str, tuple[str, ...]]  # rank arg -> name fragments that must all occur (first match wins)
    extra_dims_arg: str  # the list arg giving ranks to the layers below (in_dims, emb_dims)
    extra_layers: tuple[str, ...]  # module paths; every Linear/Conv2d at or under each
    text_encoders: tuple[TextEncoderSlot, ...]
    split_dims: Callable[[str, nn.Module], tuple[int, ...] | None]  # split_qkv parts of a layer, or None
    train_blocks_arg: bool = False  # train_blocks=all|<group name>
    conv_args: bool = False  # conv_dim/conv_alpha (the rank of non-1x1 Conv2d layers)
    unet_prefix: str = "lora_unet"

    @property
    def known_args(self) -> frozenset[str]:
        own = {*self.type_dims, self.extra_dims_arg, *(g.indices_arg for g in self.block_groups)}
        own |= {"train_blocks"} if self.train_blocks_arg else set()
        own |= {"conv_dim", "conv_alpha"} if self.conv_args else set()
        return COMMON_ARGS | own

    @property
    def text_encoder_prefixes(self) -> tuple[str, ...]:
        return tuple(slot.prefix for slot in self.text_encoders)


@dataclass(frozen=True)
class Candidate:
    """A denoiser layer LoRA may target: in a block group (with its block index) or an extra layer."""

    path: str
    layer: nn.Module
    group: BlockGroup | None
    index: int  # block index, or position in the extra dims list


def lora_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def layers_under(root: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) of every Linear/Conv2d at ``prefix`` or inside it."""
    for path, module in root.named_modules():
        if (path == prefix or path.startswith(prefix + ".")) and isinstance(module, (nn.Linear, nn.Conv2d)):
            yield path, module


def layers_in_classes(root: nn.Module, class_names: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) of every Linear/Conv2d inside modules of the given class names, as upstream finds them."""
    seen = set()
    for path, module in root.named_modules():
        if type(module).__name__ in class_names:
            for child_path, child in module.named_modules():
                full = f"{path}.{child_path}" if path else child_path
                if isinstance(child, (nn.Linear, nn.Conv2d)) and full not in seen:
                    seen.add(full)
                    yield full, child


def block_count(model: nn.Module, group: BlockGroup) -> int:
    try:
        return len(model.get_submodule(group.path))
    except AttributeError:
        return 0


def unet_candidates(
    arch: LoRAArchitecture, model: nn.Module, groups: Collection[str] | None, extra: bool
) -> Iterator[Candidate]:
    """Block layers (of ``groups``, or all) in model order, then the extra layers in the order of their arg."""
    for group in arch.block_groups:
        if groups is None or group.name in groups:
            for path, layer in layers_under(model, group.path):
                yield Candidate(path, layer, group, int(path.split(".")[1]))
    for index, prefix in enumerate(arch.extra_layers if extra else ()):
        for path, layer in layers_under(model, prefix):
            yield Candidate(path, layer, None, index)


def text_encoder_layers(
    arch: LoRAArchitecture, text_encoders: Any, train_t5xxl: bool
) -> Iterator[tuple[str, nn.Module]]:
    """(LoRA name, layer) for each text encoder given in its slot's position (None entries skipped)."""
    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    for slot, encoder in zip(arch.text_encoders, encoders):
        if encoder is None or (slot.kind == "t5" and not train_t5xxl):
            continue
        anchor, root = _TEXT_ENCODER_ANCHORS[slot.kind]
        for path, layer in layers_in_classes(encoder, TEXT_ENCODER_CLASSES):
            at = path.find(anchor)
            yield lora_name(slot.prefix, root + path[at:] if at >= 0 else path), layer


def layers_in_file(
    arch: LoRAArchitecture,
    names: Collection[str],
    model: nn.Module,
    text_encoders: Any,
    train_t5xxl: bool,
    label: str,
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """(name, layer) of the denoiser's and the text encoders' layers that a saved network's module ``names`` pick,
    in model order; a UserError starting with ``label`` names the modules that are not in the models."""
    unet = [(lora_name(arch.unet_prefix, c.path), c.layer) for c in unet_candidates(arch, model, None, True)]
    text = list(text_encoder_layers(arch, text_encoders, train_t5xxl))
    unknown = set(names) - {name for name, _ in unet + text}
    if unknown:
        listed = ", ".join(sorted(unknown)[:6])
        raise UserError(f"{label}: modules not in this {arch.title} model or its text encoders: {listed}")
    return [(n, m) for n, m in unet if n in names], [(n, m) for n, m in text if n in names]


def _is_spatial_conv(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


@dataclass(frozen=True)
class TrainingArgs:
    """network_args that apply however the modules were chosen (also with --dim_from_weights)."""

    rank_dropout: float | None = None
    module_dropout: float | None = None
    reg_lrs: Mapping[str, float] | None = None
    ggpo: GGPO | None = None
    loraplus: tuple[float | None, float | None, float | None] = (None, None, None)

    @classmethod
    def from_network_args(cls, kwargs: Mapping[str, Any]) -> TrainingArgs:
        beta, sigma = parse_number_arg(kwargs, "ggpo_beta"), parse_number_arg(kwargs, "ggpo_sigma")
        if (beta is None) != (sigma is None):
            raise UserError("--network_args ggpo_beta and ggpo_sigma go together (e.g. ggpo_beta=0.01 "
                            "ggpo_sigma=0.03); give both or neither")  # fmt: skip
        return cls(
            rank_dropout=parse_number_arg(kwargs, "rank_dropout"),
            module_dropout=parse_number_arg(kwargs, "module_dropout"),
            reg_lrs=parse_regex_values(kwargs, "network_reg_lrs", float),
            ggpo=None if beta is None else GGPO(beta=beta, sigma=sigma),
            loraplus=tuple(parse_number_arg(kwargs, k) for k in LORAPLUS_ARGS),
        )

    def network(self, unet: list[LoRATarget], text: list[LoRATarget], prefixes: Sequence[str], multiplier: float,
                dropout: float | None = None) -> LoRANetwork:  # fmt: skip
        network = LoRANetwork(unet, text, prefixes, multiplier, dropout, self.rank_dropout, self.module_dropout,
                              ggpo=self.ggpo, reg_lrs=self.reg_lrs)  # fmt: skip
        if any(r is not None for r in self.loraplus):
            network.set_loraplus_lr_ratio(*self.loraplus)
        return network


@dataclass(frozen=True)
class LoRAOptions:
    """``--network_dim/--network_alpha/--network_args`` of one architecture, parsed and checked."""

    dim: int = 4
    alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float = 1.0
    type_dims: Mapping[str, int] = field(default_factory=dict)
    extra_dims: tuple[int, ...] = ()
    groups: tuple[str, ...] | None = None  # block groups trained (train_blocks); None: every group
    selections: Mapping[str, tuple[bool, ...]] = field(default_factory=dict)  # per block group, when given
    split_qkv: bool = False
    train_t5xxl: bool = False
    reg_dims: Mapping[str, int] | None = None
    training: TrainingArgs = TrainingArgs()
    verbose: bool = False

    @classmethod
    def from_network_args(
        cls, arch: LoRAArchitecture, dim: int | None, alpha: float | None, kwargs: Mapping[str, Any], model: nn.Module
    ) -> LoRAOptions:
        warn_unused_args(kwargs, arch.known_args, arch.module)
        selections = {}
        for group in arch.block_groups:
            if kwargs.get(group.indices_arg) is not None:
                count = block_count(model, group)
                selections[group.name] = tuple(parse_block_selection(kwargs[group.indices_arg], count,
                                                                     group.indices_arg))  # fmt: skip
        conv_dim = parse_number_arg(kwargs, "conv_dim", int) if arch.conv_args else None
        conv_alpha = parse_number_arg(kwargs, "conv_alpha") if arch.conv_args else None
        return cls(
            dim=4 if dim is None else int(dim),
            alpha=1.0 if alpha is None else float(alpha),
            conv_dim=conv_dim,
            conv_alpha=1.0 if conv_alpha is None else conv_alpha,
            type_dims={k: parse_number_arg(kwargs, k, int) for k in arch.type_dims if kwargs.get(k) is not None},
            extra_dims=tuple(parse_int_list(kwargs, arch.extra_dims_arg, len(arch.extra_layers)) or ()),
            groups=_train_blocks(arch, kwargs),
            selections=selections,
            split_qkv=parse_bool_arg(kwargs, "split_qkv"),
            train_t5xxl=parse_bool_arg(kwargs, "train_t5xxl"),
            reg_dims=parse_regex_values(kwargs, "network_reg_dims", int),
            training=TrainingArgs.from_network_args(kwargs),
            verbose=parse_bool_arg(kwargs, "verbose"),
        )

    def unet_rank(self, arch: LoRAArchitecture, name: str, candidate: Candidate) -> tuple[int, float]:
        """(rank, alpha) of a denoiser layer; rank 0 leaves it out. A network_reg_dims match wins, as upstream."""
        match = first_match(self.reg_dims, name)
        if match is not None:
            return match[1], self.alpha
        spatial = _is_spatial_conv(candidate.layer)
        if candidate.group is None:
            dim = self.extra_dims[candidate.index]
            if spatial and dim and self.conv_dim is not None:
                return self.conv_dim, self.conv_alpha
            return dim, self.alpha
        if spatial:
            return self.conv_dim or 0, self.conv_alpha
        dim = self.dim
        for key, fragments in arch.type_dims.items():
            if key in self.type_dims and all(f in name for f in fragments):
                dim = self.type_dims[key]
                break
        selection = self.selections.get(candidate.group.name)
        return (dim if selection is None or selection[candidate.index] else 0), self.alpha

    def text_encoder_rank(self, name: str) -> int:
        match = first_match(self.reg_dims, name)
        return self.dim if match is None else match[1]


def _train_blocks(arch: LoRAArchitecture, kwargs: Mapping[str, Any]) -> tuple[str, ...] | None:
    if not arch.train_blocks_arg or kwargs.get("train_blocks") in (None, "", "all"):
        return None
    names = [g.name for g in arch.block_groups]
    value = str(kwargs["train_blocks"]).strip()
    if value not in names:
        raise UserError(f"--network_args train_blocks={value}: expected all, {' or '.join(names)}")
    return (value,)


def build_network(
    arch: LoRAArchitecture,
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    text_encoders: Any,
    model: nn.Module,
    neuron_dropout: float | None,
    kwargs: Mapping[str, Any],
) -> LoRANetwork:
    """A new LoRA for ``model`` (and its text encoders) as ``network_args`` choose; upstream's create_network."""
    options = LoRAOptions.from_network_args(arch, network_dim, network_alpha, kwargs, model)
    unet, text, skipped = [], [], []
    for candidate in unet_candidates(arch, model, options.groups, bool(options.extra_dims)):
        name = lora_name(arch.unet_prefix, candidate.path)
        rank, alpha = options.unet_rank(arch, name, candidate)
        split = arch.split_dims(candidate.path, candidate.layer) if options.split_qkv else None
        if rank:
            unet.append(LoRATarget(name, candidate.layer, rank, alpha, split))
        else:
            skipped.append(name)
    for name, layer in text_encoder_layers(arch, text_encoders, options.train_t5xxl):
        rank = options.text_encoder_rank(name)
        if rank:
            text.append(LoRATarget(name, layer, rank, options.alpha))
        else:
            skipped.append(name)
    if options.conv_dim is not None and not any(_is_spatial_conv(t.module) for t in unet):
        logger.warning(f"--network_args conv_dim: no Conv2d layer among the {arch.module} targets; no effect")
    t = options.training
    logger.info(f"LoRA for {arch.title}: rank {options.dim}, alpha {options.alpha}, blocks "
                f"{'all' if options.groups is None else options.groups[0]}, split_qkv {options.split_qkv}, T5-XXL "
                f"{options.train_t5xxl}, dropout {neuron_dropout}/{t.rank_dropout}/{t.module_dropout}"
                + (f", GGPO beta {t.ggpo.beta} sigma {t.ggpo.sigma}" if t.ggpo else ""))  # fmt: skip
    network = t.network(unet, text, arch.text_encoder_prefixes, multiplier, neuron_dropout)
    if options.verbose:
        for lora in network.loras:
            logger.info(f"\t{lora.lora_name:50} {lora.lora_dim}, {float(lora.alpha)}")
        for name in skipped:
            logger.info(f"\tskipped (rank 0): {name}")
    return network


def build_network_from_weights(
    arch: LoRAArchitecture,
    multiplier: float,
    file: str | os.PathLike | None,
    text_encoders: Any,
    model: nn.Module,
    weights_sd: Mapping[str, Tensor] | None,
    for_inference: bool,
    kwargs: Mapping[str, Any],
) -> tuple[LoRANetwork, Mapping[str, Tensor]]:
    """A network shaped like a saved LoRA (rank and alpha per module from the file; T5 when the file has T5
    modules); upstream's create_network_from_weights. Weights are not loaded, so the caller may load or merge."""
    ignored = sorted(set(kwargs) - TRAINING_ARGS)
    if ignored:
        logger.warning(f"--network_args {', '.join(ignored)}: not used for a network built from a LoRA file "
                       "(its modules and ranks come from the file)")  # fmt: skip
    training = TrainingArgs.from_network_args(kwargs)
    if weights_sd is None:
        weights_sd = load_lora_file(file)
    label = os.fspath(file) if file is not None else "weights"
    dims = dims_from_weights(weights_sd)
    if not dims:
        raise UserError(f"LoRA {label}: no '<name>.lora_down.weight' keys, so not a LoRA (found e.g. "
                        f"{next(iter(weights_sd), 'nothing')})")  # fmt: skip
    t5_prefixes = tuple(slot.prefix + "_" for slot in arch.text_encoders if slot.kind == "t5")
    train_t5xxl = bool(t5_prefixes) and any(name.startswith(t5_prefixes) for name in dims)
    unet, text = layers_in_file(arch, dims, model, text_encoders, train_t5xxl, f"LoRA {label}")
    network = training.network([LoRATarget(n, m, *dims[n]) for n, m in unet],
                               [LoRATarget(n, m, *dims[n]) for n, m in text], arch.text_encoder_prefixes,
                               multiplier)  # fmt: skip
    if for_inference:
        network.eval().requires_grad_(False)
    return network, weights_sd
