"""The shared LoRA module and network (networks/lora.py), exercised on tiny FLUX.1, CLIP-L and T5 models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from library.errors import UserError
from library.memory.fp8 import cast_linear_weights_to_fp8, enable_fp8_linear
from library.models.flux.model import Flux
from library.models.flux.sampling import prepare_img_ids
from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params
from networks import lora_flux
from networks.lora import GGPO, LoRAModule, lora_delta, merge_lora_weight


def tiny_flux(seed: int = 0) -> Flux:
    params = tiny_flux_params()
    with torch.device("meta"):
        model = Flux(params)
    model.load_state_dict(make_flux_state_dict(params, seed), assign=True)
    return model.eval()


def tiny_clip() -> CLIPTextModel:
    torch.manual_seed(1)
    config = CLIPTextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2)  # fmt: skip
    return CLIPTextModel(config).eval()


def tiny_t5() -> T5EncoderModel:
    torch.manual_seed(2)
    config = T5Config(d_model=128, d_kv=64, num_heads=2, d_ff=256, num_layers=2, vocab_size=1000,
                      feed_forward_proj="gated-gelu")  # fmt: skip
    return T5EncoderModel(config).eval()


def flux_inputs(batch: int = 2, context: int = 128, vec: int = 128) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return dict(
        img=torch.randn(batch, 6, 64, generator=gen),
        img_ids=prepare_img_ids(batch, 6, 4),
        txt=torch.randn(batch, 5, context, generator=gen),
        txt_ids=torch.zeros(batch, 5, 3),
        timesteps=torch.tensor([0.3, 0.8])[:batch],
        y=torch.randn(batch, vec, generator=gen),
        guidance=torch.tensor([3.5, 1.0])[:batch],
    )


def token_ids() -> torch.Tensor:
    return torch.tensor([[0, 17, 301, 42, 999, 2], [0, 5, 6, 7, 2, 2]])


def randomize(network: nn.Module, seed: int = 4, std: float = 0.05) -> None:
    """Non-zero ups (and fresh downs), so the LoRA changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def merged_copy(model: nn.Module, lora_state: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """``model`` with a saved LoRA merged by the shared helper, matching names by ComfyUI's rule
    (``prefix`` + module path with dots as underscores)."""
    merged = copy.deepcopy(model)
    layers = {prefix + path.replace(".", "_"): m for path, m in merged.named_modules() if isinstance(m, nn.Linear)}
    names = {k.partition(".")[0] for k in lora_state if k.startswith(prefix)}
    for name in names:
        weight = layers[name].weight
        weight.data = merge_lora_weight(weight.data, lora_state[f"{name}.lora_down.weight"],
                                        lora_state[f"{name}.lora_up.weight"], lora_state[f"{name}.alpha"])  # fmt: skip
    return merged


def instance_forwards(*models: nn.Module) -> dict[int, object]:
    return {id(m): m.__dict__.get("forward") for model in models for m in model.modules()}


@torch.no_grad()
def test_attach_is_identity_then_equals_merged_model_and_remove_restores():
    flux, clip, t5 = tiny_flux(), tiny_clip(), tiny_t5()
    inputs, ids = flux_inputs(), token_ids()
    base = flux(**inputs)
    base_clip, base_t5 = clip(ids).last_hidden_state, t5(ids).last_hidden_state
    forwards = instance_forwards(flux, clip, t5)
    originals = {"flux": copy.deepcopy(flux), "clip": copy.deepcopy(clip), "t5": copy.deepcopy(t5)}

    network = lora_flux.create_network(1.0, 4, 2.0, None, [clip, t5], flux, train_t5xxl="True", in_dims="[4,2,2,2,4]")
    network.apply_to([clip, t5], flux)
    assert torch.equal(flux(**inputs), base)  # lora_up starts at zero
    assert torch.equal(clip(ids).last_hidden_state, base_clip)

    randomize(network)
    out, out_clip, out_t5 = flux(**inputs), clip(ids).last_hidden_state, t5(ids).last_hidden_state
    assert (out - base).abs().max() > 1e-3 and (out_clip - base_clip).abs().max() > 1e-3
    state = network.state_dict()
    torch.testing.assert_close(merged_copy(originals["flux"], state, "lora_unet_")(**inputs), out)
    text_model_state = {k.replace("lora_te1_text_model_", "lora_te1_"): v for k, v in state.items()}
    torch.testing.assert_close(merged_copy(originals["clip"], text_model_state, "lora_te1_")(ids).last_hidden_state,
                               out_clip)  # fmt: skip
    torch.testing.assert_close(merged_copy(originals["t5"], state, "lora_te3_")(ids).last_hidden_state, out_t5)

    network.remove()
    assert instance_forwards(flux, clip, t5) == forwards
    assert torch.equal(flux(**inputs), base)
    assert torch.equal(t5(ids).last_hidden_state, base_t5)


@torch.no_grad()
def test_multiplier_scales_the_delta_and_zero_disables_it():
    layer = nn.Linear(16, 8)
    x = torch.randn(3, 5, 16)
    base = layer(x)
    lora = LoRAModule("lora_unet_x", layer, lora_dim=4, alpha=2.0)
    lora.apply_to()
    randomize(lora)
    delta = layer(x) - base
    for multiplier in (2.0, -0.5, 0.0):
        lora.multiplier = multiplier
        torch.testing.assert_close(layer(x) - base, multiplier * delta)
    lora.multiplier = 1.0
    torch.testing.assert_close(delta, x @ lora.delta_weight().T)  # delta_weight includes alpha / rank = 0.5


@torch.no_grad()
def test_network_set_multiplier_and_enabled():
    flux = tiny_flux()
    inputs = flux_inputs()
    base = flux(**inputs)
    network = lora_flux.create_network(1.0, 4, 4.0, None, None, flux)
    network.apply_to(None, flux)
    randomize(network)
    full = flux(**inputs)
    network.set_multiplier(0.0)
    assert torch.equal(flux(**inputs), base)
    network.set_multiplier(1.0)
    network.set_enabled(False)
    assert torch.equal(flux(**inputs), base)
    network.set_enabled(True)
    assert torch.equal(flux(**inputs), full)


@torch.no_grad()
def test_per_sample_multipliers_weight_each_sample():
    """A [B] multiplier (each dataset's network_multiplier) scales each sample's LoRA output on its own."""
    flux = tiny_flux()
    inputs = flux_inputs(batch=2)
    base = flux(**inputs)
    network = lora_flux.create_network(1.0, 4, 4.0, None, None, flux)
    network.apply_to(None, flux)
    randomize(network)
    full = flux(**inputs)
    network.set_multiplier(torch.tensor([0.0, 1.0]))
    mixed = flux(**inputs)
    torch.testing.assert_close(mixed[0], base[0])
    torch.testing.assert_close(mixed[1], full[1])
    network.set_multiplier(torch.tensor([0.5, 0.5]))
    network_half = flux(**inputs)
    network.set_multiplier(0.5)
    torch.testing.assert_close(network_half, flux(**inputs))


@torch.no_grad()
def test_merge_into_base_and_unmerge():
    flux = tiny_flux()
    inputs = flux_inputs()
    weights = {k: v.clone() for k, v in flux.state_dict().items()}
    network = lora_flux.create_network(1.0, 4, 1.0, None, None, flux, in_dims="[2,2,2,2,2]")
    network.apply_to(None, flux)
    randomize(network)
    with_lora = flux(**inputs)
    network.merge_into_base()
    changed = [k for k, v in flux.state_dict().items() if not torch.equal(v, weights[k])]
    assert len(changed) == len(network.loras)  # one weight per module, nothing else
    torch.testing.assert_close(flux(**inputs), with_lora)  # merged: the delta is not added twice
    network.remove()
    torch.testing.assert_close(flux(**inputs), with_lora)
    network.unmerge()
    for key, value in flux.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)


