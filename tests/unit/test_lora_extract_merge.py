"""The LoRA extract and merge tools' core (networks/lora_tools/, library/models/layouts.py) on tiny real-layout
files: SVD extraction, names as training makes them, merging into every layout against a hand merge, exact
LoRA + LoRA concatenation, and the errors a user meets."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models.layouts import DENOISER, open_encoder_file, open_flux_file, open_sd3_file, stored_rows
from networks import lora_flux, lora_sd3
from networks.lora import lora_delta
from networks.lora_tools import merge
from networks.lora_tools.extract import ExtractSettings, PartPair, abs_quantile, extract_lora, svd_lora
from networks.lora_tools.families import FLUX, SD3
from networks.lora_tools.lora_files import LoRAFile, LoRAWeights, check_family
from networks.lora_tools.merge import Devices, MergeTarget, concat_loras, merged_items, plan_merge
from networks.lora_tools.targets import lora_weight_keys
from tests.helpers import flux_state_to_diffusers

PREFIX = "model.diffusion_model."


def low_rank(shape: tuple[int, ...], rank: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    """A random delta of exactly ``rank`` (a Conv2d shape flattens to out x in*kh*kw)."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, int(torch.tensor(shape[1:]).prod()),
                                                                     generator=gen)  # fmt: skip
    return (flat * scale).reshape(shape)


def random_module(weight_shape: tuple[int, ...], rank: int, alpha: float, seed: int) -> LoRAWeights:
    gen = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, *weight_shape[1:], generator=gen) * 0.1
    up = torch.randn(weight_shape[0], rank, *([1, 1] if len(weight_shape) == 4 else []), generator=gen) * 0.1
    return LoRAWeights(down, up, alpha)


def lora_file(modules: dict[str, LoRAWeights], ratio: float = 1.0, name: str = "lora") -> LoRAFile:
    return LoRAFile(Path(f"{name}.safetensors"), ratio, modules, {})


def delta_of(weights: LoRAWeights, ratio: float) -> torch.Tensor:
    return lora_delta(weights.down, weights.up) * (ratio * weights.alpha / weights.rank)


def merge_to_state(target: MergeTarget, save_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {k: v.make() for k, v in merged_items(target, torch.float32, save_dtype, Devices()).items()}


def bfl_state(file_path: Path, family=FLUX) -> dict[str, torch.Tensor]:
    """The denoiser's state dict read back through its layout (BFL keys whatever the file's layout)."""
    file = family.open_model(file_path, "--test")
    part = file.parts[DENOISER]
    return {k: file.read(r).float() for k, r in part.recipes.items()}


# ---- extraction ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 32), (16, 8, 2, 2)])
def test_svd_recovers_a_low_rank_difference_at_any_dim_at_least_its_rank(shape):
    delta = low_rank(shape, 3, seed=0)
    for dim in (3, 8):
        down, up = svd_lora(delta, dim, clamp_quantile=1.0)
        assert down.shape[0] == min(dim, shape[0], delta[0].numel())
        if len(shape) == 4:
            assert down.shape[1:] == shape[1:] and up.shape[2:] == (1, 1)
        torch.testing.assert_close(lora_delta(down, up), delta, rtol=0, atol=1e-5 * delta.abs().max().item())
    down, up = svd_lora(delta, 2, clamp_quantile=1.0)  # below its rank: the best rank-2 approximation
    residual = (lora_delta(down, up) - delta).norm()
    singular = torch.linalg.svdvals(delta.reshape(shape[0], -1))
    torch.testing.assert_close(residual, singular[2:].norm(), rtol=1e-4, atol=1e-6)


def test_clamp_quantile_is_taken_over_absolute_values():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(1)) - 0.5
    for q in (0.5, 0.9, 0.99, 1.0):
        torch.testing.assert_close(abs_quantile(values, q), torch.quantile(values.abs(), q))
    delta = low_rank((64, 48), 4, seed=2)
    down, up = svd_lora(delta, 4, clamp_quantile=0.9)
    limit = abs_quantile(torch.cat([a.flatten() for a in svd_lora(delta, 4, 1.0)]), 0.9)
    assert down.abs().max() <= limit + 1e-6 and up.abs().max() <= limit + 1e-6
    assert (up.min() + limit).abs() < 1e-6 or (down.min() + limit).abs() < 1e-6  # the negative side is clamped too


