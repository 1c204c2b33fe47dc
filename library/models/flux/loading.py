"""Load FLUX.1 transformers from users' files: BFL single files (optionally with the ComfyUI
``model.diffusion_model.`` prefix), diffusers files or folders, in bf16/fp16/fp32/float8_e4m3fn.

The architecture is read off the tensors; the model is built on the meta device and the tensors assigned
one at a time, so RAM holds the weights once. Missing or unexpected keys are an error that names them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from library.errors import UserError
from library.io.safetensors_file import read_header
from library.io.tensor_source import TensorRecipe, TensorSource, load_recipes
from library.models.checkpoint_kind import DIFFUSION_MODEL_PREFIX, describe_checkpoint
from library.models.flux.diffusers_keys import diffusers_to_bfl_recipes, is_diffusers_flux
from library.models.flux.model import Flux, FluxParams

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
_BFL_PREFIXES = ("", DIFFUSION_MODEL_PREFIX, "model.")
_SHARD = re.compile(r"^(.*)-\d{5}-of-(\d{5})\.safetensors$")


@dataclass
class FluxCheckpoint:
    """An opened FLUX.1 checkpoint: where each BFL tensor comes from, and the architecture it describes."""

    path: Path
    source: TensorSource
    recipes: dict[str, TensorRecipe]
    params: FluxParams
    layout: str

    def file_dtypes(self) -> set[str]:
        return {self.source.info(k).dtype for k in self.source.keys()}


def _checkpoint_files(path: Path, option: str) -> list[Path]:
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        files = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) or sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(
                f"{option} {path}: folder holds no .safetensors files (expected a FLUX.1 file or a diffusers folder)"
            )
        return files
    match = _SHARD.match(path.name)
    if match:
        shards = sorted(path.parent.glob(f"{match.group(1)}-*-of-{match.group(2)}.safetensors"))
        if len(shards) != int(match.group(2)):
            raise UserError(f"{option} {path}: {len(shards)} of {int(match.group(2))} shards found beside it")
        return shards
    return [path]


def open_flux_checkpoint(path: str | Path, option: str = "--pretrained_model_name_or_path") -> FluxCheckpoint:
    """Read the headers, work out the layout and the architecture; no tensor is loaded."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{option} {path}: file not found")
    source = TensorSource([read_header(f, option) for f in _checkpoint_files(path, option)])
    keys = source.keys()
    if is_diffusers_flux(keys):
        recipes, unused = diffusers_to_bfl_recipes(keys)
        layout = "diffusers"
    else:
        prefix = next((p for p in _BFL_PREFIXES if f"{p}double_blocks.0.img_attn.qkv.weight" in source), None)
        if prefix is None or "controlnet_blocks.0.weight" in source:
            found = describe_checkpoint(source.headers[0])
            raise UserError(f"{option} {path}: expected a FLUX.1 transformer, found {found}")
        recipes = {k[len(prefix) :]: TensorRecipe((k,)) for k in keys if k.startswith(prefix)}
        unused = [k for k in keys if not k.startswith(prefix)] if prefix == "" else []
        layout = f"BFL ({prefix!r} prefix)" if prefix else "BFL"
    missing_sources = sorted({s for r in recipes.values() for s in r.sources if s not in source})
    if missing_sources:
        raise UserError(f"{option} {path}: damaged {layout} checkpoint, missing {_names(missing_sources)}")
    shapes = {k: r.shape(source) for k, r in recipes.items()}
    params = detect_flux_params(shapes, what=f"{option} {path}")
    _check_keys(set(recipes), set(_expected_keys(params)), unused, f"{option} {path}")
    return FluxCheckpoint(path=path, source=source, recipes=recipes, params=params, layout=layout)


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} keys: {shown}{', ...' if len(keys) > limit else ''}"


def _expected_keys(params: FluxParams) -> list[str]:
    with torch.device("meta"):
        return list(Flux(params).state_dict())


def _check_keys(found: set[str], expected: set[str], unused: list[str], what: str) -> None:
    missing = sorted(expected - found)
    unexpected = sorted((found - expected) | set(unused))
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if problems:
        raise UserError(f"{what}: not a complete FLUX.1 checkpoint: {'; '.join(problems)}")


def _block_count(shapes: Mapping[str, tuple[int, ...]], name: str) -> int:
    indices = {int(m.group(1)) for k in shapes if (m := re.match(rf"^{name}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """BFL splits the 128-dim head into (16, 56, 56) rotary axes; other head dims keep the same proportions."""
    index_dim = head_dim // 8
    spatial = (head_dim - index_dim) // 2
    return (head_dim - 2 * spatial, spatial, spatial)


def detect_flux_params(shapes: Mapping[str, tuple[int, ...]], what: str = "checkpoint") -> FluxParams:
    """Read the architecture off BFL-layout tensor shapes."""
    try:
        hidden, in_channels = shapes["img_in.weight"]
        depth, depth_single = _block_count(shapes, "double_blocks"), _block_count(shapes, "single_blocks")
        if depth:
            head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
            mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        else:
            head_dim = shapes["single_blocks.0.norm.query_norm.scale"][0]
            mlp_hidden = shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
        params = FluxParams(
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=depth_single,
            axes_dim=_rope_axes(head_dim),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except KeyError as e:
        raise UserError(f"{what}: damaged FLUX.1 checkpoint, missing key {e.args[0]}") from None
    except ValueError as e:
        raise UserError(f"{what}: inconsistent FLUX.1 checkpoint ({e})") from None
    return params


def _is_block_linear_weight(key: str) -> bool:
    return key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and ".norm." not in key


def load_flux_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    fp8_linear: bool = False,
    option: str = "--pretrained_model_name_or_path",
) -> Flux:
    """Load a FLUX.1 transformer with every tensor in ``dtype``.

    With ``fp8_linear`` the Linear weights of the double/single blocks are stored as float8_e4m3fn (read from an
    fp8 file as they are, or converted); pair it with ``library.memory.fp8.enable_fp8_linear``.
    """
    if dtype == FP8_DTYPE:
        raise UserError(f"{option}: compute dtype cannot be fp8; use fp8_linear with a bf16/fp16/fp32 dtype")
    checkpoint = open_flux_checkpoint(path, option)
    params = checkpoint.params
    logger.info(
        "FLUX.1 %s from %s: %s layout, %d double + %d single blocks, hidden %d, file dtypes %s",
        params.variant, checkpoint.path, checkpoint.layout, params.depth, params.depth_single_blocks,
        params.hidden_size, ",".join(sorted(checkpoint.file_dtypes())),
    )  # fmt: skip

    def dtype_for(key: str) -> torch.dtype:
        return FP8_DTYPE if fp8_linear and _is_block_linear_weight(key) else dtype

    with torch.device("meta"):
        model = Flux(params)
    with (
        checkpoint.source,
        tqdm(total=len(checkpoint.recipes), desc="loading FLUX.1", unit="tensor", leave=False) as bar,
    ):
        state = load_recipes(checkpoint.recipes, checkpoint.source, dtype_for, device, progress=bar.update)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
