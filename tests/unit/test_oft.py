"""OFT for FLUX.1 (networks/oft_flux.py on networks/oft.py): upstream's modules, keys and counts, the rotation and its
constraint, applied = merged = the formula W'ₖ = R_effₖᵀ Wₖ, saving and building from a file, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from library.errors import UserError
from library.memory.fp8 import cast_linear_weights_to_fp8, enable_fp8_linear
from library.models.flux.model import Flux, FluxParams
from networks import oft_flux
from networks.adapter import network_module_for_keys
from networks.oft import OFTModule, cayley, clamped_skew
from tests.unit.test_lora import flux_inputs, tiny_flux


@pytest.fixture(autouse=True)
def one_thread():
    """Many small batched factorizations: on a busy 2-core machine, handing each to two threads costs 20x more than
    it gains (the base model's forward slows down too), so these tests run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_blocks(network: nn.Module, seed: int = 5, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if ".oft_blocks." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def reference_weight(weight: torch.Tensor, blocks: list[torch.Tensor], splits: list[int], alpha: float,
                     multiplier: float) -> torch.Tensor:  # fmt: skip
    """The notes' formula written out independently: per split, Q = B - Bᵀ with ‖Q‖ clamped to alpha * split,
    R = (I+Q)(I-Q)⁻¹ by an explicit inverse per block, R_eff = m (R - I) + I, and W' = blockdiag(R_effₖᵀ) W."""
    rows, start = [], 0
    for b, split in zip(blocks, splits):
        b = b.double()
        q = b - b.transpose(1, 2)
        norm = torch.linalg.norm(q)
        if norm > alpha * split:
            q = q * (alpha * split / norm)
        eye = torch.eye(q.shape[-1], dtype=q.dtype)
        r = (eye + q) @ torch.stack([torch.linalg.inv(m) for m in eye - q])
        r_eff = multiplier * (r - eye) + eye
        rows.append(torch.block_diag(*[m.T for m in r_eff]) @ weight[start : start + split].double())
        start += split
    return torch.cat(rows).float()


# ---- upstream's modules, keys and counts ---------------------------------------------------------------------


@pytest.mark.parametrize(("all_linear", "modules", "keys", "params"),
                         [("False", 76, 228, 11_206_732), ("True", 304, 798, 240_943_408)])  # fmt: skip
def test_counts_on_the_real_flux_shapes(all_linear, modules, keys, params):
    with torch.device("meta"):
        flux = Flux(FluxParams())
        network = oft_flux.create_network(1.0, 128, 1e-3, None, None, flux, enable_all_linear=all_linear)
    state = network.state_dict()
    assert len(network.adapters) == modules and len(state) == keys
    assert sum(v.numel() for v in state.values()) == params
    assert all(k.startswith("oft_unet_") for k in state)
    assert state["oft_unet_double_blocks_18_txt_attn_qkv.oft_blocks.2"].shape == (128, 24, 24)  # q/k/v: 3072 each
    assert state["oft_unet_double_blocks_0_img_attn_proj.alpha"].shape == ()
    if all_linear == "True":
        assert state["oft_unet_single_blocks_37_linear1.oft_blocks.3"].shape == (128, 96, 96)  # the MLP input: 12288
        assert "oft_unet_single_blocks_0_linear1.oft_blocks.4" not in state
        assert state["oft_unet_double_blocks_0_img_mod_lin.oft_blocks.0"].shape == (128, 144, 144)  # 6 x 3072
    else:
        assert {k.split(".")[0].rsplit("_", 1)[1] for k in state} == {"qkv", "proj"}
        assert not any("single_blocks" in k for k in state)


@pytest.mark.parametrize("value", ["False", "false", "0", False])
def test_enable_all_linear_false_is_false(value):
    """Upstream turns it on for the string "False" (bool(str))."""
    network = oft_flux.create_network(1.0, 4, 1e-3, None, None, tiny_flux(), enable_all_linear=value)
    assert len(network.adapters) == 8  # 2 double blocks x img/txt x qkv/proj


def test_enable_all_linear_bad_value_is_a_user_error():
    with pytest.raises(UserError, match="enable_all_linear=yes please: expected True or False"):
        oft_flux.create_network(1.0, 4, 1e-3, None, None, tiny_flux(), enable_all_linear="yes please")


