"""The adapter core LoRA and OFT share: the module contract, the network holding the modules, and which network
module reads a saved file.

An ``AdapterModule`` adapts one layer by wrapping that instance's ``forward`` (the shared chain of
``library/memory/wrappers.py``, layer ADAPTER: around an fp8 upcast, inside checkpointing and block swap) and can
merge itself into the layer's weight. Its kind gives five things: ``forward(x, org_forward)``, ``saved_tensors`` /
``saved_shapes`` (upstream's key suffixes), ``tensors_from_saved`` (file tensors to its own), and
``merged_weight`` / ``unmerged_weight``. ``networks/lora.py`` and ``networks/oft.py`` are the two kinds.

An ``AdapterNetwork`` holds the modules under their upstream names, for the denoiser and the text encoders, and does
everything that does not depend on the kind: attach/detach in any order, the multiplier, upstream's saved keys with
metadata and the additional-networks hashes, loading (strict for inference, lenient to continue training), the
optimizer parameter groups (one lr per text encoder, ``network_reg_lrs``, LoRA+ ratios), merge/unmerge, and upstream's
entry points (``apply_to``, ``merge_to``, ``prepare_optimizer_params`` ...). A file's keys tell its kind:
``network_module_for_keys``.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from library.errors import UserError
from library.io.safetensors_file import atomic_save_file, read_header
from library.memory.wrappers import Layer, attach, detach, is_attached
from library.training.metadata import additional_network_hashes

OFT_KEY_PREFIX = "oft_"
# (LoRA module, OFT module) of one architecture: a file's keys choose between them
_KIND_PAIRS = (("networks.lora_flux", "networks.oft_flux"),)


def is_oft_module(module: str) -> bool:
    return module.rpartition(".")[2].startswith(OFT_KEY_PREFIX)


def network_module_for_keys(keys: Iterable[str], module: str, label: str) -> str:
    """The network module that reads a file with these keys: ``module`` when the file is of its kind (OFT keys
    ``oft_...`` or not), else the same architecture's other kind (networks.lora_flux <-> networks.oft_flux).
    UserError naming ``label`` when the architecture has no module of the file's kind."""
    oft = any(key.startswith(OFT_KEY_PREFIX) for key in keys)
    if oft == is_oft_module(module):
        return module
    for pair in _KIND_PAIRS:
        if module in pair:
            return pair[1] if oft else pair[0]
    kind, example = ("OFT", "oft_unet_...") if oft else ("LoRA", "lora_unet_...")
    raise UserError(f"{label}: holds {kind} weights ({example} keys), which {module} does not read; OFT exists for "
                    "FLUX.1 only (networks.oft_flux)")  # fmt: skip


def load_adapter_file(path: str | os.PathLike, what: str = "network file") -> dict[str, Tensor]:
    """A saved network's tensors; UserError naming ``what`` and the file when it is missing or not safetensors."""
    read_header(path, what)
    return load_file(os.fspath(path))


def names_list(keys: Iterable[str], limit: int = 6) -> str:
    """The first ``limit`` of the sorted keys, comma-separated, and how many more."""
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