@torch.no_grad()
def test_lora_on_fp8_base_weight():
    layer = nn.Linear(32, 24)
    cast_linear_weights_to_fp8(layer)
    assert enable_fp8_linear(layer) == 1
    fp8_forward = layer.__dict__["forward"]
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    lora = LoRAModule("lora_unet_fp8", layer, lora_dim=4, alpha=4.0)
    lora.apply_to()
    randomize(lora, std=0.2)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = F.linear(x.float(), layer.weight.float() + lora.delta_weight(), layer.bias.float())
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    lora.remove()
    assert layer.__dict__["forward"] is fp8_forward
    merged = merge_lora_weight(layer.weight, lora.lora_down.weight, lora.lora_up.weight, 4.0)
    assert merged.dtype == torch.float8_e4m3fn


@torch.no_grad()
def test_module_dropout_and_rank_dropout():
    layer = nn.Linear(16, 8)
    x = torch.randn(2, 5, 16)
    base = layer(x)
    lora = LoRAModule("lora_unet_d", layer, lora_dim=4, alpha=4.0, module_dropout=1.0)
    lora.apply_to()
    randomize(lora)
    lora.train()
    assert torch.equal(layer(x), base)  # the whole module dropped
    lora.eval()
    eval_out = layer(x)
    assert not torch.equal(eval_out, base)  # no dropout outside training

    lora.module_dropout, lora.rank_dropout = None, 0.5
    lora.train()
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    mask = (torch.rand(2, 4) > 0.5).float()[:, None, :]
    expected = base + lora.lora_up(lora.lora_down(x) * mask) * (1.0 / 0.5)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("kernel", [1, 3])
