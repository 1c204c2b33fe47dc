"""The conversion core shared by networks/convert_flux_lora.py and networks/convert_sd3_lora.py: a LoRA between
sd-scripts' keys and diffusers' PEFT keys (what ai-toolkit writes and diffusers' LoRA loaders read).

sd-scripts: ``lora_unet_<model module path>`` / ``lora_te<n>_<encoder module path>`` (dots as underscores) with
``lora_down.weight``, ``lora_up.weight`` and ``alpha``; q/k/v (and FLUX's single-block MLP input) are one fused
module. PEFT: ``<component>.<diffusers module path>.lora_A.weight`` / ``lora_B.weight``, no alphas (scale 1), one
module per diffusers layer. A family declares a ``LoraLayout`` (its ``ModuleRule``s and ``TextEncoderRule``s);
everything else is here.

sd-scripts -> PEFT: alpha/rank is folded into the weights, split between A and B by powers of two when it is below
0.5 (as upstream and diffusers do; exact in any float format). A fused module whose lora_up is block-diagonal
(trained with ``split_qkv``) becomes its small per-part form: each part gets its own rows of lora_down, so the file
does not grow. Any other fused module gives every part the whole lora_down: a safetensors file cannot store one
tensor under two names (no aliasing), so the shared down is written once per part, and such a file grows by
(parts - 1) x rank x in_features per module. Halves stored (shift, scale) in one layout and (scale, shift) in the
other are swapped in lora_up's rows.
PEFT -> sd-scripts: parts are fused back (a lora_A shared by all parts stays one lora_down; otherwise downs are
stacked and lora_up is block-diagonal, the split_qkv form), alpha = rank (or PEFT's ``lora_alpha`` from the file's
``lora_adapter_metadata``, or ``<module>.alpha`` keys, folded into lora_down).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from library.dtypes import parse_dtype
from library.errors import UserError
from library.io.safetensors_file import SAFETENSORS_SUFFIXES, atomic_save_file, read_header
from library.models.checkpoint_kind import describe_checkpoint
from library.training.metadata import additional_network_hashes
from networks.lora import lora_scale, split_fused_lora

logger = logging.getLogger(__name__)

SD_SCRIPTS = "sd-scripts"
LoraModule = tuple[Tensor, Tensor, float | None]  # lora_down, lora_up, alpha (None: alpha = rank)


def always(out_features: int, in_features: int) -> bool:
    return True


def pre_only_modulation(out_features: int, in_features: int) -> bool:
    """SD3's last context block modulates shift and scale only (2 x width outputs)."""
    return out_features == 2 * in_features


