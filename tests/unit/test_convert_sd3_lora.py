"""networks/convert_sd3_lora.py against diffusers itself: an SD3 LoRA converted to PEFT keys and loaded through
SD3LoraLoaderMixin into SD3Transformer2DModel (built from the same weights by diffusers' own checkpoint converter)
and into CLIP gives what our MMDiT and CLIP give with the original LoRA; the way back keeps every delta."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders import SD3LoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from library.errors import UserError
from library.models.sd3.model import MMDiT
from library.models.sd3.tiny import make_sd3_state_dict, tiny_sd3_params
from networks import lora_flux, lora_sd3
from networks.convert_sd3_lora import diffusers_to_sd_scripts, sd_scripts_to_diffusers
from networks.lora import lora_delta, lora_scale
from tests.unit.test_lora import randomize, tiny_clip, tiny_flux, tiny_t5, token_ids

pytest.importorskip("peft")


def model_pair(variant: str) -> tuple[MMDiT, SD3Transformer2DModel]:
    params = tiny_sd3_params(variant)
    state = make_sd3_state_dict(params, seed=1)
    with torch.device("meta"):
        ours = MMDiT(params)
        reference = SD3Transformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=params.depth, attention_head_dim=64,
            num_attention_heads=params.depth, caption_projection_dim=64 * params.depth,
            joint_attention_dim=params.context_in_dim, pooled_projection_dim=params.adm_in_dim,
            pos_embed_max_size=params.pos_embed_max_size, qk_norm="rms_norm" if params.qk_norm else None,
            dual_attention_layers=params.x_block_self_attn_layers,
        )  # fmt: skip
    ours.load_state_dict(state, assign=True)
    reference.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(state)), strict=True, assign=True)
    return ours.eval(), reference.eval()


def inputs_for(model: MMDiT) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(2, 16, 8, 6, generator=gen),
        timesteps=torch.tensor([0.3, 0.87]) * 1000,
        y=torch.randn(2, model.params.adm_in_dim, generator=gen),
        context=torch.randn(2, 7, model.params.context_in_dim, generator=gen),
    )


def reference_output(reference: SD3Transformer2DModel, inputs: dict) -> torch.Tensor:
    return reference(hidden_states=inputs["x"], encoder_hidden_states=inputs["context"],
                     pooled_projections=inputs["y"], timestep=inputs["timesteps"], return_dict=False)[0]  # fmt: skip


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize(("variant", "split_qkv"), [("medium", "False"), ("5-medium", "True"), ("5-large", "False")])
@torch.no_grad()
def test_diffusers_loads_the_converted_lora_and_gives_the_same_output(variant, split_qkv):
    ours, reference = model_pair(variant)
    inputs = inputs_for(ours)
    base = ours(**inputs)
    network = lora_sd3.create_network(1.0, 4, 2.0, None, None, ours, emb_dims="[4,4,4,4,4,4]", split_qkv=split_qkv,
                                      x_mlp_dim="6", context_mod_dim="3")  # fmt: skip
    randomize(network, std=0.03)
    network.apply_to(None, ours)
    expected = ours(**inputs)
    network.remove()
    assert relative_error(base, expected) > 0.01  # the LoRA matters

    converted = sd_scripts_to_diffusers(network.state_dict())
    assert all(k.startswith("transformer.") for k in converted)
    SD3LoraLoaderMixin.load_lora_into_transformer(converted, reference)  # the pipeline's path, no alphas
    loaded = {n for n, _ in reference.named_modules() if n.endswith(".lora_A.default_0")}
    assert len(loaded) == len(converted) // 2  # every converted module became a PEFT layer
    assert relative_error(reference_output(reference, inputs), expected) <= 1e-4


@torch.no_grad()
def test_clip_parts_load_into_diffusers_text_encoders_and_t5_is_left_out(caplog):
    mmdit, _ = model_pair("medium")
    clip_l, clip_g, t5, ids = tiny_clip(), tiny_clip(), tiny_t5(), token_ids()
    copies = copy.deepcopy(clip_l), copy.deepcopy(clip_g)
    network = lora_sd3.create_network(1.0, 4, 8.0, None, [clip_l, clip_g, t5], mmdit, train_t5xxl="True")
    randomize(network, std=0.05)
    network.apply_to([clip_l, clip_g, t5], mmdit)
    expected = clip_l(ids).last_hidden_state, clip_g(ids).last_hidden_state
    network.remove()
    with caplog.at_level("WARNING"):
        converted = sd_scripts_to_diffusers(network.state_dict())
    assert "14 T5-XXL modules (lora_te3_) left out" in caplog.text  # 2 blocks x 7 layers of the tiny T5
    assert not any("te3" in k or "encoder.block" in k for k in converted)
    for copy_, prefix, out in zip(copies, ("text_encoder", "text_encoder_2"), expected):
        assert relative_error(copy_(ids).last_hidden_state, out) > 1e-3
        SD3LoraLoaderMixin.load_lora_into_text_encoder(converted, None, copy_, prefix=prefix)
        torch.testing.assert_close(copy_(ids).last_hidden_state, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split_qkv", ["False", "True"])
def test_back_to_sd_scripts_keeps_every_delta_and_rank(split_qkv):
    mmdit, _ = model_pair("5-medium")
    clip = tiny_clip()
    network = lora_sd3.create_network(1.0, 4, 1.0, None, [clip, clip], mmdit, emb_dims="[2,2,2,2,2,2]",
                                      split_qkv=split_qkv)  # fmt: skip
    randomize(network)
    original = network.state_dict()
    back = diffusers_to_sd_scripts(sd_scripts_to_diffusers(original))
    assert back.keys() == original.keys()
    for name in {k.partition(".")[0] for k in original}:
        down, up = back[f"{name}.lora_down.weight"], back[f"{name}.lora_up.weight"]
        assert down.shape == original[f"{name}.lora_down.weight"].shape, name  # same rank, split or not
        delta = lora_delta(down, up) * lora_scale(back[f"{name}.alpha"], down.shape[0])
        expected = lora_delta(original[f"{name}.lora_down.weight"], original[f"{name}.lora_up.weight"])
        torch.testing.assert_close(delta, expected * lora_scale(original[f"{name}.alpha"], down.shape[0]), msg=name)


def test_peft_lora_alpha_from_the_file_metadata_is_kept():
    a, b = torch.randn(4, 128), torch.randn(128, 4)
    state = {"transformer.context_embedder.lora_A.weight": a, "transformer.context_embedder.lora_B.weight": b}
    metadata = {"lora_adapter_metadata": '{"transformer.lora_alpha": 8, "transformer.r": 4}'}
    back = diffusers_to_sd_scripts(state, metadata)
    delta = lora_delta(back["lora_unet_context_embedder.lora_down.weight"],
                       back["lora_unet_context_embedder.lora_up.weight"])  # fmt: skip
    torch.testing.assert_close(delta * lora_scale(back["lora_unet_context_embedder.alpha"], 4), 2.0 * b @ a)
    with pytest.raises(UserError, match="alpha_pattern"):
        diffusers_to_sd_scripts(state, {"lora_adapter_metadata": '{"transformer.alpha_pattern": {"x": 2}}'})


def test_other_files_are_one_line_errors():
    flux_lora = lora_flux.create_network(1.0, 4, 1.0, None, None, tiny_flux()).state_dict()
    with pytest.raises(UserError, match=r"not an SD3/SD3.5 LoRA: lora_unet_double_blocks_0_\w+ .*\(a FLUX.1 LoRA\?\)"):
        sd_scripts_to_diffusers(flux_lora, "flux.safetensors")
    with pytest.raises(UserError, match="not an sd-scripts LoRA .*a diffusers/PEFT LoRA"):
        sd_scripts_to_diffusers({"transformer.proj_out.lora_A.weight": torch.zeros(4, 8)})
    with pytest.raises(UserError, match="dora_scale"):
        sd_scripts_to_diffusers({"lora_unet_context_embedder.lora_down.weight": torch.zeros(4, 8),
                                 "lora_unet_context_embedder.lora_up.weight": torch.zeros(8, 4),
                                 "lora_unet_context_embedder.dora_scale": torch.zeros(8)})  # fmt: skip
    with pytest.raises(UserError, match="already an sd-scripts LoRA"):
        diffusers_to_sd_scripts(flux_lora)
    with pytest.raises(UserError, match="transformer.single_transformer_blocks.0.proj_mlp is no SD3"):
        diffusers_to_sd_scripts(
            {
                "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.zeros(4, 8),
                "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.zeros(8, 4),
            }
        )
