"""Convert a FLUX.1 LoRA between sd-scripts' format and ai-toolkit's / diffusers' PEFT format, both ways.

sd-scripts (``networks.lora_flux``, ComfyUI): ``lora_unet_<BFL module path>``, ``lora_te1_`` (CLIP-L) and
``lora_te3_`` (T5-XXL) names with ``lora_down.weight``, ``lora_up.weight`` and ``alpha``. ai-toolkit / diffusers
(what ``FluxPipeline.load_lora_weights`` reads without conversion): ``transformer.<diffusers module path>``,
``text_encoder.`` (CLIP-L) and ``text_encoder_2.`` (T5-XXL, the FluxPipeline component; diffusers' FLUX loader
ignores it, so it is kept for tools that read it and for the way back) with ``lora_A.weight`` / ``lora_B.weight``
and no alphas. diffusers' own kohya converter drops T5 parts; this one keeps them.

sd-scripts -> ai-toolkit: the double blocks' fused q/k/v become ``to_q/to_k/to_v`` (``add_*_proj`` for text), the
single blocks' linear1 becomes ``to_q/to_k/to_v/proj_mlp``: a split_qkv file in its small per-part form, any other
with lora_down written once per part (see networks/convert_lora_common.py for why); the final layer's
adaLN_modulation (shift, scale) becomes ``norm_out.linear`` (scale, shift); alpha/rank is folded into the weights.
ai-toolkit -> sd-scripts: the inverse; alpha = rank. Source metadata is kept.

    python networks/convert_flux_lora.py --src_path my_flux_lora.safetensors --dst_path my_flux_lora_ait.safetensors
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402
from library.logging_setup import setup_logging  # noqa: E402
from library.models.flux.diffusers_keys import (  # noqa: E402
    DOUBLE_KEYS,
    DOUBLE_QKV_KEYS,
    SINGLE_KEYS,
    SINGLE_LINEAR1_KEYS,
    TOP_LEVEL_KEYS,
)
from networks.convert_lora_common import (  # noqa: E402
    LoraLayout,
    ModuleRule,
    OtherFamily,
    always,
    clip_rule,
    convert_file,
    convert_parser,
    t5_rule,
)

PEFT_FORMATS = ("ai-toolkit", "diffusers")  # the same keys; "diffusers" is accepted as another name


def _rules() -> tuple[ModuleRule, ...]:
    """BFL module paths -> diffusers module paths, from the checkpoint converter's table."""
    rules = [ModuleRule(bfl, (diffusers,)) for diffusers, bfl in TOP_LEVEL_KEYS.items()]
    rules.append(ModuleRule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=always))
    rules += [
        ModuleRule(f"double_blocks.{{i}}.{bfl}", (f"transformer_blocks.{{i}}.{d}",)) for d, bfl in DOUBLE_KEYS.items()
    ]
    rules += [ModuleRule(f"double_blocks.{{i}}.{bfl}", tuple(f"transformer_blocks.{{i}}.{p}" for p in parts))
              for bfl, parts in DOUBLE_QKV_KEYS.items()]  # fmt: skip
    rules += [ModuleRule(f"single_blocks.{{i}}.{bfl}", (f"single_transformer_blocks.{{i}}.{d}",))
              for d, bfl in SINGLE_KEYS.items()]  # fmt: skip
    rules.append(ModuleRule("single_blocks.{i}.linear1",
                            tuple(f"single_transformer_blocks.{{i}}.{p}" for p in SINGLE_LINEAR1_KEYS), split="qkv_mlp"))  # fmt: skip
    return tuple(rules)


FLUX_LAYOUT = LoraLayout(
    family="FLUX.1",
    article="a",
    network_module="networks.lora_flux",
    transformer="transformer",
    rules=_rules(),
    text_encoders=(clip_rule("lora_te1", "text_encoder", "CLIP-L"), t5_rule("lora_te3", "text_encoder_2")),
    other_family=OtherFamily(
        name_markers=("joint_blocks", "pos_embed", "attn2", "lora_te2_", "text_encoder_3"),
        metadata_markers=("lora_sd3", "stable-diffusion-3"),
        hint="an SD3/SD3.5 LoRA?",
        tool="networks/convert_sd3_lora.py",
    ),
)


def sd_scripts_to_ai_toolkit(state: Mapping[str, Tensor], source: str = "LoRA") -> dict[str, Tensor]:
    """ai-toolkit/diffusers PEFT keys (fp32) for an sd-scripts FLUX.1 LoRA, T5-XXL parts included."""
    return FLUX_LAYOUT.to_peft(state, source)


def ai_toolkit_to_sd_scripts(
    state: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, source: str = "LoRA"
) -> dict[str, Tensor]:
    """sd-scripts keys (fp32, alpha = rank) for an ai-toolkit/diffusers PEFT FLUX.1 LoRA."""
    return FLUX_LAYOUT.to_sd_scripts(state, metadata, source)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = convert_parser(__doc__, PEFT_FORMATS).parse_args(argv)
    convert_file(FLUX_LAYOUT, Path(args.src_path), Path(args.dst_path), args.src, args.dst, args.save_precision,
                 args.overwrite, PEFT_FORMATS)  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
