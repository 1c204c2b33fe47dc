"""Load SD3/SD3.5 MMDiTs and their VAE from users' single files: Stability AI's ``sd3_medium*.safetensors`` and
``sd3.5_*.safetensors`` (``model.diffusion_model.*`` beside ``first_stage_model.*`` and maybe
``text_encoders.*``), or a bare MMDiT; fp32/bf16/fp16/float8_e4m3fn.

The architecture is read off the tensors, never the file name; the model is built on the meta device and the
tensors assigned one at a time. Wrong, damaged or incomplete files are a one-line UserError.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from library.errors import UserError
from library.io.safetensors_file import SafetensorsHeader, read_header
from library.io.tensor_source import TensorRecipe, TensorSource, load_recipes
from library.memory.fp8 import is_fp8
from library.models.autoencoder.loading import load_autoencoder
from library.models.autoencoder.model import SD3_SCALE_FACTOR, SD3_SHIFT_FACTOR, AutoEncoder
from library.models.checkpoint_kind import (
    SD3_VAE_PREFIX,
    describe_checkpoint,
    describe_sd3,
    sd3_embedded_encoders,
    sd3_mmdit_prefix,
    sd3_vae_prefix,
)
from library.models.sd3.layers import HEAD_DIM
from library.models.sd3.model import MMDiT, SD3Params
from library.models.state_loading import check_state_keys

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
SD3_VAE_PREFIXES = (SD3_VAE_PREFIX, "", "vae.")
_OTHER_PARTS = (SD3_VAE_PREFIX, "text_encoders.")
_ATTN2 = re.compile(r"^joint_blocks\.(\d+)\.x_block\.attn2\.")


@dataclass
class SD3Checkpoint:
    """An opened SD3/SD3.5 file: where the MMDiT sits, its architecture, and what else the file holds."""

    path: Path
    header: SafetensorsHeader
    prefix: str
    params: SD3Params
    vae_prefix: str | None
    embedded: dict[str, str]

    @property
    def layout(self) -> str:
        return f"single file ({self.prefix!r} prefix)" if self.prefix else "bare MMDiT"

    @property
    def description(self) -> str:
        return describe_sd3(self.header, self.prefix)

    def mmdit_keys(self) -> list[str]:
        """The file's MMDiT tensor names (with the prefix)."""
        return _mmdit_keys(self.header, self.prefix)

    def file_dtypes(self) -> set[str]:
        return {self.header.tensors[k].dtype for k in self.mmdit_keys()}


def _mmdit_keys(header: SafetensorsHeader, prefix: str) -> list[str]:
    if prefix:
        return [k for k in header.keys() if k.startswith(prefix)]
    return [k for k in header.keys() if not k.startswith(_OTHER_PARTS)]


def detect_sd3_params(shapes: Mapping[str, tuple[int, ...]], what: str = "checkpoint") -> SD3Params:
    """Read the architecture off MMDiT tensor shapes (keys without prefix), as upstream does: depth =
    x_embedder rows / 64, qk-norm iff ``ln_k`` keys, attn2 blocks from ``x_block.attn2.*``, P = sqrt(pos_embed)."""
    try:
        hidden, in_channels, patch_size = shapes["x_embedder.proj.weight"][:3]
        if hidden % HEAD_DIM:
            raise ValueError(f"x_embedder width {hidden} is not a multiple of the head dim {HEAD_DIM}")
        num_patches = shapes["pos_embed"][1]
        table_size = math.isqrt(num_patches)
        if table_size * table_size != num_patches:
            raise ValueError(f"pos_embed holds {num_patches} positions, not a square grid")
        return SD3Params(
            depth=hidden // HEAD_DIM,
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0] // (patch_size * patch_size),
            context_in_dim=shapes["context_embedder.weight"][1],
            adm_in_dim=shapes["y_embedder.mlp.0.weight"][1],
            pos_embed_max_size=table_size,
            qk_norm=any(".attn.ln_k." in k for k in shapes),
            x_block_self_attn_layers=tuple(sorted({int(m.group(1)) for k in shapes if (m := _ATTN2.match(k))})),
            mlp_ratio=shapes["joint_blocks.0.x_block.mlp.fc1.weight"][0] / hidden,
        )
    except KeyError as e:
        raise UserError(f"{what}: damaged SD3/SD3.5 MMDiT checkpoint, missing key {e.args[0]}") from None
    except (ValueError, IndexError, ZeroDivisionError) as e:
        raise UserError(f"{what}: inconsistent SD3/SD3.5 MMDiT checkpoint ({e})") from None


