"""FLUX.1 LoRA files as upstream writes them: names per option, split_qkv saved fused, dim_from_weights, and files
that diffusers' own kohya converter and ComfyUI's key rules read completely."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from torch import nn

from library.errors import UserError
from library.models.flux.model import Flux
from library.models.flux.sampling import pack_latents, prepare_img_ids
from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params
from networks.lora import merge_lora_weight
from networks.lora_flux import create_network, create_network_from_weights
from tests.unit.test_lora import flux_inputs, randomize, tiny_clip, tiny_flux, tiny_t5, token_ids

DOUBLE_LAYERS = ("mod_lin", "attn_qkv", "attn_proj", "mlp_0", "mlp_2")
SINGLE_LAYERS = ("linear1", "linear2", "modulation_lin")
IN_LAYER_NAMES = ("img_in", "time_in_in_layer", "time_in_out_layer", "vector_in_in_layer", "vector_in_out_layer",
                  "guidance_in_in_layer", "guidance_in_out_layer", "txt_in")  # fmt: skip


def meta_flux(depth: int = 2, single: int = 2, guidance: bool = True) -> Flux:
    """Shapes only: enough to build and name a network."""
    with torch.device("meta"):
        return Flux(tiny_flux_params(depth=depth, depth_single_blocks=single, guidance_embed=guidance))


def names_of(network) -> set[str]:
    return {lora.lora_name for lora in network.loras}


def ranks_of(network) -> dict[str, int]:
    return {lora.lora_name: lora.lora_dim for lora in network.loras}


def test_saved_keys_are_upstreams_names():
    flux, clip, t5 = tiny_flux(), tiny_clip(), tiny_t5()
    network = create_network(1.0, 4, 1.0, None, [clip, t5], flux, train_t5xxl="True", in_dims="[1,1,1,1,1]")
    keys = set(network.state_dict())
    for literal in (
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
        "lora_unet_double_blocks_1_txt_mlp_2.lora_up.weight",
        "lora_unet_double_blocks_0_img_mod_lin.alpha",
        "lora_unet_single_blocks_1_linear1.alpha",
        "lora_unet_single_blocks_0_modulation_lin.lora_down.weight",
        "lora_unet_time_in_out_layer.lora_up.weight",
        "lora_unet_txt_in.lora_down.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
        "lora_te1_text_model_encoder_layers_1_mlp_fc2.alpha",
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight",
        "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_1.lora_up.weight",
    ):
        assert literal in keys, literal
    expected = {f"lora_unet_double_blocks_{i}_{s}_{layer}" for i in range(2) for s in ("img", "txt")
                for layer in DOUBLE_LAYERS}  # fmt: skip
    expected |= {f"lora_unet_single_blocks_{i}_{layer}" for i in range(2) for layer in SINGLE_LAYERS}
    expected |= {f"lora_unet_{layer}" for layer in IN_LAYER_NAMES}
    clip_layers = (
        "self_attn_q_proj",
        "self_attn_k_proj",
        "self_attn_v_proj",
        "self_attn_out_proj",
        "mlp_fc1",
        "mlp_fc2",
    )
    expected |= {f"lora_te1_text_model_encoder_layers_{i}_{layer}" for i in range(2) for layer in clip_layers}
    expected |= {f"lora_te3_encoder_block_{i}_{layer}" for i in range(2) for layer in
                 ("layer_0_SelfAttention_q", "layer_0_SelfAttention_k", "layer_0_SelfAttention_v",
                  "layer_0_SelfAttention_o", "layer_1_DenseReluDense_wi_0", "layer_1_DenseReluDense_wi_1",
                  "layer_1_DenseReluDense_wo")}  # fmt: skip
    assert keys == {
        f"{name}.{suffix}" for name in expected for suffix in ("lora_down.weight", "lora_up.weight", "alpha")
    }

    plain = create_network(1.0, 4, 1.0, None, [clip, t5], flux)
    assert not any(n.startswith(("lora_te3_", "lora_unet_img_in", "lora_unet_time_in")) for n in names_of(plain))
    schnell = create_network(1.0, 4, 1.0, None, None, meta_flux(guidance=False), in_dims="[1,1,1,1,1]")
    assert not any("guidance_in" in n for n in names_of(schnell)) and "lora_unet_vector_in_in_layer" in names_of(
        schnell
    )


def _blocks(network) -> set[str]:
    return {"_".join(n.split("_")[2:5]) for n in names_of(network) if "_blocks_" in n}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({}, {"double_blocks_0", "double_blocks_1", "double_blocks_2"} | {f"single_blocks_{i}" for i in range(5)}),
        ({"train_blocks": "double"}, {"double_blocks_0", "double_blocks_1", "double_blocks_2"}),
        ({"train_blocks": "single", "train_single_block_indices": "0,2-3"},
         {"single_blocks_0", "single_blocks_2", "single_blocks_3"}),
        ({"train_double_block_indices": "1", "train_single_block_indices": "none"}, {"double_blocks_1"}),
        ({"train_double_block_indices": "none", "train_single_block_indices": "4"}, {"single_blocks_4"}),
        ({"train_double_block_indices": "0-2", "train_single_block_indices": "all", "train_blocks": "all"},
         {"double_blocks_0", "double_blocks_1", "double_blocks_2"} | {f"single_blocks_{i}" for i in range(5)}),
        ({"train_double_block_indices": "2"}, {"double_blocks_2"} | {f"single_blocks_{i}" for i in range(5)}),
    ],
)  # fmt: skip
def test_block_selection(args, expected):
    network = create_network(1.0, 4, 1.0, None, None, meta_flux(depth=3, single=5), **args)
    assert _blocks(network) == expected
    allowed = {f"{s}_{layer}" for s in ("img", "txt") for layer in DOUBLE_LAYERS} | set(SINGLE_LAYERS)
    assert {n.split("_", 5)[5] for n in names_of(network)} <= allowed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"train_double_block_indices": "3"}, "train_double_block_indices=3"),
        ({"train_single_block_indices": "3-1"}, "train_single_block_indices=3-1"),
        ({"train_single_block_indices": "a"}, "'a' is not an index"),
        ({"train_blocks": "both"}, "train_blocks=both"),
        ({"in_dims": "[1,2]"}, "in_dims"),
        ({"img_attn_dim": "x"}, "img_attn_dim=x"),
        ({"split_qkv": "yes"}, "split_qkv=yes"),
        ({"ggpo_beta": "0.01"}, "ggpo_beta and ggpo_sigma go together"),
        ({"network_reg_lrs": "double=fast"}, "network_reg_lrs"),
        ({"network_reg_dims": "double=x"}, "network_reg_dims"),
    ],
)
def test_bad_network_args_are_user_errors(args, message):
    with pytest.raises(UserError, match=message):
        create_network(1.0, 4, 1.0, None, None, meta_flux(depth=3, single=3), **args)


def test_per_layer_ranks_in_dims_and_regex_dims():
    flux = meta_flux()
    ranks = ranks_of(create_network(1.0, 4, 1.0, None, None, flux, img_attn_dim="8", txt_attn_dim="3",
                                    img_mlp_dim="5", txt_mlp_dim="0", img_mod_dim="6", txt_mod_dim="7",
                                    single_dim="2", single_mod_dim="0", in_dims="[4,0,2,0,3]"))  # fmt: skip
    for i in range(2):
        block = f"lora_unet_double_blocks_{i}_"
        assert [ranks[block + n] for n in ("img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "img_mlp_0", "img_mlp_2",
                                           "img_mod_lin", "txt_mod_lin")] == [8, 8, 3, 5, 5, 6, 7]  # fmt: skip
        assert block + "txt_mlp_0" not in ranks and block + "txt_mlp_2" not in ranks
        single = f"lora_unet_single_blocks_{i}_"
        assert ranks[single + "linear1"] == ranks[single + "linear2"] == 2 and single + "modulation_lin" not in ranks
    in_ranks = {n: r for n, r in ranks.items() if "_blocks_" not in n}
    assert in_ranks == {"lora_unet_img_in": 4, "lora_unet_vector_in_in_layer": 2, "lora_unet_vector_in_out_layer": 2,
                        "lora_unet_txt_in": 3}  # fmt: skip

    ranks = ranks_of(create_network(1.0, 4, 1.0, None, None, flux, single_dim="2",
                                    network_reg_dims="double_blocks_1_img=16"))  # fmt: skip
    assert ranks["lora_unet_double_blocks_1_img_attn_qkv"] == 16 and ranks["lora_unet_double_blocks_1_txt_mlp_0"] == 4
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 4 and ranks["lora_unet_single_blocks_0_linear1"] == 2


@torch.no_grad()
def test_split_qkv_trains_parts_and_saves_a_fused_file_with_the_same_effect():
    flux = tiny_flux()
    inputs = flux_inputs()
    network = create_network(1.0, 4, 2.0, None, None, flux, split_qkv="True")
    qkv = network.get_submodule("lora_unet_double_blocks_0_img_attn_qkv")
    linear1 = network.get_submodule("lora_unet_single_blocks_1_linear1")
    assert [up.out_features for up in qkv.lora_up] == [256] * 3 and len(qkv.lora_down) == 3
    assert [up.out_features for up in linear1.lora_up] == [256, 256, 256, 1024]
    randomize(network)
    network.apply_to(None, flux)
    split_out = flux(**inputs)
    network.remove()

    saved = network.state_dict()
    assert saved["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 256)
    assert saved["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (768, 12)
    assert saved["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (1792, 16)
    assert float(saved["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 6.0  # 3 parts: alpha/rank stays 2/4
    assert float(saved["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == 2.0

    for lora in (qkv, linear1):  # merged from the parts vs merged from the fused file by the shared helper
        weight = lora.org_module.weight
        parts = torch.cat([up.weight @ down.weight for down, up in zip(lora.lora_down, lora.lora_up)]) * lora.scale
        name = lora.lora_name
        from_file = merge_lora_weight(weight, saved[f"{name}.lora_down.weight"], saved[f"{name}.lora_up.weight"],
                                      saved[f"{name}.alpha"])  # fmt: skip
        torch.testing.assert_close(from_file, weight + parts)

    plain, _ = create_network_from_weights(1.0, None, None, None, flux, saved)
    assert plain.get_submodule(qkv.lora_name).split_dims is None and plain.get_submodule(qkv.lora_name).lora_dim == 12
    plain.load_weights(saved)
    plain.apply_to(None, flux)
    torch.testing.assert_close(flux(**inputs), split_out)
    plain.remove()

    again = create_network(1.0, 4, 2.0, None, None, flux, split_qkv="True")
    again.load_weights(saved)
    for (name, param), (_, loaded) in zip(network.named_parameters(), again.named_parameters()):
        assert torch.equal(param, loaded), name
    assert again.get_submodule(qkv.lora_name).scale == qkv.scale

    saved["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"][0, 11] = 1.0  # q rows reading v's rank
    with pytest.raises(UserError, match="lora_unet_double_blocks_0_img_attn_qkv cannot be split"):
        again.load_weights(saved)


@torch.no_grad()
def test_create_network_from_weights_reproduces_ranks_and_alphas(tmp_path):
    flux, clip, t5 = tiny_flux(), tiny_clip(), tiny_t5()
    inputs, ids = flux_inputs(), token_ids()
    args = dict(
        img_attn_dim="8", single_dim="2", txt_mod_dim="0", in_dims="[2,0,0,0,6]", network_reg_dims="lora_te3_.*=5"
    )
    network = create_network(1.0, 4, 3.0, None, [clip, t5], flux, train_t5xxl="True", **args)
    randomize(network)
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, None, None)
    network.apply_to([clip, t5], flux)
    expected, expected_t5 = flux(**inputs), t5(ids).last_hidden_state
    network.remove()

    rebuilt, weights = create_network_from_weights(0.5, str(path), None, [clip, t5], flux, for_inference=True)
    shape = {lora.lora_name: (lora.lora_dim, float(lora.alpha)) for lora in network.loras}
    assert {lora.lora_name: (lora.lora_dim, float(lora.alpha)) for lora in rebuilt.loras} == shape
    assert shape["lora_unet_double_blocks_1_img_attn_proj"] == (8, 3.0) and shape["lora_unet_txt_in"] == (6, 3.0)
    assert shape["lora_te3_encoder_block_0_layer_0_SelfAttention_q"] == (5, 3.0)
    assert not rebuilt.training and not any(p.requires_grad for p in rebuilt.parameters())
    rebuilt.load_weights(weights)
    rebuilt.set_multiplier(1.0)
    rebuilt.apply_to([clip, t5], flux)
    torch.testing.assert_close(flux(**inputs), expected)
    torch.testing.assert_close(t5(ids).last_hidden_state, expected_t5)
    rebuilt.remove()

    no_t5 = {k: v for k, v in weights.items() if not k.startswith("lora_te3_")}
    no_t5.pop("lora_unet_txt_in.alpha")  # no alpha: alpha = rank, as upstream and ComfyUI read it
    unet_and_clip, _ = create_network_from_weights(1.0, None, None, [clip, t5], flux, no_t5)
    assert not any(n.startswith("lora_te3_") for n in names_of(unet_and_clip))
    assert float(unet_and_clip.get_submodule("lora_unet_txt_in").alpha) == 6.0


def test_unknown_keys_in_a_file_are_user_errors():
    flux = tiny_flux()
    network = create_network(1.0, 4, 1.0, None, None, flux)
    weights = dict(network.state_dict())
    weights["lora_unet_double_blocks_9_img_attn_qkv.lora_down.weight"] = torch.zeros(4, 256)
    weights["lora_unet_double_blocks_9_img_attn_qkv.lora_up.weight"] = torch.zeros(768, 4)
    with pytest.raises(UserError, match="lora_unet_double_blocks_9_img_attn_qkv"):
        create_network_from_weights(1.0, None, None, None, flux, weights)
    with pytest.raises(UserError, match="lora_unet_double_blocks_9_img_attn_qkv.lora_down.weight"):
        network.load_weights(weights, strict=True)
    dora = {**network.state_dict(), "lora_unet_double_blocks_0_img_attn_qkv.dora_scale": torch.ones(768, 1)}
    for strict in (True, False):  # a DoRA file's extra tensors are never dropped silently
        with pytest.raises(UserError, match=r"lora_unet_double_blocks_0_img_attn_qkv\.dora_scale"):
            network.load_weights(dora, strict=strict)


# ---- ComfyUI -------------------------------------------------------------------------------------------------
# Rules read from ComfyUI's comfy/lora.py (comfyanonymous/ComfyUI @ 41444b5236c613ee5ff7d09aa620f94b702f30eb):
# * model_lora_keys_unet: every model weight "diffusion_model.<path>.weight" is the LoRA "lora_unet_" + <path> with
#   dots as underscores. ComfyUI's FLUX (comfy/ldm/flux) keeps Black Forest Labs' module paths, which ours has.
# * model_lora_keys_clip: CLIP-L weight "clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight" (b < 32) is
#   "lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}" for c in mlp.fc1, mlp.fc2, self_attn.{k,q,v,out}_proj;
#   T5 weight "t5xxl.transformer.<path>.weight" is "lora_te{n}_" + <path> with underscores, where n = 3 when CLIP-L
#   is present and CLIP-G is not (n = 2 is mapped too, for OneTrainer). comfy/text_encoders/t5.py keeps the
#   transformers T5 paths (encoder.block.N.layer.0.SelfAttention.q, layer.1.DenseReluDense.wi_0 ...).
# * load_lora: "<name>.lora_up.weight" makes <name> a plain LoRA, read with "<name>.lora_down.weight" and the
#   optional "<name>.alpha"; every other key is reported as "lora key not loaded".
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}  # fmt: skip


def comfyui_flux_key_map(flux: nn.Module, clip_layers: int, t5: nn.Module) -> dict[str, tuple[int, ...]]:
    """LoRA name -> shape of the weight ComfyUI patches, for a FLUX.1 + CLIP-L + T5-XXL model."""
    key_map = {}
    for key, value in flux.state_dict().items():
        if key.endswith(".weight"):
            key_map["lora_unet_" + key[: -len(".weight")].replace(".", "_")] = tuple(value.shape)
    for b in range(min(clip_layers, 32)):
        for c, lora_c in LORA_CLIP_MAP.items():
            key_map[f"lora_te1_text_model_encoder_layers_{b}_{lora_c}"] = ("clip_l", b, c)
    for key, value in t5.state_dict().items():
        if key.endswith(".weight"):
            key_map["lora_te3_" + key[: -len(".weight")].replace(".", "_")] = tuple(value.shape)
    return key_map


def comfyui_unloaded_keys(lora: dict[str, torch.Tensor], key_map: dict) -> set[str]:
    loaded = set()
    for name in key_map:
        if f"{name}.lora_up.weight" in lora:
            loaded |= {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"} & set(lora)
    return set(lora) - loaded


def test_every_saved_key_is_read_by_comfyui_rules():
    flux, clip, t5 = tiny_flux(), tiny_clip(), tiny_t5()
    key_map = comfyui_flux_key_map(flux, clip.config.num_hidden_layers, t5)
    clip_shapes = {(b, c): tuple(clip.encoder.layers[b].get_submodule(c).weight.shape) for b in range(2)
                   for c in LORA_CLIP_MAP}  # fmt: skip
    for args in ({"train_t5xxl": "True", "in_dims": "[2,2,2,2,2]"}, {"split_qkv": "True", "train_blocks": "single"}):
        network = create_network(1.0, 4, 1.0, None, [clip, t5], flux, **args)
        saved = network.state_dict()
        assert comfyui_unloaded_keys(saved, key_map) == set()
        for name in {k.partition(".")[0] for k in saved}:  # ComfyUI patches weight += up @ down: shapes must fit
            target = key_map[name]
            shape = clip_shapes[target[1:]] if target[0] == "clip_l" else target
            up, down = saved[f"{name}.lora_up.weight"], saved[f"{name}.lora_down.weight"]
            assert (up.shape[0], down.shape[1]) == shape, name
    assert comfyui_unloaded_keys({"lora_unet_double_blocks_0_img_attn_qkv.lora_mid.weight": torch.zeros(1)},
                                 key_map) == {"lora_unet_double_blocks_0_img_attn_qkv.lora_mid.weight"}  # fmt: skip


# ---- diffusers -----------------------------------------------------------------------------------------------
# diffusers' kohya FLUX converter hard-codes the split of single-block linear1 as [3072, 3072, 3072, 12288], so the
# comparison runs on a 3072-wide model with one block of each kind (as tests/unit/test_flux_parity.py does).


@pytest.fixture(scope="module")
def wide_flux_pair():
    params = tiny_flux_params(hidden_size=3072, depth=1, depth_single_blocks=1, vec_in_dim=96, context_in_dim=80)
    state = make_flux_state_dict(params, seed=1)
    with torch.device("meta"):
        ours = Flux(params)
        reference = FluxTransformer2DModel(in_channels=64, num_layers=1, num_single_layers=1, joint_attention_dim=80,
                                           pooled_projection_dim=96, guidance_embeds=True)  # fmt: skip
    ours.load_state_dict(state, assign=True)
    reference.load_state_dict(convert_flux_transformer_checkpoint_to_diffusers(dict(state)), strict=True, assign=True)
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        img=pack_latents(torch.randn(2, 16, 6, 4, generator=gen)),
        img_ids=prepare_img_ids(2, 6, 4),
        txt=torch.randn(2, 7, 80, generator=gen),
        txt_ids=torch.zeros(2, 7, 3),
        y=torch.randn(2, 96, generator=gen),
        timesteps=torch.tensor([0.3, 0.85]),
        guidance=torch.tensor([3.5, 1.0]),
    )
    return ours.eval(), reference.eval(), inputs


def reference_output(reference: nn.Module, inputs: dict) -> torch.Tensor:
    return reference(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"],
                     pooled_projections=inputs["y"], timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0],
                     txt_ids=inputs["txt_ids"][0], guidance=inputs["guidance"], return_dict=False)[0]  # fmt: skip


def diffusers_pairs(converted: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(transformer, text encoder) module path -> (A, B) from the converter's output. Its transformer keys are
    ``transformer.<path>.lora_A.weight`` (the input layers come out without the prefix); its CLIP keys are the
    older ``text_encoder.text_model.<...>.to_q_lora.down.weight`` / ``.lora_linear_layer.down.weight`` forms."""
    flux, clip = {}, {}
    for key, value in converted.items():
        if key.startswith("text_encoder."):
            path = key.removeprefix("text_encoder.text_model.").replace(".lora_linear_layer.", ".")
            for old, new in (("to_q_lora", "q_proj"), ("to_k_lora", "k_proj"), ("to_v_lora", "v_proj"),
                             ("to_out_lora", "out_proj")):  # fmt: skip
                path = path.replace(f".{old}.", f".{new}.")
            module, kind, _ = path.rsplit(".", 2)
            clip.setdefault(module, {})["A" if kind == "down" else "B"] = value
        else:
            module, kind, _ = key.removeprefix("transformer.").rsplit(".", 2)
            flux.setdefault(module, {})[kind[-1]] = value
    return {m: (p["A"], p["B"]) for m, p in flux.items()}, {m: (p["A"], p["B"]) for m, p in clip.items()}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.slow
