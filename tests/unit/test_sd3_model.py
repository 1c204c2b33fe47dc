"""The SD3/SD3.5 MMDiT: real architectures counted on the meta device, parity with diffusers'
SD3Transformer2DModel loaded from the same tiny single files through diffusers' own converter (and checks that
the comparison fails when the position crop, qk-norm or attn2 is broken), the forward's options, and the
position-embedding formulas."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from einops import rearrange
from safetensors.torch import load_file
from torch import nn

import library.models.sd3.layers as layers
import library.models.sd3.model as model_module
from library.memory.checkpointing import disable_block_checkpointing, enable_block_checkpointing
from library.models.sd3.loading import load_sd3_mmdit, open_sd3_checkpoint
from library.models.sd3.model import REAL_PARAMS, MMDiT, SD3Params
from library.models.sd3.pos_embed import (
    ScaledPosEmbed,
    crop_table,
    patched_size_for_resolution,
    random_offset,
    scaled_sincos_pos_embed,
    sincos_2d_pos_embed,
)
from library.models.sd3.tiny import make_sd3_state_dict, tiny_sd3_params

LATENT_H, LATENT_W, CONTEXT_LEN = 32, 48, 45  # non-square, so a transposed or misplaced crop shows
ROLES = ("sd3_medium", "sd3_5_medium", "sd3_5_large")


@pytest.mark.parametrize(
    "variant, billions, linears, name, arch, max_px",
    [
        ("medium", 2.028, 237, "SD3 Medium", "stable-diffusion-3-medium", 3072),
        ("5-medium", 2.243, 263, "SD3.5 Medium", "stable-diffusion-3-5-medium", 6144),
        ("5-large", 8.057, 377, "SD3.5 Large", "stable-diffusion-3-5-large", 3072),
    ],
)
def test_real_architectures_have_upstreams_sizes(variant, billions, linears, name, arch, max_px):
    params = REAL_PARAMS[variant]
    with torch.device("meta"):
        model = MMDiT(params)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 3) == billions
    assert sum(isinstance(m, nn.Linear) for m in model.joint_blocks.modules()) == linears  # default LoRA modules
    assert (params.variant, params.display_name, params.modelspec_architecture) == (variant, name, arch)
    assert params.max_image_size == max_px
    state = model.state_dict()
    assert state["pos_embed"].shape == (1, params.pos_embed_max_size**2, 64 * params.depth)
    last = f"joint_blocks.{params.depth - 1}.context_block."
    expected_last = {"attn.qkv.weight", "attn.qkv.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"}
    if params.qk_norm:
        expected_last |= {"attn.ln_q.weight", "attn.ln_k.weight"}
    assert {k[len(last) :] for k in state if k.startswith(last)} == expected_last
    assert state[last + "adaLN_modulation.1.weight"].shape[0] == 2 * params.hidden_size
    dual = [i for i in range(params.depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in state]
    assert dual == list(params.x_block_self_attn_layers)
    for i in dual:
        assert state[f"joint_blocks.{i}.x_block.adaLN_modulation.1.weight"].shape[0] == 9 * params.hidden_size


def test_params_are_validated():
    with pytest.raises(ValueError, match="block indices"):
        SD3Params(depth=2, x_block_self_attn_layers=(2,))
    with pytest.raises(ValueError, match="depth"):
        SD3Params(depth=0)


def _diffusers_model(state: dict[str, torch.Tensor], params: SD3Params) -> SD3Transformer2DModel:
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(state))  # it pops from its input
    with torch.device("meta"):
        reference = SD3Transformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=params.depth, attention_head_dim=64,
            num_attention_heads=params.depth, caption_projection_dim=64 * params.depth,
            joint_attention_dim=params.context_in_dim, pooled_projection_dim=params.adm_in_dim,
            pos_embed_max_size=params.pos_embed_max_size, qk_norm="rms_norm" if params.qk_norm else None,
            dual_attention_layers=params.x_block_self_attn_layers,
        )  # fmt: skip
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference.eval()


@pytest.fixture(scope="module", params=ROLES)
def parity(request, tiny_sd3_models):
    path = tiny_sd3_models[request.param]
    checkpoint = open_sd3_checkpoint(path)
    ours = load_sd3_mmdit(path, dtype=torch.float32)
    file_state = load_file(str(path))
    mmdit_state = {k[len(checkpoint.prefix) :]: file_state[k] for k in checkpoint.mmdit_keys()}
    reference = _diffusers_model(mmdit_state, checkpoint.params)
    generator = torch.Generator().manual_seed(0)
    params = checkpoint.params
    inputs = dict(
        x=torch.randn(2, 16, LATENT_H, LATENT_W, generator=generator),
        timesteps=torch.tensor([0.3, 0.87]) * 1000,
        y=torch.randn(2, params.adm_in_dim, generator=generator),
        context=torch.randn(2, CONTEXT_LEN, params.context_in_dim, generator=generator),
    )
    with torch.no_grad():
        expected = reference(
            hidden_states=inputs["x"], encoder_hidden_states=inputs["context"], pooled_projections=inputs["y"],
            timestep=inputs["timesteps"], return_dict=False,
        )[0]  # fmt: skip
    return request.param, ours, inputs, expected


def _relative_error(ours: MMDiT, inputs: dict, expected: torch.Tensor) -> float:
    with torch.no_grad():
        out = ours(**inputs)
    assert out.shape == expected.shape == inputs["x"].shape
    return ((out - expected).abs().max() / expected.abs().max()).item()


def test_matches_diffusers(parity):
    _, ours, inputs, expected = parity
    assert _relative_error(ours, inputs, expected) <= 1e-5


_original_crop = crop_table


def _transposed_crop(table, grid, h, w, offset=None):
    return _original_crop(table, grid, w, h, offset).reshape(1, w, h, -1).transpose(1, 2).reshape(1, h * w, -1)


@pytest.mark.parametrize(
    "what, replacement",
    [
        ("top-left crop", lambda table, grid, h, w, offset=None: _original_crop(table, grid, h, w, (0, 0))),
        ("crop one row low", lambda t, g, h, w, o=None: _original_crop(t, g, h, w, ((g - h) // 2 + 1, (g - w) // 2))),
        ("rows and columns swapped", _transposed_crop),
    ],
)
def test_parity_fails_with_a_wrong_position_crop(parity, monkeypatch, what, replacement):
    _, ours, inputs, expected = parity
    monkeypatch.setattr(model_module, "crop_table", replacement)
    assert _relative_error(ours, inputs, expected) > 1e-3, what


@pytest.mark.parametrize("parity", ["sd3_5_medium", "sd3_5_large"], indirect=True)
def test_parity_fails_without_qk_norm(parity, monkeypatch):
    _, ours, inputs, expected = parity
    monkeypatch.setattr(layers.RMSNorm, "forward", lambda self, x: x)
    assert _relative_error(ours, inputs, expected) > 1e-3


_original_attention = layers.attention


def _upstream_attn2_heads(image_tokens: int):
    """Upstream's SD3.5M bug: attn2 reshaped into heads of ``num_heads`` channels instead of 64."""

    def attention(q, k, v):
        if q.shape[2] != image_tokens:  # the joint attention also sees the context tokens
            return _original_attention(q, k, v)
        heads = q.shape[1]
        regroup = lambda t: rearrange(t, "B H L D -> B L (H D)").unflatten(-1, (-1, heads)).transpose(1, 2)  # noqa: E731
        return F.scaled_dot_product_attention(regroup(q), regroup(k), regroup(v)).transpose(1, 2).flatten(2)

    return attention