def open_sd3_checkpoint(path: str | Path, option: str = "--pretrained_model_name_or_path") -> SD3Checkpoint:
    """Read the header, find the MMDiT and work out its architecture and the file's other parts; loads nothing."""
    path = Path(path)
    header = read_header(path, option)
    what = f"{option} {path}"
    prefix = sd3_mmdit_prefix(header)
    if prefix is None:
        raise UserError(f"{what}: expected an SD3/SD3.5 MMDiT, found {describe_checkpoint(header)}")
    keys = _mmdit_keys(header, prefix)
    if any(k.endswith(".scale_weight") or k.endswith("scaled_fp8") for k in keys):
        raise UserError(f"{what}: 'scaled' fp8 files are not supported; use an fp16, bf16 or plain fp8 file")
    shapes = {k[len(prefix) :]: header.shape(k) for k in keys}
    params = detect_sd3_params(shapes, what)
    check_state_keys(
        {prefix + k: s for k, s in shapes.items()}, {prefix + k: s for k, s in _expected_shapes(params).items()},
        what, f"{params.display_name} MMDiT",
    )  # fmt: skip
    return SD3Checkpoint(
        path=path, header=header, prefix=prefix, params=params, vae_prefix=sd3_vae_prefix(header),
        embedded=sd3_embedded_encoders(header),
    )  # fmt: skip


def _expected_shapes(params: SD3Params) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MMDiT(params).state_dict().items()}


def block_linear_weight_keys(model: MMDiT) -> set[str]:
    """State-dict keys of the Linear weights inside the joint blocks (the ones ``fp8_linear`` stores as fp8)."""
    return {
        f"joint_blocks.{name}.weight" for name, module in model.joint_blocks.named_modules()
        if isinstance(module, nn.Linear)
    }  # fmt: skip


def load_sd3_mmdit(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    fp8_linear: bool = False,
    option: str = "--pretrained_model_name_or_path",
) -> MMDiT:
    """Load the MMDiT, frozen and in eval mode, with every tensor in ``dtype``.

    With ``fp8_linear`` the joint blocks' Linear weights are stored as float8_e4m3fn (read as they are from an
    fp8 file, or converted); pair it with ``library.memory.fp8.enable_fp8_linear``."""
    if is_fp8(dtype):
        raise UserError(f"{option}: compute dtype cannot be fp8; use fp8_linear with a bf16/fp16/fp32 dtype")
    checkpoint = open_sd3_checkpoint(path, option)
    params = checkpoint.params
    with torch.device("meta"):
        model = MMDiT(params)
    fp8_keys = block_linear_weight_keys(model) if fp8_linear else set()
    recipes = {k: TensorRecipe((checkpoint.prefix + k,)) for k in model.state_dict()}
    logger.info(
        "%s from %s: %s layout, depth %d (hidden %d), qk-norm %s, attn2 blocks %s, position table %dx%d, "
        "file dtypes %s%s",
        params.display_name, checkpoint.path, checkpoint.layout, params.depth, params.hidden_size,
        "yes" if params.qk_norm else "no", list(params.x_block_self_attn_layers) or "none",
        params.pos_embed_max_size, params.pos_embed_max_size, ",".join(sorted(checkpoint.file_dtypes())),
        f", fp8 Linear weights in {len(fp8_keys)} layers" if fp8_linear else "",
    )  # fmt: skip

    def dtype_for(key: str) -> torch.dtype:
        return FP8_DTYPE if key in fp8_keys else dtype

    with (
        TensorSource([checkpoint.header]) as source,
        tqdm(total=len(recipes), desc=f"loading {params.display_name}", unit="tensor", leave=False) as bar,
    ):
        state = load_recipes(recipes, source, dtype_for, device, progress=bar.update)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def has_vae(path: str | Path, option: str = "--pretrained_model_name_or_path") -> bool:
    """Whether an SD3 file carries its VAE (``first_stage_model.*``); SD3 files without one need ``--vae``."""
    return sd3_vae_prefix(read_header(path, option)) is not None


def load_sd3_vae(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", option: str = "--vae"
) -> AutoEncoder:
    """The SD3/SD3.5 VAE from a full SD3 file (``first_stage_model.*``) or a VAE file, with SD3's latent scaling:
    ``encode`` gives (z - 0.0609) * 1.5305 and ``decode`` inverts it."""
    return load_autoencoder(
        path, dtype=dtype, device=device, option=option, scale_factor=SD3_SCALE_FACTOR,
        shift_factor=SD3_SHIFT_FACTOR, prefix_candidates=SD3_VAE_PREFIXES,
    )  # fmt: skip