def test_a_dim_that_does_not_divide_a_split_is_one_clear_error():
    with pytest.raises(UserError, match=r"--network_dim 5: .*oft_unet_double_blocks_0_img_attn_qkv has a split of 256 "
                                        r"rows; use a divisor of 256, .*\(e.g. 4 or 8\)"):  # fmt: skip
        oft_flux.create_network(1.0, 5, 1e-3, None, None, tiny_flux())
    with pytest.raises(UserError, match="--network_dim 0: .* at least 1"):
        oft_flux.create_network(1.0, 0, 1e-3, None, None, tiny_flux())
    with pytest.raises(UserError, match="--network_alpha -1.0: .* positive"):
        oft_flux.create_network(1.0, 4, -1.0, None, None, tiny_flux())
    with pytest.raises(ValueError, match="3 blocks do not divide"):
        OFTModule("x", nn.Linear(4, 8), dim=3)


def test_alpha_defaults_to_upstreams_1e_3():
    network = oft_flux.create_network(1.0, 4, None, None, None, tiny_flux())
    assert all(float(m.alpha) == pytest.approx(1e-3) for m in network.adapters)


# ---- the rotation ---------------------------------------------------------------------------------------------


def test_at_initialisation_the_output_is_the_base_output():
    flux, inputs = tiny_flux(), flux_inputs()
    expected = flux(**inputs)
    network = oft_flux.create_network(1.0, 16, 1e-3, None, None, flux, enable_all_linear="True")
    network.apply_to(None, flux)
    assert torch.equal(flux(**inputs), expected)


def test_rotations_stay_orthogonal_and_within_the_constraint_while_training():
    flux, inputs = tiny_flux(), flux_inputs()
    flux.requires_grad_(False)
    base = flux(**inputs).detach()
    network = oft_flux.create_network(1.0, 16, 1e-3, None, None, flux, enable_all_linear="True")
    network.apply_to(None, flux)
    params, _ = network.prepare_optimizer_params(None, None, 1.0)
    optimizer = torch.optim.AdamW(params, lr=1.0)  # far past the constraint after one step
    target = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(flux(**inputs), target)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in network.parameters() if p.requires_grad)
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.allclose(flux(**inputs), base)
    clamped = 0
    for module in network.adapters:
        for blocks, rotation, size in zip(module.oft_blocks, module.rotations(), module.split_dims):
            eye, r = torch.eye(rotation.shape[-1]), rotation.detach().double()  # R checked exactly, not in fp32
            assert float((r.transpose(1, 2) @ r - eye).norm()) < 1e-5, module.name
            raw = blocks.detach() - blocks.detach().transpose(1, 2)
            clamped += float(raw.norm()) > 1e-3 * size
            # the rotation's Q, recovered from R: Q = (R - I)(R + I)⁻¹, has the clamped norm
            q = torch.stack([(m - eye) @ torch.linalg.inv(m + eye) for m in r])  # one block at a time (LU, see below)
            assert float(q.norm()) <= 1e-3 * size * (1 + 1e-4)
    assert clamped == sum(len(m.split_dims) for m in network.adapters)  # every split was held by the constraint