@pytest.mark.parametrize("split_qkv", ["False", "True"])
@torch.no_grad()
def test_diffusers_converter_reads_every_key_and_gives_the_same_output(wide_flux_pair, split_qkv):
    ours, reference, inputs = wide_flux_pair
    clip, ids = tiny_clip(), token_ids()
    base = ours(**inputs)
    network = create_network(1.0, 4, 2.0, None, [clip], ours, in_dims="[4,2,2,2,4]", split_qkv=split_qkv)
    randomize(network, std=0.02)
    saved = network.state_dict()

    records = _Records()
    converter_logger = logging.getLogger(_convert_kohya_flux_lora_to_diffusers.__module__)
    converter_logger.addHandler(records)
    try:
        # clones: the converter scales text encoder tensors in place, which would change the network's own
        flux_pairs, clip_pairs = diffusers_pairs(
            _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in saved.items()})
        )
    finally:
        converter_logger.removeHandler(records)
    assert not any("Unsupported" in m or "Incompatible" in m for m in records.messages), records.messages
    parts = {"attn_qkv": 3, "linear1": 4}
    expected = sum(next((n for k, n in parts.items() if k in lora.lora_name), 1) for lora in network.unet_loras)
    assert len(flux_pairs) == expected and len(clip_pairs) == len(network.text_encoder_loras)

    modules = dict(reference.named_modules())
    originals = {path: modules[path].weight for path in flux_pairs}
    try:
        for path, (down, up) in flux_pairs.items():
            modules[path].weight = nn.Parameter(originals[path] + up @ down)
        expected_out = reference_output(reference, inputs)
    finally:
        for path, weight in originals.items():
            modules[path].weight = weight
    network.apply_to([clip], ours)
    try:
        out, out_clip = ours(**inputs), clip(ids).last_hidden_state
    finally:
        network.remove()
    assert (out - base).abs().max() > 0.01 * base.abs().max()  # the LoRA matters
    assert ((out - expected_out).abs().max() / expected_out.abs().max()).item() < 1e-4

    merged_clip = copy.deepcopy(clip)
    for path, (down, up) in clip_pairs.items():
        merged_clip.get_submodule(path).weight += up @ down
    torch.testing.assert_close(merged_clip(ids).last_hidden_state, out_clip)