@torch.no_grad()
def test_conv2d_lora_matches_merged_weight(kernel):
    conv = nn.Conv2d(6, 10, kernel, padding=kernel // 2)
    x = torch.randn(2, 6, 7, 5)
    lora = LoRAModule("lora_unet_conv", conv, lora_dim=3, alpha=1.5)
    lora.apply_to()
    randomize(lora, std=0.3)
    merged = merge_lora_weight(conv.weight, lora.lora_down.weight, lora.lora_up.weight, 1.5)
    torch.testing.assert_close(conv(x), F.conv2d(x, merged, conv.bias, padding=kernel // 2))
    lora.remove()
    torch.testing.assert_close(lora_delta(lora.lora_down.weight, lora.lora_up.weight) * 0.5, lora.delta_weight())


def test_optimizer_param_groups_names_and_lrs():
    flux, clip, t5 = tiny_flux(), tiny_clip(), tiny_t5()
    network = lora_flux.create_network(1.0, 4, 1.0, None, [clip, t5], flux, train_t5xxl="True",
                                       loraplus_lr_ratio="4", loraplus_text_encoder_lr_ratio="2")  # fmt: skip
    network.apply_to([clip, t5], flux)
    groups, names = network.prepare_optimizer_params([1e-4, 1e-5], 1e-3, 1e-2)
    assert names == [
        "textencoder 1 ",
        "textencoder 1  plus",
        "textencoder 2 ",
        "textencoder 2  plus",
        "unet",
        "unet plus",
    ]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 2e-4, 1e-5, 2e-5, 1e-3, 4e-3])
    te1_ups = {id(m.lora_up.weight) for m in network.text_encoder_loras if m.lora_name.startswith("lora_te1_")}
    assert {id(p) for p in groups[1]["params"]} == te1_ups
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    assert len({id(p) for g in groups for p in g["params"]}) == len(list(network.parameters()))

    network.set_loraplus_lr_ratio(None, None, None)
    groups, names = network.prepare_optimizer_params(None, None, 1e-2)
    assert names == ["textencoder 1 ", "textencoder 2 ", "unet"] and {g["lr"] for g in groups} == {1e-2}
    groups, names = network.prepare_optimizer_params([5e-5], 0, 1e-2)  # one value: both encoders; lr 0: left out
    assert names == ["textencoder 1 ", "textencoder 2 "] and [g["lr"] for g in groups] == [5e-5, 5e-5]
    with pytest.raises(UserError, match="text_encoder_lr"):
        network.prepare_optimizer_params([1e-4, 1e-5, 1e-6], 1e-3, 1e-2)


def test_unet_only_apply_drops_text_encoder_modules():
    flux, clip = tiny_flux(), tiny_clip()
    network = lora_flux.create_network(1.0, 4, 1.0, None, [clip, None], flux)
    assert network.text_encoder_loras
    network.apply_to([clip, None], flux, apply_text_encoder=False, apply_unet=True)
    assert not network.text_encoder_loras
    assert all(k.startswith("lora_unet_") for k in network.state_dict())
    assert "forward" not in clip.encoder.layers[0].self_attn.q_proj.__dict__


def test_save_and_load_weights_round_trip_and_errors(tmp_path):
    flux = tiny_flux()
    network = lora_flux.create_network(1.0, 4, 2.0, None, None, flux)
    randomize(network)
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, torch.float16, {"ss_network_dim": "4"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4" and "sshs_model_hash" in f.metadata()
        assert f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight").dtype == torch.float16

    fresh = lora_flux.create_network(1.0, 4, 2.0, None, None, flux)
    fresh.load_weights(path)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value.half().float())

    state = dict(network.state_dict())
    with pytest.raises(UserError, match="lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight"):
        fresh.load_weights({**state, "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": torch.zeros(4, 256)},
                           strict=True)  # fmt: skip
    del state["lora_unet_single_blocks_1_linear2.lora_up.weight"]
    with pytest.raises(UserError, match="missing keys: lora_unet_single_blocks_1_linear2.lora_up.weight"):
        fresh.load_weights(state, strict=True)
    with pytest.raises(UserError, match="lora_unet_single_blocks_1_linear2: lora_down.weight and lora_up.weight"):
        fresh.load_weights(state)
    state["lora_unet_single_blocks_1_linear2.lora_up.weight"] = torch.zeros(256, 4)
    state["lora_unet_single_blocks_0_linear1.lora_down.weight"] = torch.zeros(8, 256)
    for strict in (True, False):
        with pytest.raises(UserError, match="wrong shape: lora_unet_single_blocks_0_linear1.lora_down.weight"):
            fresh.load_weights(state, strict=strict)


def test_loaded_alpha_sets_the_scale():
    layer = nn.Linear(8, 8)
    lora = LoRAModule("lora_unet_a", layer, lora_dim=4, alpha=1.0)
    lora.load_state_dict({**lora.state_dict(), "alpha": torch.tensor(8.0)})
    assert lora.scale == 2.0


@torch.no_grad()
def test_max_norm_regularization_caps_every_module():
    flux = tiny_flux()
    network = lora_flux.create_network(1.0, 4, 4.0, None, None, flux)
    randomize(network, std=0.5)
    before = [lora.delta_weight(1.0).norm().item() for lora in network.loras]
    cap = sorted(before)[len(before) // 2]
    scaled, mean_norm, max_norm = network.apply_max_norm_regularization(cap, "cpu")
    after = [lora.delta_weight(1.0).norm().item() for lora in network.loras]
    assert scaled == sum(n > cap for n in before)
    assert max(after) == pytest.approx(max_norm, rel=1e-4) and max_norm <= cap * (1 + 1e-5)
    assert mean_norm == pytest.approx(sum(after) / len(after), rel=1e-4)
    assert all(a == pytest.approx(b, rel=1e-5) for a, b in zip(after, before) if b <= cap)


@torch.no_grad()
def test_merge_to_from_a_file_equals_the_applied_lora():
    flux, clip = tiny_flux(), tiny_clip()
    inputs = flux_inputs()
    network = lora_flux.create_network(1.0, 4, 2.0, None, [clip], flux, in_dims="[2,2,2,2,2]")
    randomize(network)
    network.apply_to([clip], flux)
    expected = flux(**inputs)
    network.remove()
    weights = dict(network.state_dict())

    inference, _ = lora_flux.create_network_from_weights(1.0, None, None, [clip], flux, weights, for_inference=True)
    inference.merge_to([clip], flux, weights)
    torch.testing.assert_close(flux(**inputs), expected)
    assert all(lora.merged == 1.0 for lora in inference.loras)
    with pytest.raises(UserError, match="lora_unet_nope"):
        inference.merge_to([clip], flux, {**weights, "lora_unet_nope.alpha": torch.tensor(1.0)})


# ---- continuing from a file whose modules differ (upstream loads with strict=False) --------------------------


def test_load_weights_takes_matching_modules_and_reports_the_rest(tmp_path, caplog):
    flux, clip = tiny_flux(), tiny_clip()
    double_only = lora_flux.create_network(1.0, 4, 2.0, None, [clip, None], flux, train_blocks="double")
    randomize(double_only)
    path = tmp_path / "double.safetensors"
    double_only.save_weights(path, None, None)

    continued = lora_flux.create_network(1.0, 4, 2.0, None, [clip, None], flux)  # train_blocks=all
    continued.apply_to([clip, None], flux, apply_text_encoder=False)  # --network_train_unet_only
    with caplog.at_level("INFO", logger="networks.lora"):
        result = continued.load_weights(path)
    doubles = [m for m in continued.loras if "double_blocks" in m.lora_name]
    singles = [m for m in continued.loras if "single_blocks" in m.lora_name]
    te_modules = len(double_only.text_encoder_loras)
    expected = f"{len(doubles)} modules from the file, {len(singles)} start fresh (not in the file), {te_modules} "
    assert expected + "file modules unused (not in this network)" in caplog.text
    saved = double_only.state_dict()
    for lora in doubles:
        assert torch.equal(lora.lora_up.weight, saved[f"{lora.lora_name}.lora_up.weight"])
    assert all(not lora.lora_up.weight.any() for lora in singles)  # fresh: up starts at zero
    assert any(k.startswith("lora_te1_") for k in result.unexpected_keys)
    assert all(k.partition(".")[0].startswith("lora_unet_single_") for k in result.missing_keys)

    no_alpha = {k: v for k, v in saved.items() if not k.endswith(".alpha")}  # alpha absent: alpha = rank
    continued.load_weights(no_alpha)
    assert float(doubles[0].alpha) == 4.0 and doubles[0].scale == 1.0


def test_load_weights_with_nothing_in_common_is_one_user_error(tmp_path):
    flux = tiny_flux()
    network = lora_flux.create_network(1.0, 4, 1.0, None, None, flux)
    sd3_like = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 128),
                "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(384, 4)}  # fmt: skip
    path = tmp_path / "sd3_lora.safetensors"
    save_file(sd3_like, str(path))
    with pytest.raises(
        UserError,
        match=r"sd3_lora.safetensors: none of its 1 modules is in this network "
        r"\(e.g. lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight\)",
    ):
        network.load_weights(path)  # fmt: skip


# ---- network_args leniency and booleans --------------------------------------------------------------------


def test_unused_network_args_are_one_warning(caplog):
    flux = meta_flux()
    with caplog.at_level("WARNING"):
        network = lora_flux.create_network(1.0, 4, 1.0, None, None, flux, conv_dim="4", conv_alpha="1",
                                           dropout="0.1", algo="lora", img_attn_dim="2")  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["--network_args algo, conv_alpha, conv_dim, dropout: not used by networks.lora_flux, ignored"]
    assert network.get_submodule("lora_unet_double_blocks_0_img_attn_qkv").lora_dim == 2


@pytest.mark.parametrize(("text", "split"), [("True", True), ("true", True), ("1", True), ("False", False),
                                              ("false", False), ("0", False)])  # fmt: skip
def test_boolean_network_args(text, split):
    network = lora_flux.create_network(1.0, 4, 1.0, None, None, meta_flux(), split_qkv=text)
    assert (network.get_submodule("lora_unet_double_blocks_0_img_attn_qkv").split_dims is not None) == split


def meta_flux() -> Flux:
    with torch.device("meta"):
        return Flux(tiny_flux_params())


# ---- network_reg_lrs ---------------------------------------------------------------------------------------


def test_network_reg_lrs_groups_first_match_wins_and_lr_zero_freezes():
    flux, clip = tiny_flux(), tiny_clip()
    network = lora_flux.create_network(1.0, 4, 1.0, None, [clip, None], flux, loraplus_unet_lr_ratio="4",
                                       network_reg_lrs="double_blocks_0=1e-2, double_blocks=5e-3,"
                                                       "single_blocks_1_linear2=0, lora_te1_.*mlp=2e-5")  # fmt: skip
    network.apply_to([clip, None], flux)
    groups, names = network.prepare_optimizer_params(1e-5, 1e-3, 1e-4)
    assert names == ["textencoder 1  reg_lr_3", "textencoder 1 ", "unet reg_lr_0", "unet reg_lr_0 plus",
                     "unet reg_lr_1", "unet reg_lr_1 plus", "unet", "unet plus"]  # fmt: skip
    assert [g["lr"] for g in groups] == pytest.approx([2e-5, 1e-5, 1e-2, 4e-2, 5e-3, 2e-2, 1e-3, 4e-3])

    def modules(group):
        ids = {id(p) for p in group["params"]}
        return {m.lora_name for m in network.loras for p in m.parameters() if id(p) in ids}

    assert modules(groups[2]) == {m.lora_name for m in network.loras if "double_blocks_0_" in m.lora_name}
    assert modules(groups[4]) == {m.lora_name for m in network.loras if "double_blocks_1_" in m.lora_name}
    assert modules(groups[0]) == {m.lora_name for m in network.text_encoder_loras if "mlp" in m.lora_name}
    frozen = network.get_submodule("lora_unet_single_blocks_1_linear2")
    assert not any(p.requires_grad for p in frozen.parameters())  # lr 0: left out of the optimizer and frozen
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in network.parameters() if p.requires_grad}
    assert len(grouped) == len(list(network.parameters())) - 2


