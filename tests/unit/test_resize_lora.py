"""networks/resize_lora.py: the kept part is the best low-rank approximation of each module's delta (checked against
the SVD of the full matrix), a resize at full rank is exact (FLUX.1 with CLIP-L and T5-XXL through this project's
loader), the dynamic criteria pick the fewest directions that meet them, and the metadata says what was done."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from networks import lora_flux
from networks.lora import lora_delta, lora_scale
from networks.resize_lora import ResizeSettings, kept_rank, resize_module, resize_state, resized_metadata
from tests.unit.test_lora import flux_inputs, randomize, tiny_clip, tiny_flux, tiny_t5, token_ids


def factors(singular_values: list[float], out: int = 24, inp: int = 20, seed: int = 0):
    """(down, up) whose product has exactly these singular values, with random orthonormal directions."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(singular_values), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(inp, len(singular_values), generator=gen))
    return v.T.contiguous(), u * torch.tensor(singular_values)


def delta(down, up, alpha) -> torch.Tensor:
    return lora_delta(down, up) * lora_scale(alpha, down.shape[0])


def test_keeps_the_largest_singular_directions_with_the_same_strength():
    down, up = factors([10.0, 5.0, 1.0, 0.1])
    down, up = torch.cat([down, down * 0.5]), torch.cat([up, up], dim=1)  # rank 8 whose delta has rank 4
    full = delta(down, up, 2.0)
    result = resize_module(down, up, 2.0, 2, ResizeSettings(2, 2))
    assert result.rank == 2 and result.alpha == pytest.approx(2.0 / 8 * 2)  # alpha/rank is kept
    u, s, vh = torch.linalg.svd(full)
    best = u[:, :2] * s[:2] @ vh[:2]  # Eckart-Young: the best rank-2 approximation
    torch.testing.assert_close(delta(result.down, result.up, result.alpha), best, rtol=1e-4, atol=1e-5)
    assert result.fro_retained == pytest.approx((125 / 126.01) ** 0.5, rel=1e-4)
    assert result.sum_retained == pytest.approx(15 / 16.1, rel=1e-4) and result.max_ratio == pytest.approx(2.0)


def test_a_module_at_or_below_the_rank_is_exact_and_a_zero_delta_gets_rank_one():
    down, up = factors([3.0, 2.0, 1.0])
    result = resize_module(down, up, 1.0, 8, ResizeSettings(8, 8))
    assert result.rank == 3
    torch.testing.assert_close(delta(result.down, result.up, result.alpha), delta(down, up, 1.0))
    zero = resize_module(torch.randn(4, 20), torch.zeros(24, 4), 4.0, 2, ResizeSettings(2, 2))
    assert zero.rank == 1 and not zero.up.any()


@pytest.mark.parametrize(
    ("method", "param", "expected"),
    [
        ("sv_ratio", 5.0, 3),  # 8, 4, 2 > 8 / 5
        ("sv_ratio", 1.0, 1),
        ("sv_fro", 0.9, 2),  # (64 + 16) / 85 >= 0.81, 64 / 85 is not
        ("sv_fro", 1.0, 4),
        ("sv_cumulative", 0.9, 3),  # 14 / 15 >= 0.9, 12 / 15 is not
        ("sv_cumulative", 0.5, 1),
        (None, None, 4),
    ],
)
def test_dynamic_methods_keep_the_fewest_directions_that_meet_them(method, param, expected):
    s = torch.tensor([8.0, 4.0, 2.0, 1.0])
    assert kept_rank(s, 16, method, param) == expected
    assert kept_rank(s, 2, method, param) == min(expected, 2)  # --new_rank caps it


