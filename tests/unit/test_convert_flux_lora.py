"""networks/convert_flux_lora.py against diffusers itself: a FLUX.1 LoRA (every layer kind, the final layer, CLIP-L
and T5-XXL) converted to ai-toolkit keys is read by FluxLoraLoaderMixin's own path into FluxTransformer2DModel
(built from the same weights by diffusers' checkpoint converter) and CLIP, and gives what our model gives with the
original file; the way back keeps every delta, T5 included, and this project's loader reads it."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from library.errors import UserError
from library.models.flux.model import Flux
from library.models.flux.sampling import pack_latents, prepare_img_ids
from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params
from library.models.sd3.model import MMDiT
from library.models.sd3.tiny import tiny_sd3_params
from networks import lora_flux, lora_sd3
from networks.convert_flux_lora import FLUX_LAYOUT, ai_toolkit_to_sd_scripts, sd_scripts_to_ai_toolkit
from networks.convert_lora_common import fold_alpha
from networks.convert_sd3_lora import sd_scripts_to_diffusers
from networks.lora import LoRANetwork, LoRATarget, lora_delta, lora_scale
from tests.helpers import flux_state_to_diffusers
from tests.unit.test_lora import randomize, tiny_clip, tiny_t5, token_ids

pytest.importorskip("peft")

CONTEXT, VEC = 80, 96


def model_pair(hidden: int) -> tuple[Flux, FluxTransformer2DModel, dict]:
    """Our FLUX.1 and diffusers' from the same BFL weights (one block of each kind), and inputs."""
    params = tiny_flux_params(hidden_size=hidden, depth=1, depth_single_blocks=1, vec_in_dim=VEC,
                              context_in_dim=CONTEXT)  # fmt: skip
    state = make_flux_state_dict(params, seed=1)
    with torch.device("meta"):
        ours = Flux(params)
        reference = FluxTransformer2DModel(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                           num_attention_heads=hidden // 128, joint_attention_dim=CONTEXT,
                                           pooled_projection_dim=VEC, guidance_embeds=True)  # fmt: skip
    ours.load_state_dict(state, assign=True)
    converted = (convert_flux_transformer_checkpoint_to_diffusers(dict(state)) if hidden == 3072
                 else flux_state_to_diffusers(state, hidden))  # fmt: skip
    reference.load_state_dict(converted, strict=True, assign=True)
    gen = torch.Generator().manual_seed(0)
    inputs = dict(img=pack_latents(torch.randn(2, 16, 6, 4, generator=gen)), img_ids=prepare_img_ids(2, 6, 4),
                  txt=torch.randn(2, 7, CONTEXT, generator=gen), txt_ids=torch.zeros(2, 7, 3),
                  y=torch.randn(2, VEC, generator=gen), timesteps=torch.tensor([0.3, 0.85]),
                  guidance=torch.tensor([3.5, 1.0]))  # fmt: skip
    return ours.eval(), reference.eval(), inputs


def reference_output(reference: FluxTransformer2DModel, inputs: dict) -> torch.Tensor:
    return reference(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"],
                     pooled_projections=inputs["y"], timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0],
                     txt_ids=inputs["txt_ids"][0], guidance=inputs["guidance"], return_dict=False)[0]  # fmt: skip


def final_layer_network(flux: Flux) -> LoRANetwork:
    """upstream's lora_flux has no final-layer targets, but other trainers' files do: ranks 4, alpha 1."""
    final = flux.final_layer
    targets = [LoRATarget("lora_unet_final_layer_linear", final.linear, 4, 1.0),
               LoRATarget("lora_unet_final_layer_adaLN_modulation_1", final.adaLN_modulation[1], 4, 1.0)]  # fmt: skip
    return LoRANetwork(targets, [], [])


def full_lora(flux: Flux, clip, t5, split_qkv: str) -> tuple[list[LoRANetwork], dict[str, torch.Tensor]]:
    network = lora_flux.create_network(1.0, 4, 2.0, None, [clip, t5], flux, in_dims="[4,2,2,2,4]",
                                       split_qkv=split_qkv, train_t5xxl="True")  # fmt: skip
    final = final_layer_network(flux)
    randomize(network, std=0.02)
    randomize(final, seed=7, std=0.02)
    return [network, final], {**network.state_dict(), **final.state_dict()}


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class PipelineParts(FluxLoraLoaderMixin):
    """What FluxPipeline.load_lora_weights uses of the pipeline: its transformer, CLIP-L and components."""

    hf_device_map = None

    def __init__(self, transformer: FluxTransformer2DModel, text_encoder: torch.nn.Module):
        self.transformer, self.text_encoder = transformer, text_encoder

    @property
    def components(self) -> dict:
        return {"transformer": self.transformer, "text_encoder": self.text_encoder}


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out - expected).abs().max() / expected.abs().max()).item()