# ---- GGPO ----------------------------------------------------------------------------------------------------


def test_ggpo_norms_follow_the_formulas_and_perturb_only_in_training():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(3, 5, 16)
    lora = LoRAModule("lora_unet_g", layer, lora_dim=4, alpha=2.0, ggpo=GGPO(beta=0.01, sigma=0.03))
    lora.apply_to()
    randomize(lora, std=0.3)
    lora.train()
    base = F.linear(x, layer.weight, layer.bias) + lora.lora_output(x)
    assert torch.equal(layer(x), base)  # no norms yet: no perturbation
    layer(x).square().mean().backward()
    lora.update_grad_norms()
    lora.update_norms()

    delta = lora.scale * lora.lora_up.weight @ lora.lora_down.weight
    combined = (layer.weight.norm(dim=1).mean() ** 2 + delta.square().sum(dim=1)).sqrt()
    grad = lora.scale * (lora.lora_up.weight @ lora.lora_down.weight.grad + lora.lora_up.weight.grad @
                         lora.lora_down.weight)  # fmt: skip
    torch.testing.assert_close(lora.combined_weight_norms.squeeze(1), combined.detach())
    torch.testing.assert_close(lora.weight_norms.squeeze(1), delta.norm(dim=1).detach())
    torch.testing.assert_close(lora.grad_norms.squeeze(1), grad.norm(dim=1))

    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    row_scale = (0.03 * combined + 0.01 * grad.norm(dim=1) ** 2) / math.sqrt(8)
    noise = torch.randn(8, 16) * row_scale[:, None]
    torch.testing.assert_close(out, base + x @ noise.T)
    lora.eval()
    assert torch.equal(layer(x), base)


def test_ggpo_network_methods_cover_every_linear_and_split_parts():
    flux = tiny_flux()
    network = lora_flux.create_network(1.0, 4, 1.0, None, None, flux, ggpo_beta="0.01", ggpo_sigma="0.03",
                                       split_qkv="True")  # fmt: skip
    network.apply_to(None, flux)
    randomize(network)
    network.train()
    assert network.grad_norms() is None and network.combined_weight_norms() is None
    flux(**flux_inputs()).square().mean().backward()
    network.update_grad_norms()
    network.update_norms()
    shapes = {network.grad_norms().shape, network.weight_norms().shape, network.combined_weight_norms().shape}
    assert shapes == {(len(network.loras), 1)}
    qkv = network.get_submodule("lora_unet_double_blocks_0_img_attn_qkv")
    assert qkv.grad_norms.shape == (768, 1) and bool((network.combined_weight_norms() > 0).all())
    torch.manual_seed(1)
    first = flux(**flux_inputs())
    torch.manual_seed(2)
    assert not torch.equal(first, flux(**flux_inputs()))  # fresh noise each forward