def test_tool_names_are_the_training_networks_names(tiny_models, tiny_sd3_models):
    flux_file = open_flux_file(tiny_models["flux_dev"], "--flux_model")
    clip = open_encoder_file(tiny_models["clip_l"], "clip_l", "--clip_l").parts["clip_l"]
    t5 = open_encoder_file(tiny_models["t5xxl"], "t5xxl", "--t5xxl").parts["t5xxl"]
    denoiser = flux_file.parts[DENOISER]
    network = lora_flux.create_network(1.0, 4, 1.0, None, [clip.build(), t5.build()], denoiser.build(),
                                       in_dims="[4,4,4,4,4]", train_t5xxl="True")  # fmt: skip
    names = {}
    for part in (denoiser, clip, t5):
        keys = lora_weight_keys(FLUX, part, targets_only=True)
        assert set(keys.values()) <= set(part.recipes)
        names.update(keys)
    assert set(names) == {lora.lora_name for lora in network.loras}
    assert names["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].endswith("layers.0.self_attn.q_proj.weight")

    sd3_file = open_sd3_file(tiny_sd3_models["sd3_medium_incl_t5"], "--sd3_model")
    parts = sd3_file.parts
    network = lora_sd3.create_network(1.0, 4, 1.0, None, [parts[n].build() for n in ("clip_l", "clip_g", "t5xxl")],
                                      parts[DENOISER].build(), emb_dims="[4,4,4,4,4,4]", conv_dim="4",
                                      train_t5xxl="True")  # fmt: skip
    names = {n: k for part in parts.values() for n, k in lora_weight_keys(SD3, part, True).items()}
    assert set(names) == {lora.lora_name for lora in network.loras}
    assert names["lora_unet_x_embedder_proj"] == "x_embedder.proj.weight"
    assert parts[DENOISER].recipes["x_embedder.proj.weight"].sources == (PREFIX + "x_embedder.proj.weight",)


def test_extraction_across_layouts_finds_the_change_where_the_file_splits_it(tiny_models, tmp_path):
    state = load_file(tiny_models["flux_dev"])
    changes = {"single_blocks.0.linear1.weight": 2, "double_blocks.1.txt_attn.qkv.weight": 1}
    tuned = dict(state)
    for i, (key, rank) in enumerate(changes.items()):
        tuned[key] = state[key] + low_rank(tuple(state[key].shape), rank, seed=20 + i)
    path = tmp_path / "tuned_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in flux_state_to_diffusers(tuned, 256).items()}, path)
    org, diffusers = open_flux_file(tiny_models["flux_dev"], "--model_org"), open_flux_file(path, "--model_tuned")
    pair = PartPair(org, org.parts[DENOISER], diffusers, diffusers.parts[DENOISER])
    tensors, ranks = extract_lora(FLUX, [pair], ExtractSettings(dim=2, clamp_quantile=1.0))
    assert ranks == [2, 2]
    for key in changes:
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        delta = lora_delta(tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"])
        torch.testing.assert_close(delta, tuned[key] - state[key], rtol=0, atol=1e-5)


# ---- layouts -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_layouts(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny FLUX.1 dev transformer as BFL, ComfyUI-prefixed with CLIP-L and T5 bundled, diffusers, and fp8."""
    folder = tmp_path_factory.mktemp("flux_layouts")
    state = load_file(tiny_models["flux_dev"])
    bundled = {PREFIX + k: v for k, v in state.items()}
    bundled.update({"text_encoders.clip_l.transformer." + k: v for k, v in load_file(tiny_models["clip_l"]).items()})
    bundled.update({"text_encoders.t5xxl.transformer." + k: v for k, v in load_file(tiny_models["t5xxl"]).items()})
    files = {"bfl": tiny_models["flux_dev"], "prefixed": folder / "prefixed.safetensors",
             "diffusers": folder / "diffusers.safetensors", "fp8": folder / "fp8.safetensors"}  # fmt: skip
    save_file(bundled, files["prefixed"])
    save_file({k: v.contiguous() for k, v in flux_state_to_diffusers(state, 256).items()}, files["diffusers"])
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in state.items()}, files["fp8"])
    return files


def test_stored_rows_inverts_the_diffusers_recipes(flux_layouts):
    file = open_flux_file(flux_layouts["diffusers"], "--flux_model")
    recipes = file.parts[DENOISER].recipes
    combined = [r for r in recipes.values() if r.combine != "same"]
    assert {r.combine for r in combined} == {"cat", "swap_halves"}
    for recipe in combined:
        built = file.read(recipe)
        for index, key in enumerate(recipe.sources):
            torch.testing.assert_close(stored_rows(recipe, index, built, file.source), file.read_key(key))


FLUX_MODULES = {  # name -> the BFL weight it changes (linear1 and qkv are split in diffusers files)
    "lora_unet_double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv.weight",
    "lora_unet_single_blocks_1_linear1": "single_blocks.1.linear1.weight",
    "lora_unet_final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1.weight",
    "lora_unet_txt_in": "txt_in.weight",
}