@pytest.mark.parametrize("parity", ["sd3_5_medium"], indirect=True)
@pytest.mark.parametrize("breakage", ["no attn2", "upstream's head split"])
def test_parity_fails_with_a_broken_attn2(parity, monkeypatch, breakage):
    _, ours, inputs, expected = parity
    block = ours.joint_blocks[0].x_block
    if breakage == "no attn2":
        monkeypatch.setattr(block.attn2.proj, "forward", lambda x: torch.zeros_like(x))
    else:
        monkeypatch.setattr(layers, "attention", _upstream_attn2_heads(LATENT_H * LATENT_W // 4))
    assert _relative_error(ours, inputs, expected) > 1e-3, breakage


@pytest.fixture(scope="module")
def tiny_model() -> MMDiT:
    params = tiny_sd3_params("5-medium", context_in_dim=64, adm_in_dim=32, pos_embed_max_size=16)
    model = MMDiT(params)
    model.load_state_dict(make_sd3_state_dict(params, seed=3))
    return model.eval()


def _inputs(model: MMDiT, height: int = 12, width: int = 20, batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(batch, 16, height, width, generator=generator),
        timesteps=torch.tensor([250.0, 900.0][:batch]),
        y=torch.randn(batch, model.params.adm_in_dim, generator=generator),
        context=torch.randn(batch, 7, model.params.context_in_dim, generator=generator),
    )


@torch.no_grad()
def test_cropped_pos_embed_and_the_pos_embed_argument(tiny_model):
    grid = tiny_model.pos_embed.reshape(16, 16, -1)
    centred = tiny_model.cropped_pos_embed(6, 10)
    torch.testing.assert_close(centred[0], grid[5:11, 3:13].reshape(60, -1), rtol=0, atol=0)
    shifted = tiny_model.cropped_pos_embed(6, 10, offset=(10, 0))
    torch.testing.assert_close(shifted[0], grid[10:16, 0:10].reshape(60, -1), rtol=0, atol=0)
    inputs = _inputs(tiny_model)
    default = tiny_model(**inputs)
    torch.testing.assert_close(tiny_model(**inputs, pos_embed=centred), default, rtol=0, atol=0)
    assert not torch.allclose(tiny_model(**inputs, pos_embed=shifted), default)
    with pytest.raises(ValueError, match="does not fit 6x10 patches"):
        tiny_model(**inputs, pos_embed=tiny_model.cropped_pos_embed(5, 10))
    with pytest.raises(ValueError, match="outside"):
        tiny_model.cropped_pos_embed(6, 10, offset=(11, 0))


def test_images_beyond_the_position_table_and_odd_latents_are_refused(tiny_model):
    with pytest.raises(ValueError, match=r"272x256 px image \(17x16 patches\) exceeds .* at most 256 px per side"):
        tiny_model.cropped_pos_embed(17, 16)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        tiny_model(**_inputs(tiny_model, height=13))


def test_block_checkpointing_attached_from_outside_keeps_gradients(tiny_model):
    inputs = _inputs(tiny_model, batch=1)
    weight = tiny_model.joint_blocks[0].x_block.attn2.qkv.weight

    def gradient() -> torch.Tensor:
        weight.requires_grad_(True)
        tiny_model(**inputs).square().mean().backward()
        grad, weight.grad = weight.grad, None
        weight.requires_grad_(False)
        return grad

    plain = gradient()
    assert enable_block_checkpointing(tiny_model.joint_blocks) == 2
    try:
        torch.testing.assert_close(gradient(), plain)
    finally:
        disable_block_checkpointing(tiny_model.joint_blocks)


@torch.no_grad()
def test_bf16_model_takes_fp32_timesteps(tiny_model):
    bf16 = MMDiT(tiny_model.params).to(torch.bfloat16)
    bf16.load_state_dict(tiny_model.state_dict())
    inputs = _inputs(tiny_model)
    out = bf16(**{k: v.bfloat16() if k != "timesteps" else v for k, v in inputs.items()})
    expected = tiny_model(**inputs)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - expected).abs().max() / expected.abs().max()).item() < 0.05