def test_conv_modules_take_new_conv_rank_and_peft_files_stay_peft():
    gen = torch.Generator().manual_seed(0)
    conv = {"lora_unet_x_embedder_proj.lora_down.weight": torch.randn(6, 16, 2, 2, generator=gen),
            "lora_unet_x_embedder_proj.lora_up.weight": torch.randn(32, 6, 1, 1, generator=gen),
            "lora_unet_x_embedder_proj.alpha": torch.tensor(3.0),
            "lora_unet_context_embedder.lora_down.weight": torch.randn(6, 16, generator=gen),
            "lora_unet_context_embedder.lora_up.weight": torch.randn(32, 6, generator=gen)}  # fmt: skip
    out, results = resize_state(conv, ResizeSettings(new_rank=2, new_conv_rank=6))
    assert results["lora_unet_x_embedder_proj"].rank == 6 and results["lora_unet_context_embedder"].rank == 2
    name = "lora_unet_x_embedder_proj"
    torch.testing.assert_close(delta(out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"], out[f"{name}.alpha"]),
                               delta(conv[f"{name}.lora_down.weight"], conv[f"{name}.lora_up.weight"], 3.0))  # fmt: skip
    assert float(out["lora_unet_context_embedder.alpha"]) == 2.0  # no alpha in the file: alpha = rank, scale 1

    peft = {"transformer.proj_out.lora_A.weight": torch.randn(4, 16, generator=gen),
            "transformer.proj_out.lora_B.weight": torch.randn(32, 4, generator=gen)}  # fmt: skip
    metadata = {"lora_adapter_metadata": '{"transformer.lora_alpha": 8, "transformer.r": 4}'}
    out, _ = resize_state(peft, ResizeSettings(4, 4), metadata)
    assert set(out) == set(peft)  # no alphas: PEFT's scale is folded in
    a, b = out["transformer.proj_out.lora_A.weight"], out["transformer.proj_out.lora_B.weight"]
    torch.testing.assert_close(
        b @ a, 2.0 * peft["transformer.proj_out.lora_B.weight"] @ peft["transformer.proj_out.lora_A.weight"]
    )


@torch.no_grad()
def test_full_rank_resize_of_a_flux_lora_with_text_encoders_is_exact_through_our_loader():
    flux, clip, t5 = tiny_flux(), tiny_clip(), tiny_t5()
    inputs, ids = flux_inputs(), token_ids()
    network = lora_flux.create_network(1.0, 4, 2.0, None, [clip, t5], flux, train_t5xxl="True", split_qkv="True")
    randomize(network, std=0.03)
    network.apply_to([clip, t5], flux)
    expected, expected_t5 = flux(**inputs), t5(ids).last_hidden_state
    network.remove()
    saved = network.state_dict()
    resized, results = resize_state(saved, ResizeSettings(new_rank=16, new_conv_rank=16))
    assert {r.rank for r in results.values()} == {4, 12, 16}  # fused split parts have rank 12 and 16
    rebuilt, _ = lora_flux.create_network_from_weights(1.0, None, None, [clip, t5], flux, resized)
    rebuilt.load_weights(resized, strict=True)
    rebuilt.apply_to([clip, t5], flux)
    torch.testing.assert_close(flux(**inputs), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t5(ids).last_hidden_state, expected_t5, rtol=1e-4, atol=1e-5)
    rebuilt.remove()

    smaller, results = resize_state(saved, ResizeSettings(new_rank=2, new_conv_rank=2))
    assert {r.rank for r in results.values()} == {2} and smaller.keys() == saved.keys()


def test_metadata_says_what_was_done():
    down, up = factors([3.0, 2.0, 1.0])
    results = {"a": resize_module(down, up, 3.0, 2, ResizeSettings(2, 2)),
               "b": resize_module(down, up, 3.0, 2, ResizeSettings(2, 2))}  # fmt: skip
    meta = resized_metadata({"ss_training_comment": "mine", "sshs_model_hash": "x", "ss_network_dim": "3"},
                            ResizeSettings(2, 2), results)  # fmt: skip
    assert meta == {"ss_training_comment": "dimension is resized from 3 to 2; mine", "ss_network_dim": "2",
                    "ss_network_alpha": "2.0"}  # fmt: skip
    dynamic = ResizeSettings(8, 8, "sv_fro", 0.9)
    meta = resized_metadata({}, dynamic, {"a": resize_module(down, up, None, 8, dynamic)})
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_training_comment"] == "Dynamic resize with sv_fro: 0.9 from 3; "


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"new_rank": 0, "new_conv_rank": 0}, "ranks must be >= 1"),
        ({"new_rank": 4, "new_conv_rank": 4, "dynamic_param": 0.5}, "--dynamic_param needs --dynamic_method"),
        ({"new_rank": 4, "new_conv_rank": 4, "dynamic_method": "sv_fro"}, "needs --dynamic_param"),
        (
            {"new_rank": 4, "new_conv_rank": 4, "dynamic_method": "sv_fro", "dynamic_param": 2.0},
            r"fraction in \(0, 1\]",
        ),
        ({"new_rank": 4, "new_conv_rank": 4, "dynamic_method": "sv_ratio", "dynamic_param": 0.5}, "ratio >= 1"),
    ],
)
def test_bad_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        ResizeSettings(**kwargs)