@pytest.mark.parametrize("layout", ["bfl", "prefixed", "diffusers", "fp8"])
def test_merge_into_every_flux_layout_equals_a_hand_merge(flux_layouts, tiny_models, layout, monkeypatch):
    monkeypatch.setattr(merge, "CHUNK_ELEMENTS", 3000)  # several row blocks per weight
    original = bfl_state(tiny_models["flux_dev"])
    if layout == "fp8":
        original = {k: v.to(torch.float8_e4m3fn).float() for k, v in original.items()}
    modules = {name: random_module(tuple(original[key].shape), 2 + i, 1.0 + i, seed=i)
               for i, (name, key) in enumerate(FLUX_MODULES.items())}  # fmt: skip
    target = MergeTarget(open_flux_file(flux_layouts[layout], "--flux_model"), Path("out.safetensors"))
    plan_merge(FLUX, [target], [lora_file(modules, ratio=0.7)])
    out = merge_to_state(target)
    path = flux_layouts[layout].parent / f"merged_{layout}.safetensors"
    save_file(out, path)
    assert list(out) == target.file.keys()
    assert {k: v.dtype for k, v in out.items()} == {k: target.file.dtype(k) for k in out}
    merged = bfl_state(path)
    for key, tensor in merged.items():
        expected = original[key]
        for name, weights in modules.items():
            if FLUX_MODULES[name] == key:
                expected = expected + delta_of(weights, 0.7)
        if layout == "fp8":
            expected = expected.to(torch.float8_e4m3fn).float()
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6, msg=key)


def test_merge_into_sd3_file_with_bundled_encoders_and_separate_ones(tiny_sd3_models, tmp_path):
    sd3 = open_sd3_file(tiny_sd3_models["sd3_medium_incl_t5"], "--sd3_model")
    clip_l = open_encoder_file(tiny_sd3_models["clip_l"], "clip_l", "--clip_l")
    parts = {name: (sd3, part) for name, part in sd3.parts.items()}
    names = {
        "lora_unet_joint_blocks_1_context_block_attn_qkv": (DENOISER, "joint_blocks.1.context_block.attn.qkv.weight"),
        "lora_unet_x_embedder_proj": (DENOISER, "x_embedder.proj.weight"),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("clip_l", "encoder.layers.0.self_attn.q_proj.weight"),
        "lora_te2_text_model_encoder_layers_1_mlp_fc2": ("clip_g", "encoder.layers.1.mlp.fc2.weight"),
        "lora_te3_encoder_block_0_layer_1_DenseReluDense_wo": ("t5xxl", "encoder.block.0.layer.1.DenseReluDense.wo.weight"),
    }  # fmt: skip
    modules = {}
    for i, (name, (part, key)) in enumerate(names.items()):
        file, model_part = parts[part]
        modules[name] = random_module(tuple(model_part.recipes[key].shape(file.source)), 3, 1.5, seed=10 + i)
    targets = [MergeTarget(sd3, tmp_path / "sd3.safetensors"), MergeTarget(clip_l, tmp_path / "clip_l.safetensors")]
    plan_merge(SD3, targets, [lora_file(modules, ratio=-0.6)])
    outputs = [merge_to_state(t) for t in targets]
    assert list(outputs[0]) == sd3.keys() and list(outputs[1]) == clip_l.keys()
    changed = set()
    for name, (part, key) in names.items():
        for file, out in ((sd3, outputs[0]), (clip_l, outputs[1])):
            model_part = file.parts.get(part)
            if model_part is None:
                continue
            (stored,) = model_part.recipes[key].sources
            changed.add(stored)
            torch.testing.assert_close(out[stored], file.read_key(stored) + delta_of(modules[name], -0.6), rtol=0,
                                       atol=1e-6)  # fmt: skip
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in changed  # the separate CLIP-L file too
    for file, out in ((sd3, outputs[0]), (clip_l, outputs[1])):
        for key in set(out) - changed:
            assert torch.equal(out[key], file.read_key(key)), key  # the VAE and everything else as it was


# ---- LoRA + LoRA -----------------------------------------------------------------------------------------------


def three_loras() -> list[LoRAFile]:
    linear, conv = (64, 32), (16, 8, 2, 2)
    return [
        lora_file({"lora_unet_a": random_module(linear, 2, 1.0, 0), "lora_unet_c": random_module(conv, 2, 4.0, 1)},
                  ratio=0.7, name="one"),
        lora_file({"lora_unet_a": random_module(linear, 5, 10.0, 2), "lora_unet_b": random_module(linear, 4, 4.0, 3)},
                  ratio=-1.3, name="two"),
        lora_file({"lora_unet_a": random_module(linear, 3, 3.0, 4), "lora_unet_c": random_module(conv, 6, 1.0, 5)},
                  ratio=0.25, name="three"),
    ]  # fmt: skip