def test_applied_equals_merged_equals_the_formula():
    flux, inputs = tiny_flux(), flux_inputs()
    base_weights = {n: m.weight.detach().clone() for n, m in flux.named_modules() if isinstance(m, nn.Linear)}
    network = oft_flux.create_network(0.8, 16, 0.05, None, None, flux, enable_all_linear="True")
    randomize_blocks(network)
    network.apply_to(None, flux)
    applied = flux(**inputs)
    network.set_enabled(False)
    base = flux(**inputs)
    network.set_enabled(True)
    assert (applied - base).abs().max() > 1e-2  # the rotation changes the output

    for module in network.adapters:
        expected = reference_weight(module.org_module.weight.detach(), list(module.oft_blocks), list(module.split_dims),
                                    0.05, 0.8)  # fmt: skip
        torch.testing.assert_close(module.merged_weight(module.org_module.weight.data, 0.8, None), expected,
                                   rtol=0, atol=1e-5)  # fmt: skip
    network.merge_into_base()
    torch.testing.assert_close(flux(**inputs), applied, rtol=0, atol=1e-4)  # merged and still applied: no double effect
    network.remove()
    torch.testing.assert_close(flux(**inputs), applied, rtol=0, atol=1e-4)
    network.unmerge()
    for name, module in flux.named_modules():
        if isinstance(module, nn.Linear):
            torch.testing.assert_close(module.weight, base_weights[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(flux(**inputs), base, rtol=0, atol=1e-5)


def test_the_multiplier_scales_the_rotation_and_may_differ_per_sample():
    flux, inputs = tiny_flux(), flux_inputs()
    network = oft_flux.create_network(1.0, 4, 0.05, None, None, flux)
    randomize_blocks(network)
    network.apply_to(None, flux)
    full = flux(**inputs)
    network.set_multiplier(0.0)
    base = flux(**inputs)
    network.set_multiplier(torch.tensor([0.0, 1.0]))
    mixed = flux(**inputs)
    torch.testing.assert_close(mixed[0], base[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], full[1], rtol=0, atol=1e-6)


def test_the_rotation_stacks_on_an_fp8_base():
    """fp8 weights upcast on the fly (layer BASE) under the rotation (layer ADAPTER): the same as OFT on the fp32
    copies of those fp8 weights; taking OFT out leaves the fp8 model as it was."""
    flux, reference, inputs = tiny_flux(), tiny_flux(), flux_inputs()
    cast_linear_weights_to_fp8(flux.double_blocks)
    enable_fp8_linear(flux)
    with torch.no_grad():
        for layer in reference.double_blocks.modules():
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(layer.weight.to(torch.float8_e4m3fn).float())
    base = flux(**inputs)
    network = oft_flux.create_network(1.0, 4, 0.05, None, None, flux)
    randomize_blocks(network)
    network.apply_to(None, flux)
    on_reference = oft_flux.create_network(1.0, 4, 0.05, None, None, reference)
    on_reference.load_state_dict(network.state_dict())
    on_reference.apply_to(None, reference)
    applied = flux(**inputs)
    assert (applied - base).abs().max() > 1e-2
    torch.testing.assert_close(applied, reference(**inputs), rtol=0, atol=1e-5)
    network.remove()
    assert torch.equal(flux(**inputs), base)


def test_cayley_is_the_identity_at_zero_and_a_rotation_for_any_q():
    zeros = torch.zeros(3, 5, 5)
    assert torch.equal(cayley(clamped_skew(zeros, 1.0)), torch.eye(5).expand(3, 5, 5))
    # 4 blocks of 384 rows on two threads: where PyTorch's batched CPU LU fails (pytorch#142815)
    torch.set_num_threads(2)
    blocks = torch.randn(4, 384, 384, generator=torch.Generator().manual_seed(1)) * 0.01
    q = clamped_skew(blocks, 2.0)
    assert float(q.norm()) == pytest.approx(2.0, rel=1e-5)
    eye = torch.eye(384, dtype=torch.float64)
    expected = (eye + q.double()) @ torch.stack([torch.linalg.inv(m) for m in eye - q.double()])
    torch.testing.assert_close(cayley(q).double(), expected, rtol=0, atol=1e-6)


# ---- saving, building from a file, loading ----------------------------------------------------------------------


def test_save_and_build_from_the_file(tmp_path):
    flux, inputs = tiny_flux(), flux_inputs()
    trained = oft_flux.create_network(1.0, 16, 0.02, None, None, flux, enable_all_linear="True")
    randomize_blocks(trained)
    path = tmp_path / "oft.safetensors"
    trained.save_weights(path, None, {"ss_network_module": "networks.oft_flux"})
    trained.apply_to(None, flux)
    expected = flux(**inputs)
    trained.remove()

    network, weights = oft_flux.create_network_from_weights(0.5, str(path), None, None, flux, for_inference=True)
    assert {m.name for m in network.adapters} == {m.name for m in trained.adapters}  # all linear, from the keys
    assert {m.dim for m in network.adapters} == {16} and network.largest_dim() == (16, pytest.approx(0.02))
    network.set_multiplier(1.0)
    network.apply_to(None, flux)
    network.load_weights(weights, strict=True)
    torch.testing.assert_close(flux(**inputs), expected, rtol=0, atol=1e-6)

    no_alpha = {k: v for k, v in weights.items() if not k.endswith(".alpha")}
    with pytest.raises(UserError, match="has no alpha"):
        oft_flux.create_network_from_weights(1.0, None, None, None, flux, no_alpha)
    with pytest.raises(UserError, match="no '<name>.oft_blocks.0' keys, so not an OFT file"):
        oft_flux.create_network_from_weights(1.0, None, None, None, flux, {"lora_unet_x.alpha": torch.tensor(1.0)})
    other = {"oft_unet_double_blocks_7_img_attn_qkv.oft_blocks.0": torch.zeros(4, 64, 64),
             "oft_unet_double_blocks_7_img_attn_qkv.alpha": torch.tensor(1e-3)}  # fmt: skip
    with pytest.raises(UserError, match="modules not in this FLUX.1 model: oft_unet_double_blocks_7_img_attn_qkv"):
        oft_flux.create_network_from_weights(1.0, None, None, None, flux, other)
    lycoris = {**weights, "oft_unet_double_blocks_0_img_attn_qkv.oft_blocks": torch.zeros(8, 32, 32)}
    with pytest.raises(UserError, match=r"keys a plain OFT cannot load: oft_unet_double_blocks_0_img_attn_qkv\."):
        network.load_weights(lycoris, strict=True)


def test_continuing_training_from_a_file_and_the_optimizer_groups(tmp_path):
    flux = tiny_flux()
    first = oft_flux.create_network(1.0, 4, 1e-3, None, None, flux)
    randomize_blocks(first)
    path = tmp_path / "oft.safetensors"
    first.save_weights(path, torch.bfloat16, None)
    network = oft_flux.create_network(1.0, 4, 1e-3, None, None, flux, enable_all_linear="True",
                                      network_reg_lrs="single_blocks=1e-5")  # fmt: skip
    network.apply_to(None, flux)
    network.load_weights(path)
    state = network.state_dict()
    for key, value in first.state_dict().items():  # bf16 in the file
        torch.testing.assert_close(state[key], value.bfloat16().float(), rtol=0, atol=0, msg=key)
    assert not any(v.any() for k, v in state.items() if "single_blocks" in k and ".oft_blocks." in k)  # fresh
    params, names = network.prepare_optimizer_params(None, None, 1e-3)
    assert names == ["unet reg_lr_0", "unet"] and [g["lr"] for g in params] == [1e-5, 1e-3]
    assert sum(len(g["params"]) for g in params) == sum(1 for _ in network.parameters())


def test_the_file_keys_choose_the_network_module():
    oft_keys, lora_keys = ["oft_unet_double_blocks_0_img_attn_qkv.alpha"], ["lora_unet_img_in.alpha"]
    assert network_module_for_keys(oft_keys, "networks.lora_flux", "f") == "networks.oft_flux"
    assert network_module_for_keys(lora_keys, "networks.oft_flux", "f") == "networks.lora_flux"
    assert network_module_for_keys(lora_keys, "networks.lora_flux", "f") == "networks.lora_flux"
    assert network_module_for_keys(oft_keys, "networks.oft_flux", "f") == "networks.oft_flux"
    with pytest.raises(UserError, match="sd3.safetensors: holds OFT weights .* which networks.lora_sd3 does not read"):
        network_module_for_keys(oft_keys, "networks.lora_sd3", "sd3.safetensors")


def test_inference_reads_an_oft_file_through_the_lora_option(tmp_path):
    from library.inference.lora_files import apply_lora_files, network_from_weights_for

    flux, inputs = tiny_flux(), flux_inputs()
    trained = oft_flux.create_network(1.0, 4, 0.05, None, None, flux)
    randomize_blocks(trained)
    path = tmp_path / "oft.safetensors"
    save_file(trained.state_dict(), str(path))
    trained.set_multiplier(0.8)
    trained.apply_to(None, flux)
    expected = flux(**inputs)
    trained.remove()
    create = network_from_weights_for("networks.lora_flux")
    (applied,) = apply_lora_files([f"{path};0.8"], create, flux, [None, None], merge=False, device="cpu")
    assert applied.KIND == "OFT"
    torch.testing.assert_close(flux(**inputs), expected, rtol=0, atol=1e-6)
    applied.remove()
    merged_flux = copy.deepcopy(flux)
    apply_lora_files([f"{path};0.8"], create, merged_flux, [None, None], merge=True, device="cpu")
    torch.testing.assert_close(merged_flux(**inputs), expected, rtol=0, atol=1e-4)