def test_sincos_table_matches_diffusers_and_the_formula():
    dim, grid = 64, 12
    table = sincos_2d_pos_embed(dim, grid)
    reference = get_2d_sincos_pos_embed(dim, grid, base_size=grid, output_type="pt")  # coordinates 0..grid-1
    torch.testing.assert_close(table[0], reference.float(), rtol=0, atol=1e-6)
    row, col, k = 7, 3, 5
    omega = 10000 ** (-k / (dim / 4))
    token = table[0, row * grid + col]
    expected = [math.sin(col * omega), math.cos(col * omega), math.sin(row * omega), math.cos(row * omega)]
    actual = [token[k], token[dim // 4 + k], token[dim // 2 + k], token[3 * dim // 4 + k]]
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=0, atol=1e-6)
    scaled = sincos_2d_pos_embed(dim, grid, scaling_factor=2.0, offset=1.5)
    torch.testing.assert_close(scaled[0, row * grid + col, k], torch.tensor(math.sin((col / 2 - 1.5) * omega)))


@pytest.mark.parametrize("p", [16, 23, 64])
def test_scaled_table_follows_upstreams_formula(p):
    dim = 32
    grid = int(1.5 * p)
    table = scaled_sincos_pos_embed(dim, p)
    assert table.shape == (1, grid * grid, dim)
    # upstream's own expression: arange(G)/G * scale - shift, scale = 16 G / p, shift = scale (G - p) / (2 G)
    scale = 16 * grid / p
    coords = torch.arange(grid, dtype=torch.float64) / grid * scale - scale * (grid - p) / (2 * grid)
    omega = 10000 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    angles = coords[:, None] * omega
    for row, col in [(0, 0), (grid - 1, 2), (grid // 2, grid - 1)]:
        expected = torch.cat([angles[col].sin(), angles[col].cos(), angles[row].sin(), angles[row].cos()])
        torch.testing.assert_close(table[0, row * grid + col].double(), expected, rtol=0, atol=1e-6)
    if (grid - p) % 2 == 0:  # the centred p x p crop spans [0, 16)
        first = (grid - p) // 2
        assert coords[first] == pytest.approx(0.0) and coords[first + p - 1] == pytest.approx(16 * (p - 1) / p)


def test_patched_size_for_dataset_resolutions():
    assert patched_size_for_resolution(1024, 1024) == 64
    assert patched_size_for_resolution(768, 512) == 39  # round(sqrt(393216)) = 627; 627 // 8 = 78; 78 // 2
    assert patched_size_for_resolution(512, 512) == 32


def test_scaled_tables_are_chosen_by_token_area():
    tables = ScaledPosEmbed.from_resolutions(32, [(1024, 1024), (512, 512), (768, 768), (512, 512)])
    assert tables.patched_sizes == (32, 48, 64)
    assert tables.thresholds == ((32**2 + 48**2) // 2, (48**2 + 64**2) // 2, 96**2)
    cases = {(32, 32): 32, (40, 41): 32, (41, 41): 48, (48, 66): 48, (57, 57): 64, (96, 96): 64, (97, 96): 64}
    for (h, w), p in cases.items():
        assert tables.patched_size_for(h, w) == p, (h, w)
    h, w = 30, 40
    grid = int(1.5 * 32)
    expected = crop_table(scaled_sincos_pos_embed(32, 32), grid, h, w, ((grid - h) // 2, (grid - w) // 2))
    torch.testing.assert_close(tables.table_for(h, w), expected, rtol=0, atol=0)
    shifted = crop_table(scaled_sincos_pos_embed(32, 32), grid, h, w, (0, 8))
    torch.testing.assert_close(tables.table_for(h, w, offset=(0, 8)), shifted, rtol=0, atol=0)
    assert tables.grid_size_for(h, w) == grid


def test_a_table_too_small_for_a_wide_image_is_built_with_a_warning(caplog):
    tables = ScaledPosEmbed(32, [32, 64])
    assert tables.patched_size_for(10, 50) == 32  # area 500 -> 32, whose 48-wide table cannot hold 50 columns
    with caplog.at_level(logging.WARNING):
        wide = tables.table_for(10, 50)
        again = tables.table_for(10, 50)
    assert sum("adding a table for p=50" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(wide, crop_table(scaled_sincos_pos_embed(32, 50), 75, 10, 50), rtol=0, atol=0)
    torch.testing.assert_close(again, wide, rtol=0, atol=0)
    assert tables.grid_size_for(10, 50) == 75
    # upstream would now send 60x60 (area 3600 <= 75^2) to the p=50 table; the choice by area stays put here
    assert tables.patched_size_for(60, 60) == 64
    torch.testing.assert_close(tables.table_for(60, 60), crop_table(scaled_sincos_pos_embed(32, 64), 96, 60, 60))


@torch.no_grad()
def test_scaled_table_drives_the_model(tiny_model):
    tables = ScaledPosEmbed(tiny_model.params.hidden_size, [8])
    inputs = _inputs(tiny_model)
    out = tiny_model(**inputs, pos_embed=tables.table_for(6, 10))
    assert out.shape == inputs["x"].shape and torch.isfinite(out).all()
    assert not torch.allclose(out, tiny_model(**inputs))


def test_random_offsets_stay_inside_the_table():
    generator = torch.Generator().manual_seed(0)
    offsets = {random_offset(10, 7, 10, generator) for _ in range(200)}
    assert {top for top, _ in offsets} == {0, 1, 2, 3} and {left for _, left in offsets} == {0}
    assert random_offset(30, 7, 10, torch.Generator().manual_seed(5)) == random_offset(
        30, 7, 10, torch.Generator().manual_seed(5)
    )
