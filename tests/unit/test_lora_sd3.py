"""networks/lora_sd3.py: upstream's SD3 LoRA names and counts on the real architectures (built on the meta
device), names that are the SAI checkpoint's paths, per-kind and embedder ranks, block selection, split_qkv
files at full strength, rebuilding from a file, and one lr per text encoder."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from library.errors import UserError
from library.models.sd3.loading import load_sd3_mmdit
from library.models.sd3.model import REAL_PARAMS, MMDiT
from library.models.sd3.tiny import make_sd3_state_dict, tiny_sd3_params
from networks import lora_sd3
from tests.unit.test_lora import randomize, tiny_clip, tiny_t5, token_ids

DIFFUSION_MODEL = "model.diffusion_model."
BLOCK_LAYERS = ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1")
EMB_NAMES = (
    "lora_unet_context_embedder",
    "lora_unet_t_embedder_mlp_0",
    "lora_unet_t_embedder_mlp_2",
    "lora_unet_x_embedder_proj",
    "lora_unet_y_embedder_mlp_0",
    "lora_unet_y_embedder_mlp_2",
    "lora_unet_final_layer_adaLN_modulation_1",
    "lora_unet_final_layer_linear",
)


def meta_mmdit(variant: str) -> MMDiT:
    with torch.device("meta"):
        return MMDiT(REAL_PARAMS[variant])


def tiny_mmdit(variant: str = "5-medium", seed: int = 0) -> MMDiT:
    params = tiny_sd3_params(variant)
    with torch.device("meta"):
        model = MMDiT(params)
    model.load_state_dict(make_sd3_state_dict(params, seed), assign=True)
    return model.eval()


def mmdit_inputs(model: MMDiT, batch: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    params = model.params
    return dict(
        x=torch.randn(batch, 16, 8, 6, generator=gen),
        timesteps=torch.tensor([300.0, 850.0])[:batch],
        y=torch.randn(batch, params.adm_in_dim, generator=gen),
        context=torch.randn(batch, 7, params.context_in_dim, generator=gen),
    )


def names_of(network) -> set[str]:
    return {lora.lora_name for lora in network.loras}


def ranks_of(network) -> dict[str, int]:
    return {lora.lora_name: lora.lora_dim for lora in network.loras}


@pytest.mark.parametrize(("variant", "count"), [("medium", 237), ("5-medium", 263), ("5-large", 377)])
def test_default_modules_of_the_real_architectures(variant, count):
    params = REAL_PARAMS[variant]
    names = names_of(lora_sd3.create_network(1.0, 4, 1.0, None, None, meta_mmdit(variant)))
    assert len(names) == count
    last = params.depth - 1
    expected = {f"lora_unet_joint_blocks_{i}_{s}_block_{layer}" for i in range(last) for s in ("context", "x")
                for layer in BLOCK_LAYERS}  # fmt: skip
    expected |= {f"lora_unet_joint_blocks_{last}_x_block_{layer}" for layer in BLOCK_LAYERS}
    expected |= {f"lora_unet_joint_blocks_{last}_context_block_{layer}" for layer in ("attn_qkv", "adaLN_modulation_1")}
    expected |= {f"lora_unet_joint_blocks_{i}_x_block_attn2_{p}" for i in params.x_block_self_attn_layers
                 for p in ("qkv", "proj")}  # fmt: skip
    assert names == expected


def test_text_encoder_modules_of_the_real_encoders():
    with torch.device("meta"):
        clip_l = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        )
        clip_g = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)
        )
        t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                     feed_forward_proj="gated-gelu"))  # fmt: skip
    mmdit = meta_mmdit("medium")
    network = lora_sd3.create_network(1.0, 4, 1.0, None, [clip_l, clip_g, t5], mmdit, train_t5xxl="true")
    counts = Counter(lora.lora_name[:8] for lora in network.text_encoder_loras)
    assert counts == {"lora_te1": 72, "lora_te2": 192, "lora_te3": 168}
    names = names_of(network)
    assert {"lora_te1_text_model_encoder_layers_11_mlp_fc2", "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
            "lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_1"} <= names  # fmt: skip
    without_t5 = lora_sd3.create_network(1.0, 4, 1.0, None, [clip_l, clip_g, t5], mmdit)
    assert len(without_t5.text_encoder_loras) == 72 + 192 and len(without_t5.unet_loras) == 237


@pytest.mark.parametrize("role", ["sd3_medium", "sd3_5_medium"])
def test_names_are_the_sai_checkpoint_paths(tiny_sd3_models, role):
    """ComfyUI's rule: ``lora_unet_<path>`` patches ``diffusion_model.<path>.weight``; every name must be such a
    path, with up/down shapes that fit its weight, and the default targets are every block Linear."""
    path = tiny_sd3_models[role]
    with safe_open(str(path), "pt") as f:
        weights = {k[len(DIFFUSION_MODEL) : -len(".weight")]: tuple(f.get_slice(k).get_shape()) for k in f.keys()
                   if k.startswith(DIFFUSION_MODEL) and k.endswith(".weight")}  # fmt: skip
    by_name = {"lora_unet_" + p.replace(".", "_"): shape for p, shape in weights.items()}
    mmdit = load_sd3_mmdit(path, dtype=torch.float32)
    network = lora_sd3.create_network(1.0, 4, 1.0, None, None, mmdit, emb_dims="[2,2,2,2,2,2]")
    saved = network.state_dict()
    for name in names_of(network):
        shape = by_name[name]
        down, up = saved[f"{name}.lora_down.weight"], saved[f"{name}.lora_up.weight"]
        assert (up.shape[0], *down.shape[1:]) == shape, name
    assert set(EMB_NAMES) <= names_of(network)
    default = names_of(lora_sd3.create_network(1.0, 4, 1.0, None, None, mmdit))
    block_linears = {n for p, s in weights.items() if p.startswith("joint_blocks.") and len(s) == 2
                     for n in ["lora_unet_" + p.replace(".", "_")]}  # fmt: skip
    assert default == block_linears


def test_type_dims_emb_dims_and_conv_dim():
    mmdit = meta_mmdit("5-medium")
    ranks = ranks_of(lora_sd3.create_network(1.0, 4, 1.0, None, None, mmdit, context_attn_dim="8", context_mlp_dim="0",
                                             context_mod_dim="3", x_attn_dim="5", x_mlp_dim="6", x_mod_dim="7",
                                             emb_dims="[1,2,3,0,5,6]"))  # fmt: skip
    block = "lora_unet_joint_blocks_0_"
    assert [ranks[block + n] for n in ("context_block_attn_qkv", "context_block_attn_proj",
                                       "context_block_adaLN_modulation_1", "x_block_attn_qkv", "x_block_attn2_qkv",
                                       "x_block_attn2_proj", "x_block_mlp_fc1", "x_block_adaLN_modulation_1")] == \
        [8, 8, 3, 5, 5, 5, 6, 7]  # fmt: skip
    assert not any("context_block_mlp" in n for n in ranks)
    emb = {n: r for n, r in ranks.items() if "joint_blocks" not in n}
    assert emb == {"lora_unet_context_embedder": 1, "lora_unet_t_embedder_mlp_0": 2, "lora_unet_t_embedder_mlp_2": 2,
                   "lora_unet_x_embedder_proj": 3, "lora_unet_final_layer_adaLN_modulation_1": 5,
                   "lora_unet_final_layer_linear": 6}  # fmt: skip

    network = lora_sd3.create_network(1.0, 4, 1.0, None, None, mmdit, emb_dims="1,1,1,1,1,1", conv_dim="9",
                                      conv_alpha="3")  # fmt: skip
    conv = network.get_submodule("lora_unet_x_embedder_proj")
    assert conv.lora_dim == 9 and float(conv.alpha) == 3.0 and conv.lora_down.weight.shape == (9, 16, 2, 2)
    assert network.get_submodule("lora_unet_context_embedder").lora_dim == 1


@pytest.mark.parametrize(
    ("indices", "blocks"), [("all", {0, 1, 2}), ("none", set()), ("0,2", {0, 2}), ("1-2", {1, 2}), ("2", {2})]
)
def test_train_block_indices(indices, blocks):
    with torch.device("meta"):
        mmdit = MMDiT(tiny_sd3_params("medium", depth=3))
    network = lora_sd3.create_network(1.0, 4, 1.0, None, None, mmdit, train_block_indices=indices,
                                      emb_dims="[1,0,0,0,0,0]")  # fmt: skip
    names = names_of(network)
    assert {int(n.split("_")[4]) for n in names if "joint_blocks" in n} == blocks
    assert "lora_unet_context_embedder" in names  # embedders are not blocks


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ("3", "'3' is outside 0-2 .*this model has 3 blocks"),
        ("1-5", "'1-5' is outside 0-2 .*this model has 3 blocks"),
        ("2-1", "'2-1' is outside 0-2 \\(or reversed\\)"),
        ("x", "'x' is not an index or a range"),
    ],
)
def test_train_block_indices_beyond_the_real_depth_are_errors(indices, message):
    with torch.device("meta"):
        mmdit = MMDiT(tiny_sd3_params("medium", depth=3))
    with pytest.raises(UserError, match=rf"train_block_indices={indices}: {message}"):
        lora_sd3.create_network(1.0, 4, 1.0, None, None, mmdit, train_block_indices=indices)


def test_flux_only_args_are_one_warning(caplog):
    with caplog.at_level("WARNING"):
        lora_sd3.create_network(1.0, 4, 1.0, None, None, meta_mmdit("medium"), train_blocks="single",
                                in_dims="[1,1,1,1,1]", img_attn_dim="4")  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["--network_args img_attn_dim, in_dims, train_blocks: not used by networks.lora_sd3, ignored"]


@torch.no_grad()
def test_split_qkv_file_keeps_full_strength_and_round_trips():
    mmdit = tiny_mmdit("5-medium")
    inputs = mmdit_inputs(mmdit)
    base = mmdit(**inputs)
    network = lora_sd3.create_network(1.0, 4, 2.0, None, None, mmdit, split_qkv="True")
    qkv = network.get_submodule("lora_unet_joint_blocks_0_x_block_attn2_qkv")
    assert [up.out_features for up in qkv.lora_up] == [128] * 3
    randomize(network)
    network.apply_to(None, mmdit)
    split_out = mmdit(**inputs)
    network.remove()
    assert (split_out - base).abs().max() > 1e-3

    saved = network.state_dict()
    for name in ("lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_joint_blocks_1_context_block_attn_qkv"):
        assert saved[f"{name}.lora_down.weight"].shape == (12, 128)
        assert float(saved[f"{name}.alpha"]) == 6.0  # alpha x 3: alpha / rank stays 2 / 4
    assert float(saved["lora_unet_joint_blocks_0_x_block_attn_proj.alpha"]) == 2.0
    plain, _ = lora_sd3.create_network_from_weights(1.0, None, None, None, mmdit, saved, for_inference=True)
    plain.load_weights(saved, strict=True)
    plain.apply_to(None, mmdit)
    torch.testing.assert_close(mmdit(**inputs), split_out)  # any plain loader gets the trained strength
    plain.remove()
    again = lora_sd3.create_network(1.0, 4, 2.0, None, None, mmdit, split_qkv="True")
    again.load_weights(saved, strict=True)
    for (name, param), (_, loaded) in zip(network.named_parameters(), again.named_parameters()):
        assert torch.equal(param, loaded), name


@torch.no_grad()
def test_from_weights_rebuilds_ranks_alphas_and_the_output(tmp_path):
    mmdit, clip_l, clip_g, t5 = tiny_mmdit("medium"), tiny_clip(), tiny_clip(), tiny_t5()
    inputs, ids = mmdit_inputs(mmdit), token_ids()
    encoders = [clip_l, clip_g, t5]
    network = lora_sd3.create_network(1.0, 4, 3.0, None, encoders, mmdit, train_t5xxl="1", x_mlp_dim="8",
                                      context_mod_dim="2", emb_dims="[2,0,5,0,0,6]",
                                      network_reg_dims="lora_te2_.*=3")  # fmt: skip
    randomize(network)
    path = tmp_path / "sd3_lora.safetensors"
    network.save_weights(path, None, None)
    network.apply_to(encoders, mmdit)
    expected, expected_g = mmdit(**inputs), clip_g(ids).last_hidden_state
    network.remove()

    rebuilt, weights = lora_sd3.create_network_from_weights(1.0, str(path), None, encoders, mmdit)
    shape = {m.lora_name: (m.lora_dim, float(m.alpha)) for m in network.loras}
    assert {m.lora_name: (m.lora_dim, float(m.alpha)) for m in rebuilt.loras} == shape
    assert shape["lora_unet_x_embedder_proj"] == (5, 3.0) and shape["lora_unet_joint_blocks_1_x_block_mlp_fc2"][0] == 8
    assert shape["lora_te2_text_model_encoder_layers_0_mlp_fc1"] == (3, 3.0)
    assert any(n.startswith("lora_te3_") for n in shape)
    rebuilt.load_weights(weights, strict=True)
    rebuilt.apply_to(encoders, mmdit)
    torch.testing.assert_close(mmdit(**inputs), expected)
    torch.testing.assert_close(clip_g(ids).last_hidden_state, expected_g)
    rebuilt.remove()

    flux_file = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 128)}
    with pytest.raises(
        UserError, match="modules not in this SD3 model or its text encoders: lora_unet_double_blocks_0_img_attn_qkv"
    ):
        lora_sd3.create_network_from_weights(1.0, None, None, encoders, mmdit, flux_file)  # fmt: skip


def test_text_encoder_lr_takes_one_to_three_values():
    mmdit, clip_l, clip_g, t5 = meta_mmdit("medium"), tiny_clip(), tiny_clip(), tiny_t5()
    network = lora_sd3.create_network(1.0, 4, 1.0, None, [clip_l, clip_g, t5], mmdit, train_t5xxl="True")

    def lrs(text_encoder_lr):
        groups, names = network.prepare_optimizer_params(text_encoder_lr, 1e-3, 1e-4)
        assert names == ["textencoder 1 ", "textencoder 2 ", "textencoder 3 ", "unet"]
        return [g["lr"] for g in groups]

    assert lrs([1e-5, 2e-5, 3e-5]) == pytest.approx([1e-5, 2e-5, 3e-5, 1e-3])
    assert lrs([1e-5, 2e-5]) == pytest.approx([1e-5, 2e-5, 2e-5, 1e-3])  # the second is T5's too, as upstream
    assert lrs([1e-5]) == pytest.approx([1e-5, 1e-5, 1e-5, 1e-3])
    assert lrs(None) == pytest.approx([1e-4, 1e-4, 1e-4, 1e-3])
    with pytest.raises(UserError, match="--text_encoder_lr: give 1 to 3 values"):
        network.prepare_optimizer_params([1e-5] * 4, 1e-3, 1e-4)