@dataclass(frozen=True)
class ModuleRule:
    """One sd-scripts module (``{i}``: a block index) and the diffusers module(s) its outputs go to, in order.

    ``split``: how a fused module's outputs divide among the parts: "equal" (q, k, v) or "qkv_mlp" (q, k, v of the
    input width, then the MLP: FLUX's single-block linear1). ``swap``: (out, in) -> whether lora_up's two halves
    are stored in the other order by diffusers."""

    sd_scripts: str
    peft: tuple[str, ...]
    split: str = "equal"
    swap: Callable[[int, int], bool] | None = None
    mlp_ratio: int = 4  # "qkv_mlp": the MLP part's width over the input width, when the PEFT file lacks that part

    def part_dims(self, in_features: int, out_features: int) -> list[int] | None:
        """The outputs of each part, or None when ``out_features`` does not divide as this rule says."""
        count = len(self.peft)
        if self.split == "qkv_mlp":
            rest = out_features - 3 * in_features
            return [in_features] * 3 + [rest] if rest > 0 else None
        return [out_features // count] * count if out_features % count == 0 else None


@dataclass(frozen=True)
class TextEncoderRule:
    """A text encoder's sd-scripts prefix and diffusers component (None: no diffusers path, left out with a
    warning); ``pattern`` matches its module names after the prefix (underscored) and ``to_path`` gives the dotted
    module path."""

    prefix: str
    component: str | None
    title: str
    pattern: re.Pattern
    to_path: Callable[[re.Match], str]


_CLIP = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$")
_T5 = re.compile(r"^encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi_0|wi_1|wi|wo)$")


def clip_rule(prefix: str, component: str | None, title: str) -> TextEncoderRule:
    def to_path(m: re.Match) -> str:
        kind = m.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
        return f"text_model.encoder.layers.{m.group(1)}.{kind}"

    return TextEncoderRule(prefix, component, title, _CLIP, to_path)


def t5_rule(prefix: str, component: str | None, title: str = "T5-XXL") -> TextEncoderRule:
    def to_path(m: re.Match) -> str:
        return f"encoder.block.{m.group(1)}.layer.{m.group(2)}.{m.group(3)}.{m.group(4)}"

    return TextEncoderRule(prefix, component, title, _T5, to_path)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


def _fill(template: str, match: re.Match) -> str:
    return template.format(i=match.group(1)) if match.groups() else template


def fold_alpha(down: Tensor, up: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(A, B) in fp32 with ``B @ A == scale * up @ down``: the scale goes to A, and below 0.5 it is shared with B
    by powers of two (upstream's and diffusers' rule), which keeps both in a sane range for fp16/bf16."""
    scale_down, scale_up = scale, 1.0
    while scale_down * 2 < scale_up:
        scale_down *= 2
        scale_up /= 2
    return down.float() * scale_down, up.float() * scale_up


def swap_halves(up: Tensor) -> Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def split_parts(down: Tensor, up: Tensor, alpha: float | None, dims: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """(A, B) per output part, alpha folded: a block-diagonal (split_qkv) module in its small form, any other with
    the whole lora_down in every part."""
    rank = down.shape[0]
    scale = lora_scale(alpha, rank)
    if len(dims) > 1:
        try:
            downs, ups, _ = split_fused_lora(down, up, scale * rank, dims)
            return [fold_alpha(d, u, scale) for d, u in zip(downs, ups)]
        except ValueError:
            return [fold_alpha(down, u, scale) for u in up.split(list(dims), dim=0)]
    return [fold_alpha(down, up, scale)]


def fuse_parts(parts: Mapping[int, tuple[Tensor, Tensor]], dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """One (down, up) for a fused layer from its parts' (A, B): a lora_A shared by every part is kept once;
    otherwise the A are stacked and lora_up is block-diagonal (a missing part gets zero rows)."""
    present = [parts[j] for j in sorted(parts)]
    if len(parts) == len(dims) and all(torch.equal(a, present[0][0]) for a, _ in present):
        return present[0][0], torch.cat([b for _, b in present], dim=0)
    down = torch.cat([a for a, _ in present], dim=0)
    up = down.new_zeros(sum(dims), down.shape[0], *present[0][1].shape[2:])
    column = 0
    for j in sorted(parts):
        a, b = parts[j]
        row = sum(dims[:j])
        up[row : row + dims[j], column : column + a.shape[0]] = b
        column += a.shape[0]
    return down, up


def sd_scripts_modules(state: Mapping[str, Tensor], source: str) -> dict[str, LoraModule]:
    """name -> (down, up, alpha) of an sd-scripts LoRA; UserError for anything else."""
    names = {k.removesuffix(".lora_down.weight") for k in state if k.endswith(".lora_down.weight")}
    if not names:
        peft = any(".lora_A." in k for k in state)
        found = "a diffusers/PEFT LoRA (use --src for its format)" if peft else "e.g. " + ", ".join(sorted(state)[:3])
        raise UserError(f"{source}: not an sd-scripts LoRA (no '<name>.lora_down.weight' keys); found {found}")
    allowed = {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    other = sorted(set(state) - allowed)
    if other:
        raise UserError(f"{source}: keys a plain LoRA does not have: {', '.join(other[:3])} (a DoRA/LyCORIS file?)")
    missing = sorted(n for n in names if f"{n}.lora_up.weight" not in state)
    if missing:
        raise UserError(f"{source}: {missing[0]} has lora_down.weight but no lora_up.weight")
    modules = {}
    for n in sorted(names):
        down, up = state[f"{n}.lora_down.weight"], state[f"{n}.lora_up.weight"]
        if up.shape[1] != down.shape[0]:
            raise UserError(f"{source}: {n} has lora_down of rank {down.shape[0]} but lora_up of rank {up.shape[1]}")
        alpha = state.get(f"{n}.alpha")
        modules[n] = (down, up, float(alpha) if alpha is not None else None)
    return modules


def peft_alphas(metadata: Mapping[str, str] | None, source: str) -> dict[str, float]:
    """PEFT's lora_alpha per component (transformer, text_encoder...) from ``lora_adapter_metadata``; without it,
    alpha = rank (scale 1). Per-module alpha patterns and rsLoRA/DoRA are refused."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise UserError(f"{source}: lora_adapter_metadata in the file is not JSON") from None
    alphas = {}
    for key, value in config.items():
        component, _, name = key.rpartition(".")
        if name in ("alpha_pattern", "use_rslora", "use_dora") and value:
            raise UserError(f"{source}: {key}={value} in lora_adapter_metadata is not convertible to sd-scripts")
        if name == "lora_alpha":
            alphas[component] = float(value)
    return alphas


def peft_modules(
    state: Mapping[str, Tensor], metadata: Mapping[str, str] | None, source: str
) -> dict[str, tuple[Tensor, Tensor]]:
    """module -> (A, B) in fp32 of a PEFT LoRA, with PEFT's lora_alpha or ``<module>.alpha`` folded into A."""
    if any(k.endswith(".lora_down.weight") for k in state):
        raise UserError(f"{source}: already an sd-scripts LoRA (use --src sd-scripts)")
    alphas = peft_alphas(metadata, source)
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith(".alpha"):
            pairs.setdefault(key.removesuffix(".alpha"), {})["alpha"] = value
            continue
        module, _, suffix = key.rpartition(".lora_")
        if suffix not in ("A.weight", "B.weight"):
            raise UserError(f"{source}: {key} is not a diffusers/PEFT LoRA key (<module>.lora_A/lora_B.weight)")
        pairs.setdefault(module, {})[suffix[0]] = value
    modules = {}
    for module, pair in pairs.items():
        missing = [f"lora_{side}.weight" for side in "AB" if side not in pair]
        if missing:
            found = ", ".join(f"lora_{k}.weight" if k in "AB" else k for k in sorted(pair))
            raise UserError(f"{source}: {module} has {found} but no {missing[0]}")
        a, b = pair["A"].float(), pair["B"].float()
        if b.shape[1] != a.shape[0]:
            raise UserError(f"{source}: {module} has lora_A of rank {a.shape[0]} but lora_B of rank {b.shape[1]}")
        alpha = pair.get("alpha", alphas.get(module.partition(".")[0]))
        modules[module] = (a * lora_scale(alpha, a.shape[0]), b)
    return modules


def sd_scripts_entry(name: str, down: Tensor, up: Tensor) -> dict[str, Tensor]:
    """The three keys of one module, with alpha = rank (the scale lives in the weights)."""
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(float(down.shape[0]))}  # fmt: skip


@dataclass(frozen=True)
class OtherFamily:
    """How to recognise a LoRA of the other family: fragments of its module names (either format), words in its
    metadata (ss_network_module, modelspec.architecture), and what to tell the user."""

    name_markers: tuple[str, ...]
    metadata_markers: tuple[str, ...]
    hint: str  # "a FLUX.1 LoRA?"
    tool: str  # the converter for that family


@dataclass(frozen=True)
class LoraLayout:
    """A family's LoRA names in both formats."""

    family: str
    article: str  # "a" or "an", before the family's name
    network_module: str
    transformer: str
    rules: tuple[ModuleRule, ...]
    text_encoders: tuple[TextEncoderRule, ...]
    other_family: OtherFamily
    _names: list = field(init=False, repr=False, compare=False)
    _paths: list = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [(_pattern("lora_unet_" + r.sd_scripts.replace(".", "_")), r) for r in self.rules]
        paths = [(_pattern(p), r, j) for r in self.rules for j, p in enumerate(r.peft)]
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_paths", paths)

    def _not_this_family(self, source: str, what: str, names: Iterable[str]) -> UserError:
        """The error for a module this family lacks; it names the other family when the file's names look like it."""
        other = self.other_family
        looks_other = any(m in n for n in names for m in other.name_markers)
        extra = f" ({other.hint}); convert it with {other.tool}" if looks_other else ""
        return UserError(f"{source}: not {self.article} {self.family} LoRA: {what} is no {self.family} module{extra}")

    def check_metadata(self, metadata: Mapping[str, str], source: str) -> None:
        """A file whose metadata names the other family (ss_network_module, modelspec.architecture) is refused."""
        values = [metadata.get(k, "") for k in ("ss_network_module", "modelspec.architecture")]
        named = [v for v in values if any(m in v for m in self.other_family.metadata_markers)]
        if named:
            other = self.other_family
            raise UserError(f"{source}: not {self.article} {self.family} LoRA: its metadata says {' / '.join(named)} "
                            f"({other.hint}); convert it with {other.tool}")  # fmt: skip

    def to_peft(self, state: Mapping[str, Tensor], source: str = "LoRA") -> dict[str, Tensor]:
        """PEFT keys (fp32) for an sd-scripts LoRA; text encoders without a diffusers path are left out with a
        warning."""
        out, dropped = {}, {}
        modules = sd_scripts_modules(state, source)
        for name, (down, up, alpha) in modules.items():
            if name.startswith("lora_unet_"):
                out.update(self._transformer_to_peft(name, down, up, alpha, source, modules))
                continue
            rule = next((r for r in self.text_encoders if name.startswith(r.prefix + "_")), None)
            match = rule.pattern.match(name[len(rule.prefix) + 1 :]) if rule else None
            if match is None:
                raise self._not_this_family(source, name, modules)
            if rule.component is None:
                dropped[rule.title] = dropped.get(rule.title, 0) + 1
                continue
            ((a, b),) = split_parts(down, up, alpha, [up.shape[0]])
            path = f"{rule.component}.{rule.to_path(match)}"
            out[f"{path}.lora_A.weight"], out[f"{path}.lora_B.weight"] = a, b
        for title, count in dropped.items():
            prefix = next(r.prefix for r in self.text_encoders if r.title == title)
            logger.warning(f"{source}: {count} {title} modules ({prefix}_) left out: diffusers' {self.family} LoRA "
                           f"loader has no {title} path")  # fmt: skip
        return out

    def _transformer_to_peft(
        self, name: str, down: Tensor, up: Tensor, alpha: float | None, source: str, names: Iterable[str]
    ) -> dict[str, Tensor]:
        rule, match = next(((r, m) for p, r in self._names if (m := p.match(name))), (None, None))
        if rule is None:
            raise self._not_this_family(source, name, names)
        dims = rule.part_dims(down.shape[1], up.shape[0])
        if dims is None:
            raise UserError(f"{source}: {name} has {up.shape[0]} outputs, which do not split into "
                            f"{', '.join(rule.peft)} for input width {down.shape[1]}")  # fmt: skip
        swap = rule.swap is not None and rule.swap(up.shape[0], down.shape[1])
        out = {}
        for template, (a, b) in zip(rule.peft, split_parts(down, up, alpha, dims)):
            path = f"{self.transformer}.{_fill(template, match)}"
            out[f"{path}.lora_A.weight"], out[f"{path}.lora_B.weight"] = a, swap_halves(b) if swap else b
        return out

    def to_sd_scripts(
        self, state: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, source: str = "LoRA"
    ) -> dict[str, Tensor]:
        """sd-scripts keys (fp32, alpha = rank) for a PEFT LoRA."""
        fused: dict[tuple[ModuleRule, str], dict[int, tuple[Tensor, Tensor]]] = {}
        out = {}
        modules = peft_modules(state, metadata, source)
        for module, (a, b) in modules.items():
            component, _, path = module.partition(".")
            rule = next((r for r in self.text_encoders if r.component == component), None)
            if rule is not None:
                tail = path.replace(".", "_")
                match = rule.pattern.match(tail)
                if match is None or rule.to_path(match) != path:
                    raise UserError(f"{source}: {module} is no {rule.title} module")
                out.update(sd_scripts_entry(f"{rule.prefix}_{tail}", a, b))
                continue
            target = next(((r, j, m) for p, r, j in self._paths if (m := p.match(path))), None)
            if component != self.transformer or target is None:
                raise self._not_this_family(source, module, modules)
            rule, part, match = target
            fused.setdefault((rule, match.group(1) if match.groups() else ""), {})[part] = (a, b)
        for (rule, block), parts in fused.items():
            name = "lora_unet_" + rule.sd_scripts.format(i=block).replace(".", "_")
            down, up = fuse_parts(parts, self._fused_dims(rule, parts, name, source))
            if rule.swap is not None and rule.swap(up.shape[0], down.shape[1]):
                up = swap_halves(up)
            out.update(sd_scripts_entry(name, down, up))
        return out

    def _fused_dims(self, rule: ModuleRule, parts: Mapping[int, tuple[Tensor, Tensor]], name: str,
                    source: str) -> list[int]:  # fmt: skip
        """Each part's outputs, checked against what the file holds; a missing part's from the rule."""
        in_features = {a.shape[1:] for a, _ in parts.values()}
        if len(in_features) > 1:
            raise UserError(f"{source}: the parts of {name} ({', '.join(rule.peft)}) have lora_A of different input "
                            f"widths {sorted(in_features)}; they cannot be one layer")  # fmt: skip
        width = next(iter(parts.values()))[0].shape[1]
        if len(rule.peft) == 1:
            return [parts[0][1].shape[0]]
        rows = {j: b.shape[0] for j, (_, b) in parts.items()}
        if rule.split == "qkv_mlp":
            dims = [width] * 3 + [rows.get(3, rule.mlp_ratio * width)]
        else:
            dims = [next(iter(rows.values()))] * len(rule.peft)
        wrong = [rule.peft[j].format(i="N") for j, n in rows.items() if n != dims[j]]
        if wrong:
            raise UserError(f"{source}: {name}: lora_B of {', '.join(wrong)} has {[rows[j] for j in sorted(rows)]} "
                            f"rows where the layer's parts have {dims}")  # fmt: skip
        return dims


# ---- files ----------------------------------------------------------------------------------------------------


def check_output_path(path: Path, overwrite: bool, option: str) -> None:
    """An output file must be .safetensors, and an existing one is replaced only with --overwrite."""
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise UserError(f"{option} {path}: only .safetensors files are written; give a name ending in .safetensors")
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise UserError(f"{option} {path}: already exists; pass --overwrite to replace it, or choose another name")


def check_device(name: str | None, option: str = "--device") -> str:
    """A device name the tools can compute on ("cpu" when not given)."""
    try:
        device = torch.device(name or "cpu")
    except RuntimeError:
        raise UserError(f"{option} {name}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option} {name}: no CUDA device here; leave it out to work on the CPU")
    return str(device)


def _detect_format(state: Mapping[str, Tensor], peft_format: str) -> str:
    return SD_SCRIPTS if any(k.endswith(".lora_down.weight") for k in state) else peft_format


def convert_file(
    layout: LoraLayout,
    src_path: Path,
    dst_path: Path,
    src: str | None,
    dst: str | None,
    save_precision: str | None,
    overwrite: bool = False,
    peft_formats: Sequence[str] = ("diffusers",),
) -> None:
    """Convert ``src_path`` (format ``src``, None: read off its keys) to ``dst`` (None: the other format)."""
    check_output_path(dst_path, overwrite, "--dst_path")
    header = read_header(src_path, "--src_path")
    kind = describe_checkpoint(header)
    if kind != "LoRA":
        raise UserError(f"--src_path {src_path}: not a LoRA file, found {kind}")
    source = f"--src_path {src_path}"
    layout.check_metadata(header.metadata, source)
    from safetensors.torch import load_file

    state = load_file(str(src_path))
    src = src or _detect_format(state, peft_formats[0])
    dst = dst or (peft_formats[0] if src == SD_SCRIPTS else SD_SCRIPTS)
    if (src == SD_SCRIPTS) == (dst == SD_SCRIPTS):
        raise UserError(f"--src {src} --dst {dst}: convert between {SD_SCRIPTS} and {' / '.join(peft_formats)}")
    dtype = parse_dtype(save_precision, "--save_precision") or next(iter(state.values())).dtype
    metadata = {k: v for k, v in header.metadata.items() if not k.startswith(("sshs_", "lora_adapter_metadata"))}
    if dst == SD_SCRIPTS:
        converted = layout.to_sd_scripts(state, header.metadata, source)
        metadata.setdefault("ss_network_module", layout.network_module)
    else:
        converted = layout.to_peft(state, source)
    if not converted:
        raise UserError(f"{source}: nothing to convert (only parts diffusers cannot load?)")
    converted = {k: v.to(dtype).contiguous() for k, v in converted.items()}
    if dst == SD_SCRIPTS:
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = additional_network_hashes(converted, metadata)
    atomic_save_file(converted, dst_path, {**metadata, "format": "pt"})
    logger.info(f"wrote {len(converted)} tensors ({dst}, {str(dtype).removeprefix('torch.')}) to {dst_path}")


def convert_parser(description: str, peft_formats: Sequence[str]) -> argparse.ArgumentParser:
    """The converters' shared options (upstream's convert_flux_lora.py names)."""
    formats = (SD_SCRIPTS, *peft_formats)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src_path", required=True, help="the LoRA to convert (.safetensors)")
    parser.add_argument("--dst_path", required=True, help="where to write the converted LoRA (.safetensors)")
    parser.add_argument(
        "--src", choices=formats, default=None, help="format of --src_path (default: read off its keys)"
    )
    parser.add_argument("--dst", choices=formats, default=None, help="format to write (default: the other one)")
    parser.add_argument("--save_precision", default=None, help="fp32, fp16 or bf16 (default: as stored)")
    parser.add_argument("--overwrite", action="store_true", help="replace --dst_path if it exists")
    return parser