@pytest.mark.parametrize("shuffle", [False, True])
def test_concatenation_keeps_every_lora_delta_exactly(shuffle):
    loras = three_loras()
    tensors, ranks = concat_loras(loras, torch.float32, shuffle, torch.Generator().manual_seed(0))
    assert sorted(ranks) == [4, 8, 10]
    for name in ("lora_unet_a", "lora_unet_b", "lora_unet_c"):
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert float(tensors[f"{name}.alpha"]) == down.shape[0]
        expected = sum(delta_of(lora.modules[name], lora.ratio) for lora in loras if name in lora.modules)
        torch.testing.assert_close(lora_delta(down, up), expected, rtol=1e-5, atol=1e-7)


def test_merging_the_concatenated_lora_equals_merging_each(tiny_models):
    original = bfl_state(tiny_models["flux_dev"])
    keys = ("double_blocks.1.txt_mlp.0.weight", "single_blocks.0.linear2.weight")
    loras = [lora_file({"lora_unet_" + k.removesuffix(".weight").replace(".", "_"):
                        random_module(tuple(original[k].shape), rank, alpha, seed=rank) for k in keys}, ratio)
             for rank, alpha, ratio in ((2, 1.0, 0.8), (6, 12.0, -0.4))]  # fmt: skip
    tensors, _ = concat_loras(loras, torch.float32, shuffle=False)
    names = {k.partition(".")[0] for k in tensors}
    combined = lora_file({n: LoRAWeights(tensors[f"{n}.lora_down.weight"], tensors[f"{n}.lora_up.weight"],
                                         float(tensors[f"{n}.alpha"])) for n in names})  # fmt: skip
    results = []
    for given in (loras, [combined]):
        target = MergeTarget(open_flux_file(tiny_models["flux_dev"], "--flux_model"), Path("x.safetensors"))
        plan_merge(FLUX, [target], given)
        results.append(merge_to_state(target))
    for key in keys:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=1e-6)
        assert not torch.equal(results[0][key], original[key])


def test_concatenation_refuses_modules_of_different_shapes():
    loras = [lora_file({"lora_unet_a": random_module((64, 32), 2, 1.0, 0)}, name="small"),
             lora_file({"lora_unet_a": random_module((64, 48), 2, 1.0, 1)}, name="large")]  # fmt: skip
    with pytest.raises(UserError, match=r"lora_unet_a changes weights of different shapes \(small.safetensors"):
        concat_loras(loras, torch.float32, shuffle=False)


# ---- what users get wrong --------------------------------------------------------------------------------------


def test_merge_errors_and_left_out_parts(tiny_models, caplog):
    target = MergeTarget(open_flux_file(tiny_models["flux_dev"], "--flux_model"), Path("x.safetensors"))
    sd3_like = lora_file({"lora_unet_joint_blocks_0_x_block_attn_qkv": random_module((192, 64), 2, 1.0, 0)})
    with pytest.raises(UserError, match=r"not a FLUX.1 LoRA .*an SD3/SD3.5 LoRA\? use networks/sd3_merge_lora.py"):
        check_family(FLUX, sd3_like)
    unknown = lora_file({"lora_unet_double_blocks_7_img_attn_qkv": random_module((768, 256), 2, 1.0, 0)})
    with pytest.raises(UserError, match=r"1 of its modules are in none of the given models \(FLUX.1 denoiser\): "
                                        r"lora_unet_double_blocks_7_img_attn_qkv"):  # fmt: skip
        plan_merge(FLUX, [target], [unknown])
    wrong_size = lora_file({"lora_unet_txt_in": random_module((3072, 4096), 2, 1.0, 0)})
    expected = r"lora_unet_txt_in changes a \(3072, 4096\) weight, but FLUX.1 denoiser txt_in.weight .* is \(256, 128\)"
    with pytest.raises(UserError, match=expected + "; was the LoRA made for another model size"):
        plan_merge(FLUX, [target], [wrong_size])
    with_te = lora_file({"lora_unet_txt_in": random_module((256, 128), 2, 1.0, 0),
                         "lora_te1_text_model_encoder_layers_0_mlp_fc1": random_module((256, 128), 2, 1.0, 1)})  # fmt: skip
    with caplog.at_level(logging.WARNING):
        plan_merge(FLUX, [target], [with_te])
    assert "1 CLIP-L modules left out; give --clip_l to merge them" in caplog.text
    assert target.merged_modules == 1
    te_only = lora_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1": random_module((256, 128), 2, 1.0, 1)})
    with pytest.raises(UserError, match="none of its modules belongs to the given models; nothing to merge"):
        plan_merge(FLUX, [MergeTarget(target.file, Path("y.safetensors"))], [te_only])