def check_diffusers_parity(hidden: int, split_qkv: str) -> None:
    ours, reference, inputs = model_pair(hidden)
    clip, t5, ids = tiny_clip(), tiny_t5(), token_ids()
    clip_copy = copy.deepcopy(clip)
    base = ours(**inputs)
    networks, saved = full_lora(ours, clip, t5, split_qkv)
    for network in networks:
        network.apply_to([clip, t5], ours)
    expected, expected_clip = ours(**inputs), clip(ids).last_hidden_state
    for network in reversed(networks):
        network.remove()
    assert relative_error(base, expected) > 0.01  # the LoRA matters

    converted = sd_scripts_to_ai_toolkit(saved)
    warnings = _Warnings()
    logging.getLogger("diffusers").addHandler(warnings)
    try:
        PipelineParts(reference, clip_copy).load_lora_weights(dict(converted))  # FluxPipeline.load_lora_weights' path
    finally:
        logging.getLogger("diffusers").removeHandler(warnings)
    assert warnings.messages == []  # nothing unexpected, nothing left out (the T5 keys are not its business)
    modules = {k.rpartition(".lora_")[0] for k in converted}
    transformer = {m for m in modules if m.startswith("transformer.")}
    clip_modules = {m for m in modules if m.startswith("text_encoder.")}
    assert modules == transformer | clip_modules | {m for m in modules if m.startswith("text_encoder_2.encoder.")}
    loaded = {"transformer." + n.removesuffix(".lora_A.default_0") for n, _ in reference.named_modules()
              if n.endswith(".lora_A.default_0")}  # fmt: skip
    assert loaded == transformer  # every transformer key became a PEFT layer
    # transformers 5's CLIPTextModel has no text_model level; diffusers maps the file's paths onto it
    loaded_clip = {n.removesuffix(".lora_A.default_0").removeprefix("text_model.")
                   for n, _ in clip_copy.named_modules() if n.endswith(".lora_A.default_0")}  # fmt: skip
    clip_paths = {m.removeprefix("text_encoder.text_model.") for m in clip_modules}
    assert loaded_clip == clip_paths and len(clip_paths) == 12
    assert "transformer.norm_out.linear" in transformer and "transformer.single_transformer_blocks.0.proj_mlp" in loaded
    with torch.no_grad():
        assert relative_error(reference_output(reference, inputs), expected) <= 1e-4
        torch.testing.assert_close(clip_copy(ids).last_hidden_state, expected_clip, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split_qkv", ["False", "True"])
@torch.no_grad()
def test_diffusers_flux_loader_reads_every_key_and_gives_the_same_output(split_qkv):
    check_diffusers_parity(256, split_qkv)


@pytest.mark.slow
@torch.no_grad()
def test_the_same_on_a_3072_wide_model():
    check_diffusers_parity(3072, "True")


def assert_same_deltas(back: dict, original: dict) -> None:
    assert back.keys() == original.keys()
    for name in {k.partition(".")[0] for k in original}:
        down, up = back[f"{name}.lora_down.weight"], back[f"{name}.lora_up.weight"]
        assert down.shape == original[f"{name}.lora_down.weight"].shape, name  # same rank, split or not
        delta = lora_delta(down, up) * lora_scale(back[f"{name}.alpha"], down.shape[0])
        expected = lora_delta(original[f"{name}.lora_down.weight"], original[f"{name}.lora_up.weight"])
        expected = expected * lora_scale(original[f"{name}.alpha"], down.shape[0])
        torch.testing.assert_close(delta, expected, msg=name)


@pytest.mark.parametrize("split_qkv", ["False", "True"])
@torch.no_grad()
def test_round_trip_keeps_every_delta_t5_included_and_our_loader_reads_it(split_qkv):
    flux, _, inputs = model_pair(256)
    clip, t5, ids = tiny_clip(), tiny_t5(), token_ids()
    networks, saved = full_lora(flux, clip, t5, split_qkv)
    converted = sd_scripts_to_ai_toolkit(saved)
    t5_keys = [k for k in converted if k.startswith("text_encoder_2.")]
    assert "text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wi_0.lora_A.weight" in t5_keys
    assert len(t5_keys) == 2 * 14  # 2 blocks x 7 layers, as many as the sd-scripts file has
    back = ai_toolkit_to_sd_scripts(converted)
    assert_same_deltas(back, saved)

    network = networks[0]
    network.apply_to([clip, t5], flux)
    expected, expected_t5 = flux(**inputs), t5(ids).last_hidden_state
    network.remove()
    without_final = {k: v for k, v in back.items() if "final_layer" not in k}
    rebuilt, _ = lora_flux.create_network_from_weights(1.0, None, None, [clip, t5], flux, without_final)
    rebuilt.load_weights(without_final, strict=True)
    rebuilt.apply_to([clip, t5], flux)
    torch.testing.assert_close(t5(ids).last_hidden_state, expected_t5)
    torch.testing.assert_close(flux(**inputs), expected)
    rebuilt.remove()


def test_split_qkv_converts_to_its_small_form_and_a_plain_file_shares_its_down():
    flux, _, _ = model_pair(256)
    split = lora_flux.create_network(1.0, 4, 4.0, None, None, flux, split_qkv="True")  # alpha/rank 1
    randomize(split)
    saved = split.state_dict()
    converted = sd_scripts_to_ai_toolkit(saved)
    assert sum(v.numel() for v in converted.values()) < sum(v.numel() for v in saved.values())
    block = "transformer.single_transformer_blocks.0."
    assert converted[block + "attn.to_q.lora_A.weight"].shape == (4, 256)
    assert converted[block + "proj_mlp.lora_B.weight"].shape == (1024, 4)
    assert converted["transformer.transformer_blocks.0.attn.add_v_proj.lora_B.weight"].shape == (256, 4)
    fused_down = saved["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    torch.testing.assert_close(converted[block + "attn.to_k.lora_A.weight"], fused_down[4:8])

    plain = lora_flux.create_network(1.0, 4, 1.0, None, None, flux)
    randomize(plain)
    converted = sd_scripts_to_ai_toolkit(plain.state_dict())
    downs = [converted[f"{block}attn.to_{p}.lora_A.weight"] for p in "qkv"] + [
        converted[block + "proj_mlp.lora_A.weight"]
    ]
    assert all(torch.equal(d, downs[0]) for d in downs) and downs[0].shape == (4, 256)  # written once per part
    assert ai_toolkit_to_sd_scripts(converted)["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (4, 256)


def test_alpha_is_folded_by_powers_of_two():
    down, up = torch.randn(128, 16), torch.randn(32, 128)
    a, b = fold_alpha(down, up, 1 / 128)
    torch.testing.assert_close(a, down / 16)
    torch.testing.assert_close(b, up / 8)
    a, b = fold_alpha(down, up, 4.0)
    torch.testing.assert_close(a, down * 4)
    torch.testing.assert_close(b, up)


def test_partial_peft_files_fuse_with_zero_rows_and_missing_mlp_width_from_the_rule():
    a, b = torch.randn(2, 256), torch.randn(256, 2)
    state = {"transformer.single_transformer_blocks.3.attn.to_q.lora_A.weight": a,
             "transformer.single_transformer_blocks.3.attn.to_q.lora_B.weight": b}  # fmt: skip
    back = ai_toolkit_to_sd_scripts(state)
    up = back["lora_unet_single_blocks_3_linear1.lora_up.weight"]
    assert up.shape == (256 * 7, 2) and torch.equal(up[:256], b) and not up[256:].any()


def test_other_files_are_one_line_errors():
    with torch.device("meta"):
        mmdit = MMDiT(tiny_sd3_params("5-medium"))
    sd3 = lora_sd3.create_network(1.0, 4, 1.0, None, None, mmdit, emb_dims="[2,2,2,2,2,2]")
    sd3_state = {k: torch.ones(shape) for k, shape in sd3.saved_shapes().items()}
    with pytest.raises(UserError, match=r"not a FLUX.1 LoRA: lora_unet_\w+ is no FLUX.1 module \(an SD3/SD3.5 LoRA\?\)"
                       r"; convert it with networks/convert_sd3_lora.py"):  # fmt: skip
        sd_scripts_to_ai_toolkit(sd3_state, "sd3.safetensors")
    sd3_peft = sd_scripts_to_diffusers(sd3_state)
    with pytest.raises(UserError, match=r"transformer\.\S+ is no FLUX.1 module \(an SD3/SD3.5 LoRA\?\)"):
        ai_toolkit_to_sd_scripts(sd3_peft)
    with pytest.raises(UserError, match="its metadata says networks.lora_sd3"):
        FLUX_LAYOUT.check_metadata({"ss_network_module": "networks.lora_sd3"}, "x.safetensors")
    FLUX_LAYOUT.check_metadata({"ss_network_module": "networks.lora_flux", "modelspec.architecture": "flux-1-dev/lora"},
                               "x.safetensors")  # fmt: skip

    q = "transformer.transformer_blocks.0.attn.to_q"
    k = "transformer.transformer_blocks.0.attn.to_k"
    with pytest.raises(UserError, match="different input widths"):
        ai_toolkit_to_sd_scripts({f"{q}.lora_A.weight": torch.zeros(2, 256), f"{q}.lora_B.weight": torch.zeros(256, 2),
                                  f"{k}.lora_A.weight": torch.zeros(2, 128), f"{k}.lora_B.weight": torch.zeros(256, 2)})  # fmt: skip
    with pytest.raises(UserError, match=f"{q} has lora_A.weight but no lora_B.weight"):
        ai_toolkit_to_sd_scripts({f"{q}.lora_A.weight": torch.zeros(2, 256)})
    with pytest.raises(UserError, match="lora_A of rank 2 but lora_B of rank 3"):
        ai_toolkit_to_sd_scripts({f"{q}.lora_A.weight": torch.zeros(2, 256), f"{q}.lora_B.weight": torch.zeros(256, 3)})
    bias = "text_encoder_2.encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    with pytest.raises(UserError, match=f"{bias} is no T5-XXL module"):
        ai_toolkit_to_sd_scripts(
            {f"{bias}.lora_A.weight": torch.zeros(2, 32), f"{bias}.lora_B.weight": torch.zeros(2, 2)}
        )
    with pytest.raises(UserError, match="do not split into"):
        sd_scripts_to_ai_toolkit({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(2, 256),
                                  "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(700, 2)})  # fmt: skip