class AdapterModule(nn.Module):
    """One adapted layer (the kinds fill in the methods that raise NotImplementedError). ``dim`` is the kind's
    size (LoRA: the rank; OFT: the number of blocks); ``alpha`` a buffer; ``merged`` the multiplier merged into the
    base weight, if any (forward then adds nothing)."""

    PLUS_PARAMS: tuple[str, ...] = ()  # parameter-name prefixes that LoRA+ trains at lr * ratio

    def __init__(self, name: str, org_module: nn.Module, multiplier: float | Tensor, dim: int):
        super().__init__()
        self.name = name
        self.dim = dim
        self.multiplier = multiplier
        self.enabled = True
        self.merged: float | None = None
        self._org = [org_module]  # a list, so the base layer is not a submodule and stays out of state_dict

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def applied(self) -> bool:
        return is_attached(self.org_module, self)

    def apply_to(self) -> None:
        """Wrap the base layer's forward (around whatever it already computes with, e.g. an fp8 upcast)."""
        if self.applied:
            raise RuntimeError(f"{self.name} is already applied")
        attach(self.org_module, Layer.ADAPTER, self, self._wrap)

    def remove(self) -> None:
        """Take this module out of the base layer's forward; the other wrappers stay, in any order."""
        if not self.applied:
            raise RuntimeError(f"{self.name} is not applied")
        detach(self.org_module, self)

    def _wrap(self, layer: nn.Module, inner: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        return self.forward(x, inner)

    def forward(self, x: Tensor, org_forward: Callable[[Tensor], Tensor]) -> Tensor:
        """What the adapted layer computes for ``x``, given ``org_forward`` (the base layer's own computation)."""
        raise NotImplementedError

    def saved_tensors(self, keep_vars: bool = False) -> dict[str, Tensor]:
        """This module's tensors under upstream's key suffixes."""
        raise NotImplementedError

    def saved_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def tensors_from_saved(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Saved tensors (by suffix, some possibly absent) as this module's own state-dict entries; by default the
        suffixes are its own keys. UserError for a combination it cannot hold."""
        return dict(tensors)

    def merged_weight(self, weight: Tensor, multiplier: float, device: torch.device | str | None) -> Tensor:
        """``weight`` with this adapter merged at ``multiplier``, computed in fp32 (on ``device`` if given) and
        returned in ``weight``'s dtype and device."""
        raise NotImplementedError

    def unmerged_weight(self, weight: Tensor, multiplier: float) -> Tensor:
        """The inverse of ``merged_weight`` (exact up to rounding)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge_into_base(
        self,
        multiplier: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Merge into the base weight (stored in ``dtype`` if given); while applied, forward then adds nothing."""
        if self.merged is not None:
            raise RuntimeError(f"{self.name} is already merged")
        multiplier = self.multiplier if multiplier is None else multiplier
        self._set_base_weight(self.merged_weight(self.org_module.weight.data, multiplier, device), dtype)
        self.merged = multiplier

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge_into_base`` (exact up to rounding in the base weight's dtype)."""
        if self.merged is None:
            raise RuntimeError(f"{self.name} is not merged")
        self._set_base_weight(self.unmerged_weight(self.org_module.weight.data, self.merged), None)
        self.merged = None

    def _set_base_weight(self, weight: Tensor, dtype: torch.dtype | None) -> None:
        base = self.org_module.weight
        if dtype is None or dtype == base.dtype:
            base.data.copy_(weight)
        else:
            base.data = weight.to(dtype)


class AdapterNetwork(nn.Module):
    """Adapter modules keyed by their upstream names, for the denoiser (``unet_adapters``) and the text encoders
    (``text_encoder_adapters``, whose names start with one of ``text_encoder_prefixes`` + ``_``)."""

    KIND = "adapter"  # LoRA, OFT: how messages name it
    DIM_NAME = "dim"  # what --network_dim means for the kind
    FOREIGN_HINT = ""  # what a file may be whose keys for this network's modules the kind cannot hold

    def __init__(
        self, text_encoder_prefixes: Sequence[str], multiplier: float = 1.0, reg_lrs: Mapping[str, float] | None = None
    ):
        super().__init__()
        self.multiplier = multiplier
        self.text_encoder_prefixes = tuple(text_encoder_prefixes)
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
        self.reg_lrs = dict(reg_lrs or {})  # network_reg_lrs: regex -> lr, first match wins
        self.text_encoder_adapters: list[AdapterModule] = []
        self.unet_adapters: list[AdapterModule] = []

    def add_adapters(self, modules: Iterable[AdapterModule], text_encoder: bool) -> None:
        for module in modules:
            if module.name in self._modules:
                raise ValueError(f"duplicated {self.KIND} name: {module.name}")
            self.add_module(module.name, module)
            (self.text_encoder_adapters if text_encoder else self.unet_adapters).append(module)

    @property
    def adapters(self) -> list[AdapterModule]:
        return self.text_encoder_adapters + self.unet_adapters

    # upstream's attribute names, which scripts and tools written for LoRA read
    loras = adapters
    text_encoder_loras = property(lambda self: self.text_encoder_adapters)
    unet_loras = property(lambda self: self.unet_adapters)

    @property
    def _log(self) -> logging.Logger:
        """Messages go out under the kind's module (networks.lora, networks.oft)."""
        return logging.getLogger(type(self).__module__)

    def apply_to(
        self, text_encoders: Any = None, unet: Any = None, apply_text_encoder: bool = True, apply_unet: bool = True
    ) -> None:
        """Attach to the layers given at construction; parts not applied are dropped (and so not saved), as
        upstream. The model arguments are accepted for upstream's call signature."""
        for keep, modules in ((apply_text_encoder, self.text_encoder_adapters), (apply_unet, self.unet_adapters)):
            if not keep:
                for module in modules:
                    delattr(self, module.name)
                modules.clear()
        self._log.info(f"{self.KIND}: {len(self.text_encoder_adapters)} text encoder and {len(self.unet_adapters)} "
                       "denoiser modules")  # fmt: skip
        for module in self.adapters:
            module.apply_to()

    def remove(self) -> None:
        """Detach every applied module, restoring the original forwards."""
        for module in reversed(self.adapters):
            if module.applied:
                module.remove()

    def set_multiplier(self, multiplier: float | Tensor) -> None:
        """One strength for every module, or a [B] tensor: one per sample of the next batch."""
        self.multiplier = multiplier
        for module in self.adapters:
            module.multiplier = multiplier

    def set_enabled(self, enabled: bool) -> None:
        for module in self.adapters:
            module.enabled = enabled

    def is_mergeable(self) -> bool:
        return True

    def largest_dim(self) -> tuple[int, float]:
        """(dim, alpha) of the module with the largest dim: what the metadata records for a network whose dims
        came from a file."""
        largest = max(self.adapters, key=lambda module: module.dim)
        return largest.dim, float(largest.alpha)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Upstream's saved keys."""
        out = OrderedDict() if destination is None else destination
        for module in self.adapters:
            for suffix, tensor in module.saved_tensors(keep_vars).items():
                out[f"{prefix}{module.name}.{suffix}"] = tensor
        return out

    def saved_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"{m.name}.{s}": shape for m in self.adapters for s, shape in m.saved_shapes().items()}

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        """Load upstream-keyed tensors (a module without alpha: see its ``tensors_from_saved``). UserError naming
        misshapen keys, keys a module of this kind cannot hold and, when ``strict``, modules on one side only."""
        kind = self.KIND
        expected = self.saved_shapes()
        given = {k: (v.reshape(()) if k.endswith(".alpha") and v.numel() == 1 else v) for k, v in state_dict.items()}
        own = {module.name for module in self.adapters}
        foreign = sorted(k for k in given if k not in expected and k.partition(".")[0] in own)
        if foreign:
            raise UserError(f"{kind} weights hold keys a plain {kind} cannot load: {names_list(foreign)} (keys not in "
                            f"this network; {self.FOREIGN_HINT})")  # fmt: skip
        given_modules = {k.partition(".")[0] for k in given}
        unexpected = sorted(k for k in given if k.partition(".")[0] not in own)
        missing = sorted(k for k in expected if k not in given and not (k.endswith(".alpha") and
                                                                         k.partition(".")[0] in given_modules))  # fmt: skip
        if strict and (unexpected or missing):
            parts = [f"keys not in this network: {names_list(unexpected)}"] if unexpected else []
            parts += [f"missing keys: {names_list(missing)}"] if missing else []
            raise UserError(f"{kind} weights do not match the network: {'; '.join(parts)}")
        wrong = [f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in given.items()
                 if k in expected and tuple(v.shape) != expected[k]]  # fmt: skip
        if wrong:
            raise UserError(f"{kind} weights have the wrong shape: {names_list(wrong, 3)}; were they made for another "
                            f"model or with another {self.DIM_NAME} (--dim_from_weights takes the file's)?")  # fmt: skip
        raw = {}
        for module in self.adapters:
            tensors = {s: given[f"{module.name}.{s}"] for s in module.saved_shapes() if f"{module.name}.{s}" in given}
            if tensors:
                raw.update({f"{module.name}.{k}": v for k, v in module.tensors_from_saved(tensors).items()})
        super().load_state_dict(raw, strict=False, assign=assign)
        return _IncompatibleKeys(missing, unexpected)

    def load_weights(self, file: str | os.PathLike | Mapping[str, Tensor], strict: bool = False):
        """Load saved weights (a path or a state dict). Not strict (the default, as upstream): modules in both get
        the file's weights, the others keep theirs, file modules not in this network are left out, and one line
        says how many of each; UserError when nothing matches. ``strict`` (inference, merging): both sides must
        hold the same modules."""
        label = f"{self.KIND} {os.fspath(file)}" if isinstance(file, (str, os.PathLike)) else f"{self.KIND} weights"
        weights = load_adapter_file(file, f"{self.KIND} file") if isinstance(file, (str, os.PathLike)) else file
        if strict:
            return self.load_state_dict(weights, strict=True)
        own = {module.name for module in self.adapters}
        in_file = {k.partition(".")[0] for k in weights}
        matched = own & in_file
        if not matched:
            example = min(weights, default="no keys at all")
            raise UserError(f"{label}: none of its {len(in_file)} modules is in this network (e.g. {example}); "
                            "was it made for another model, or with text-encoder parts only?")  # fmt: skip
        result = self.load_state_dict(weights, strict=False)
        self._log.info(f"{label}: {len(matched)} modules from the file, {len(own - in_file)} start fresh "
                       f"(not in the file), {len(in_file - own)} file modules unused (not in this network)")  # fmt: skip
        return result

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """Write upstream's keys, with the sd-webui-additional-networks hashes when there is metadata."""
        state = {k: v.detach().to("cpu", dtype or v.dtype) for k, v in self.state_dict().items()}
        if metadata:
            metadata = dict(metadata)
            metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = additional_network_hashes(state, metadata)
        atomic_save_file(state, file, metadata or None)

    def merge_into_base(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        for module in self.adapters:
            module.merge_into_base(dtype=dtype, device=device)

    def unmerge(self) -> None:
        for module in self.adapters:
            if module.merged is not None:
                module.unmerge()

    def merge_to(
        self,
        text_encoders: Any,
        unet: Any,
        weights_sd: Mapping[str, Tensor],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Load ``weights_sd`` and merge the modules it holds into their base weights, each at this network's
        multiplier (upstream's entry point)."""
        result = self.load_state_dict(weights_sd, strict=False)
        if result.unexpected_keys:
            raise UserError(f"{self.KIND} weights hold keys not in this network: {names_list(result.unexpected_keys)}")
        present = {k.partition(".")[0] for k in weights_sd}
        for module in self.adapters:
            if module.name in present:
                module.merge_into_base(dtype=dtype, device=device)
        self._log.info(f"merged {len(present)} {self.KIND} modules into the base weights")

    def prepare_optimizer_params(
        self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None, default_lr: float | None
    ) -> tuple[list[dict], list[str]]:
        """Parameter groups and their names as upstream (``textencoder 1 ``, ``unet reg_lr_0``, ``unet``,
        ``unet plus``): one learning rate per text encoder (fewer values than encoders: the last is reused),
        network_reg_lrs groups first (the first matching regex wins), LoRA+ puts the kind's ``PLUS_PARAMS`` in a
        group with ``lr * ratio``. Groups whose lr is 0 or None are left out and their weights frozen."""
        if not self.adapters:
            raise UserError(f"nothing to train: the {self.KIND} network has no modules (a text-encoder-only "
                            "network for a kind without text-encoder modules?)")  # fmt: skip
        te_lrs = _expand_lrs(text_encoder_lr, default_lr, len(self.text_encoder_prefixes))
        self.requires_grad_(True)
        params, descriptions = [], []
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        parts = [(f"textencoder {i + 1} ", [m for m in self.text_encoder_adapters if m.name.startswith(prefix + "_")],
                  lr, te_ratio) for i, (prefix, lr) in enumerate(zip(self.text_encoder_prefixes, te_lrs))]  # fmt: skip
        parts.append(("unet", self.unet_adapters, unet_lr if unet_lr is not None else default_lr,
                      self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio))  # fmt: skip
        for title, modules, lr, ratio in parts:
            groups, kinds = self._param_groups(modules, lr, ratio)
            params += groups
            descriptions += [title + (" " + k if k else "") for k in kinds]
        trained = {id(p) for group in params for p in group["params"]}
        for param in self.parameters():
            param.requires_grad_(id(param) in trained)
        if not params:
            raise UserError("nothing to train: every learning rate is 0 (--learning_rate, --unet_lr, "
                            "--text_encoder_lr); give a positive one")  # fmt: skip
        self._log.info("optimizer groups: " + ", ".join(f"{d.strip()} lr {g['lr']:g} ({len(g['params'])} tensors)"
                                                        for d, g in zip(descriptions, params)))  # fmt: skip
        return params, descriptions

    prepare_optimizer_params_with_multiple_te_lrs = prepare_optimizer_params

    def _param_groups(
        self, modules: Sequence[AdapterModule], lr: float | None, plus_ratio: float | None
    ) -> tuple[list[dict], list[str]]:
        """Groups for one part (a text encoder or the denoiser) and their kinds (``reg_lr_0``, ``reg_lr_0 plus``,
        ``""``, ``plus``): modules matching a network_reg_lrs regex take its lr, the first match winning."""
        patterns = list(self.reg_lrs.items())
        buckets: dict[int, tuple[list, list, list]] = {}  # regex index (-1: none) -> plain, plus params, names
        for module in modules:
            index = next((i for i, (pattern, _) in enumerate(patterns) if re.search(pattern, module.name)), -1)
            plain, plus, names = buckets.setdefault(index, ([], [], []))
            names.append(module.name)
            for name, param in module.named_parameters():
                (plus if plus_ratio is not None and name.startswith(module.PLUS_PARAMS) else plain).append(param)
        groups, kinds = [], []
        for index in sorted(buckets, key=lambda i: (i < 0, i)):
            plain, plus, names = buckets[index]
            base_lr, kind = (lr, "") if index < 0 else (patterns[index][1], f"reg_lr_{index}")
            if index >= 0:
                self._log.info(f"network_reg_lrs {patterns[index][0]!r}: lr {base_lr:g} for {len(names)} modules "
                               f"({names_list(names, 3)})")  # fmt: skip
            plus_lr = None if base_lr is None else base_lr * (plus_ratio or 1)
            options = ((kind, plain, base_lr), ((kind + " plus").strip(), plus, plus_lr))
            for group_kind, group_params, group_lr in options:
                if not group_params:
                    continue
                if not group_lr:
                    self._log.info(f"learning rate {group_lr} for {len(group_params)} {self.KIND} tensors: not trained")
                    continue
                groups.append({"params": group_params, "lr": group_lr})
                kinds.append(group_kind)
        return groups, kinds

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def get_trainable_params(self) -> Iterable[nn.Parameter]:
        return self.parameters()


def _expand_lrs(lrs: float | Sequence[float] | None, default: float | None, count: int) -> list[float | None]:
    """One lr per text encoder: none given -> the default; fewer than ``count`` -> the last repeats (SD3: with
    two values the second is T5's too, as upstream)."""
    if lrs is None or (not isinstance(lrs, (int, float)) and len(lrs) == 0):
        return [default] * count
    lrs = [float(lrs)] if isinstance(lrs, (int, float)) else [float(lr) for lr in lrs]
    if len(lrs) > count:
        raise UserError(f"--text_encoder_lr: give 1 to {count} values (one per text encoder), got {len(lrs)}")
    return lrs + [lrs[-1]] * (count - len(lrs))
