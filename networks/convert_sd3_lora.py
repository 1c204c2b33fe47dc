"""Convert an SD3/SD3.5 LoRA between sd-scripts' format and diffusers' PEFT format.

sd-scripts (``networks.lora_sd3``, ComfyUI): ``lora_unet_<SAI module path>`` / ``lora_te1_`` / ``lora_te2_`` /
``lora_te3_`` names with ``lora_down.weight``, ``lora_up.weight`` and ``alpha``. diffusers (what
``StableDiffusion3Pipeline.load_lora_weights`` and ``SD3Transformer2DModel.load_lora_adapter`` read):
``transformer.<diffusers module path>.lora_A.weight`` / ``lora_B.weight`` and ``text_encoder.`` (CLIP-L) /
``text_encoder_2.`` (CLIP-G) keys, no alphas (scale 1). diffusers has no kohya converter for SD3.

sd-scripts -> diffusers: a fused q/k/v becomes to_q/to_k/to_v (a split_qkv file its small per-part form, any
other sharing lora_down); the shift/scale halves of lora_up swap for ``final_layer.adaLN_modulation`` and the
last (pre-only) context block's adaLN, as diffusers' checkpoint converter swaps those weights; alpha/rank is
folded into lora_A. T5-XXL parts have no diffusers path for SD3 and are left out with a warning.
diffusers -> sd-scripts: the inverse (q/k/v fused back; alpha = rank, or PEFT's ``lora_alpha`` from the
file's ``lora_adapter_metadata``). The conversion itself is networks/convert_lora_common.py, shared with
networks/convert_flux_lora.py; this file lists SD3's names.

    python networks/convert_sd3_lora.py --src_path my_sd3_lora.safetensors --dst_path my_sd3_lora_peft.safetensors
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402
from library.logging_setup import setup_logging  # noqa: E402
from networks.convert_lora_common import (  # noqa: E402
    LoraLayout,
    ModuleRule,
    OtherFamily,
    always,
    clip_rule,
    convert_file,
    convert_parser,
    pre_only_modulation,
    t5_rule,
)

PEFT_FORMATS = ("diffusers",)
_BLOCK = "transformer_blocks.{i}."
# SAI module path -> diffusers module paths (three for a fused q/k/v), as convert_sd3_transformer_checkpoint_to_
# diffusers maps the weights
MODULE_MAP: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("joint_blocks.{i}.x_block.attn.qkv", tuple(_BLOCK + f"attn.to_{p}" for p in "qkv")),
    ("joint_blocks.{i}.context_block.attn.qkv", tuple(_BLOCK + f"attn.add_{p}_proj" for p in "qkv")),
    ("joint_blocks.{i}.x_block.attn2.qkv", tuple(_BLOCK + f"attn2.to_{p}" for p in "qkv")),
    ("joint_blocks.{i}.x_block.attn.proj", (_BLOCK + "attn.to_out.0",)),
    ("joint_blocks.{i}.context_block.attn.proj", (_BLOCK + "attn.to_add_out",)),
    ("joint_blocks.{i}.x_block.attn2.proj", (_BLOCK + "attn2.to_out.0",)),
    ("joint_blocks.{i}.x_block.mlp.fc1", (_BLOCK + "ff.net.0.proj",)),
    ("joint_blocks.{i}.x_block.mlp.fc2", (_BLOCK + "ff.net.2",)),
    ("joint_blocks.{i}.context_block.mlp.fc1", (_BLOCK + "ff_context.net.0.proj",)),
    ("joint_blocks.{i}.context_block.mlp.fc2", (_BLOCK + "ff_context.net.2",)),
    ("joint_blocks.{i}.x_block.adaLN_modulation.1", (_BLOCK + "norm1.linear",)),
    ("joint_blocks.{i}.context_block.adaLN_modulation.1", (_BLOCK + "norm1_context.linear",)),
    ("context_embedder", ("context_embedder",)),
    ("x_embedder.proj", ("pos_embed.proj",)),
    ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    ("final_layer.linear", ("proj_out",)),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",)),
)
# the adaLN rows diffusers stores as (scale, shift): the final layer's, and the last (pre-only) context block's
_SWAPS = {
    "final_layer.adaLN_modulation.1": always,
    "joint_blocks.{i}.context_block.adaLN_modulation.1": pre_only_modulation,
}

SD3_LAYOUT = LoraLayout(
    family="SD3/SD3.5",
    article="an",
    network_module="networks.lora_sd3",
    transformer="transformer",
    rules=tuple(ModuleRule(sai, parts, swap=_SWAPS.get(sai)) for sai, parts in MODULE_MAP),
    text_encoders=(
        clip_rule("lora_te1", "text_encoder", "CLIP-L"),
        clip_rule("lora_te2", "text_encoder_2", "CLIP-G"),
        t5_rule("lora_te3", None),
    ),  # fmt: skip
    other_family=OtherFamily(
        name_markers=("double_blocks", "single_blocks", "single_transformer_blocks", "guidance", "img_in", "txt_in"),
        metadata_markers=("lora_flux", "flux-1"),
        hint="a FLUX.1 LoRA?",
        tool="networks/convert_flux_lora.py",
    ),
)


def sd_scripts_to_diffusers(state: Mapping[str, Tensor], source: str = "LoRA") -> dict[str, Tensor]:
    """diffusers PEFT keys (fp32) for an sd-scripts SD3 LoRA; T5-XXL parts are left out with a warning."""
    return SD3_LAYOUT.to_peft(state, source)


def diffusers_to_sd_scripts(
    state: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, source: str = "LoRA"
) -> dict[str, Tensor]:
    """sd-scripts keys (fp32, alpha = rank) for a diffusers PEFT SD3 LoRA."""
    return SD3_LAYOUT.to_sd_scripts(state, metadata, source)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = convert_parser(__doc__, PEFT_FORMATS).parse_args(argv)
    convert_file(SD3_LAYOUT, Path(args.src_path), Path(args.dst_path), args.src, args.dst, args.save_precision,
                 args.overwrite, PEFT_FORMATS)  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
