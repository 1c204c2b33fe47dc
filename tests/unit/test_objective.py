"""The flow-matching objective against its formulas: sampling, noise, inputs, targets, weights and losses."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from library.errors import UserError
from library.training.objective import (
    ObjectiveConfig,
    apply_model_prediction_type,
    conditional_loss,
    discrete_sigmas,
    huber_c_for,
    loss_weighting,
    make_noise,
    masked_mean_loss,
    noisy_model_input,
    per_sample_loss,
    sample_timesteps,
    shift_timesteps,
    training_target,
    velocity_target,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sample(n: int = 4096, seed: int = 0, image_seq_len: int | None = None, **options) -> torch.Tensor:
    return sample_timesteps(ObjectiveConfig(**options), n, image_seq_len=image_seq_len, generator=_gen(seed))


# --- options ---------------------------------------------------------------------------------------------------


def test_defaults_are_upstreams():
    cfg = ObjectiveConfig()
    assert (cfg.timestep_sampling, cfg.sigmoid_scale, cfg.discrete_flow_shift) == ("sigma", 1.0, 3.0)
    assert (cfg.model_prediction_type, cfg.weighting_scheme) == ("sigma_scaled", "uniform")
    assert (cfg.logit_mean, cfg.logit_std, cfg.mode_scale) == (0.0, 1.0, 1.29)
    assert (cfg.loss_type, cfg.huber_schedule, cfg.huber_c, cfg.huber_scale) == ("l2", "snr", 0.1, 1.0)
    assert cfg.ip_noise_gamma is None and cfg.noise_offset is None
    assert cfg.min_timestep is None and cfg.max_timestep is None and cfg.timestep_range == (0.0, 1.0)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"timestep_sampling": "logit"}, "--timestep_sampling"),
        ({"model_prediction_type": "eps"}, "--model_prediction_type"),
        ({"weighting_scheme": "snr"}, "--weighting_scheme"),
        ({"loss_type": "l3"}, "--loss_type"),
        ({"huber_schedule": "linear"}, "--huber_schedule"),
        ({"sigmoid_scale": 0.0}, "--sigmoid_scale"),
        ({"discrete_flow_shift": -1.0}, "--discrete_flow_shift"),
        ({"logit_std": 0.0}, "--logit_std"),
        ({"weighting_scheme": "mode", "mode_scale": 2.0}, "--mode_scale"),
        ({"loss_type": "huber", "huber_c": 0.0}, "--huber_c"),
        ({"loss_type": "smooth_l1", "huber_scale": -1.0}, "--huber_scale"),
        ({"noise_offset": -0.1}, "--noise_offset"),
        ({"ip_noise_gamma": -0.1}, "--ip_noise_gamma"),
        ({"min_timestep": 1000}, "--min_timestep"),
        ({"max_timestep": 0}, "--max_timestep"),
        ({"min_timestep": 600, "max_timestep": 500}, "--min_timestep"),
    ],
)
def test_bad_options_name_the_option(options, option):
    with pytest.raises(UserError, match=option):
        ObjectiveConfig(**options)


def test_huber_options_only_checked_for_huber_losses():
    ObjectiveConfig(loss_type="l2", huber_c=0.0)
    ObjectiveConfig(weighting_scheme="uniform", mode_scale=5.0)


def test_ignored_weighting_is_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="library.training.objective"):
        ObjectiveConfig(model_prediction_type="raw", weighting_scheme="sigma_sqrt")
        ObjectiveConfig(timestep_sampling="shift", weighting_scheme="logit_normal")
    assert "sigma_scaled" in caplog.text and "--timestep_sampling sigma" in caplog.text


# --- timestep sampling -----------------------------------------------------------------------------------------


def test_shift_formula():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_timesteps(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(shift_timesteps(t, 1.0), t)


def test_uniform_is_torch_rand_of_the_generator():
    t = _sample(5, timestep_sampling="uniform")
    assert torch.equal(t, torch.rand(5, generator=_gen()))
    assert torch.allclose(t[:2], torch.tensor([0.4963, 0.7682]), atol=1e-4)


def test_sigmoid_is_sigmoid_of_scaled_normal():
    t = _sample(5, timestep_sampling="sigmoid", sigmoid_scale=2.0)
    assert torch.allclose(t, torch.sigmoid(2.0 * torch.randn(5, generator=_gen())))
    narrow, wide = _sample(timestep_sampling="sigmoid"), _sample(timestep_sampling="sigmoid", sigmoid_scale=3.0)
    assert 0 < narrow.min() and wide.max() < 1 and wide.std() > narrow.std()
    assert abs(narrow.mean().item() - 0.5) < 0.02


def test_shift_sampling_applies_the_shift_to_the_sigmoid():
    t = _sample(5, timestep_sampling="shift", discrete_flow_shift=3.1582)
    s = torch.sigmoid(torch.randn(5, generator=_gen()))
    assert torch.allclose(t, 3.1582 * s / (1 + 2.1582 * s))
    assert (
        _sample(timestep_sampling="shift").mean()
        > 0.6
        > 0.5
        > _sample(timestep_sampling="shift", discrete_flow_shift=0.5).mean()
    )


def test_flux_shift_uses_the_resolution_mu():
    s = torch.sigmoid(torch.randn(5, generator=_gen()))
    t256 = _sample(5, timestep_sampling="flux_shift", image_seq_len=256)
    assert torch.allclose(t256, math.exp(0.5) / (math.exp(0.5) + (1 / s - 1)))
    t4096 = _sample(5, timestep_sampling="flux_shift", image_seq_len=4096)
    assert torch.allclose(t4096, math.exp(1.15) / (math.exp(1.15) + (1 / s - 1)))
    assert (t4096 > t256).all()
    with pytest.raises(ValueError, match="image_seq_len"):
        _sample(5, timestep_sampling="flux_shift")


def test_discrete_sigmas_match_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert torch.allclose(discrete_sigmas(3.0), scheduler.sigmas[:1000].float(), atol=1e-6)


def test_sigma_sampling_picks_scheduler_sigmas_by_density_index():
    t = _sample(6, weighting_scheme="logit_normal", logit_mean=0.3, logit_std=0.7)
    u = torch.sigmoid(0.3 + 0.7 * torch.randn(6, generator=_gen()))
    assert torch.equal(t, discrete_sigmas(3.0)[(u * 1000).long()])
    uniform = _sample(5)
    index = (torch.rand(5, generator=_gen()) * 1000).long()
    assert torch.allclose(uniform, 3 * (1 - index / 1000) / (1 + 2 * (1 - index / 1000)), atol=1e-6)
    many = _sample(discrete_flow_shift=1.0)
    assert many.min() >= 0.001 and many.max() <= 1.0
    assert torch.allclose(many * 1000, (many * 1000).round(), atol=1e-3)


def test_sigma_sampling_mode_density():
    t = _sample(5, discrete_flow_shift=1.0, weighting_scheme="mode", mode_scale=1.29)
    u = torch.rand(5, generator=_gen())
    u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    assert torch.equal(t, discrete_sigmas(1.0)[(u * 1000).long().clamp(max=999)])
    # mode_scale > 0 puts more mass in the middle than the uniform density does
    middle = _sample(discrete_flow_shift=1.0, weighting_scheme="mode")
    assert ((middle - 0.5).abs() < 0.25).float().mean() > 0.6


@pytest.mark.parametrize("mode", ["sigma", "uniform", "sigmoid", "shift", "flux_shift"])
def test_min_max_timestep_restrict_every_mode(mode):
    t = _sample(timestep_sampling=mode, image_seq_len=1024, min_timestep=200, max_timestep=400)
    full = _sample(timestep_sampling=mode, image_seq_len=1024)
    assert t.min() >= 0.2 and t.max() <= 0.4
    assert torch.allclose(t, 0.2 + 0.2 * full)


def test_equal_min_max_timestep_gives_one_timestep():
    t = _sample(8, timestep_sampling="uniform", min_timestep=250, max_timestep=250)
    assert torch.equal(t, torch.full((8,), 0.25))


# --- noise and inputs ------------------------------------------------------------------------------------------


def test_noise_without_offset_is_plain_gaussian():
    latents = torch.zeros(2, 3, 4, 4)
    assert torch.equal(make_noise(latents, ObjectiveConfig(), _gen(1)), torch.randn(2, 3, 4, 4, generator=_gen(1)))


def test_noise_offset_adds_a_constant_per_channel():
    latents = torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16)
    noise = make_noise(latents.float(), ObjectiveConfig(noise_offset=0.1), _gen(1))
    gen = _gen(1)
    base = torch.randn(2, 3, 4, 4, generator=gen)
    offset = 0.1 * torch.randn(2, 3, 1, 1, generator=gen)
    assert torch.allclose(noise, base + offset)
    assert make_noise(latents, ObjectiveConfig(noise_offset=0.1), _gen(1)).dtype == torch.bfloat16


def test_noise_offset_random_strength_scales_by_a_uniform_draw():
    latents = torch.zeros(1, 2, 2, 2)
    noise = make_noise(latents, ObjectiveConfig(noise_offset=0.5, noise_offset_random_strength=True), _gen(2))
    gen = _gen(2)
    base = torch.randn(1, 2, 2, 2, generator=gen)
    strength = 0.5 * torch.rand(1, generator=gen).item()
    assert torch.allclose(noise, base + strength * torch.randn(1, 2, 1, 1, generator=gen))


def test_noisy_input_interpolates_data_and_noise():
    x0, noise = torch.randn(3, 2, 4, 4, generator=_gen(1)), torch.randn(3, 2, 4, 4, generator=_gen(2))
    t = torch.tensor([0.0, 0.25, 1.0])
    noisy = noisy_model_input(x0, noise, t)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[2], noise[2])
    assert torch.allclose(noisy[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.allclose(noise - x0, velocity_target(x0, noise))


def test_ip_noise_gamma_perturbs_only_the_input():
    x0, noise = torch.randn(2, 2, 4, 4, generator=_gen(1)), torch.randn(2, 2, 4, 4, generator=_gen(2))
    t = torch.tensor([0.5, 0.8])
    noisy = noisy_model_input(x0, noise, t, ip_noise_gamma=0.1, generator=_gen(3))
    xi = torch.randn(2, 2, 4, 4, generator=_gen(3))
    assert torch.allclose(noisy, noisy_model_input(x0, noise, t) + t.view(-1, 1, 1, 1) * 0.1 * xi, atol=1e-6)
    random = noisy_model_input(x0, noise, t, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, generator=_gen(3))
    gen = _gen(3)
    gamma = 0.1 * torch.rand(1, generator=gen).item()
    expected = noisy_model_input(x0, noise, t) + t.view(-1, 1, 1, 1) * gamma * torch.randn(2, 2, 4, 4, generator=gen)
    assert torch.allclose(random, expected, atol=1e-6)


# --- prediction types and targets ------------------------------------------------------------------------------


def _batch():
    x0, noise = torch.randn(2, 4, 6, 6, generator=_gen(1)), torch.randn(2, 4, 6, 6, generator=_gen(2))
    t = torch.tensor([0.3, 0.9])
    return x0, noise, t, noisy_model_input(x0, noise, t)


@pytest.mark.parametrize("prediction", ["raw", "additive", "sigma_scaled"])
def test_the_exact_velocity_has_zero_loss_for_raw_and_sigma_scaled(prediction):
    x0, noise, t, noisy = _batch()
    cfg = ObjectiveConfig(model_prediction_type=prediction)
    velocity = noise - x0
    perfect = velocity - noisy if prediction == "additive" else velocity
    assert torch.allclose(per_sample_loss(perfect, noisy, x0, noise, t, cfg), torch.zeros(2), atol=1e-10)


def test_prediction_types():
    x0, noise, t, noisy = _batch()
    pred = torch.randn(x0.shape, generator=_gen(5))
    raw, w = apply_model_prediction_type(pred, noisy, t, ObjectiveConfig(model_prediction_type="raw"))
    assert raw is pred and w is None
    additive, w = apply_model_prediction_type(pred, noisy, t, ObjectiveConfig(model_prediction_type="additive"))
    assert torch.equal(additive, pred + noisy) and w is None
    x0_hat, w = apply_model_prediction_type(pred, noisy, t, ObjectiveConfig())
    assert torch.allclose(x0_hat, noisy - t.view(-1, 1, 1, 1) * pred)
    assert w.shape == (2, 1, 1, 1) and torch.equal(w, torch.ones(2, 1, 1, 1))
    assert torch.equal(training_target(x0, noise, ObjectiveConfig()), x0)
    assert torch.equal(training_target(x0, noise, ObjectiveConfig(model_prediction_type="raw")), noise - x0)


def test_sigma_scaled_l2_is_t_squared_times_velocity_l2():
    x0, noise, t, noisy = _batch()
    pred = torch.randn(x0.shape, generator=_gen(5))
    raw = per_sample_loss(pred, noisy, x0, noise, t, ObjectiveConfig(model_prediction_type="raw"))
    scaled = per_sample_loss(pred, noisy, x0, noise, t, ObjectiveConfig())
    assert torch.allclose(scaled, t**2 * raw, rtol=1e-5)
    # with sigma_sqrt weighting (t^-2) the x0-space loss is exactly the velocity loss again
    undone = per_sample_loss(pred, noisy, x0, noise, t, ObjectiveConfig(weighting_scheme="sigma_sqrt"))
    assert torch.allclose(undone, raw, rtol=1e-5)


def test_loss_weighting_formulas():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(
        loss_weighting(ObjectiveConfig(weighting_scheme="sigma_sqrt"), t), torch.tensor([1e6, 16, 4, 1])
    )
    cosmap = loss_weighting(ObjectiveConfig(weighting_scheme="cosmap"), t)
    assert torch.allclose(cosmap, 2 / (math.pi * (1 - 2 * t + 2 * t**2)))
    assert math.isclose(cosmap[2].item(), 4 / math.pi, rel_tol=1e-6)
    for scheme in ("uniform", "none", "logit_normal", "mode"):
        assert torch.equal(loss_weighting(ObjectiveConfig(weighting_scheme=scheme), t), torch.ones(4))


# --- Huber thresholds and losses -------------------------------------------------------------------------------


def test_huber_c_is_none_for_l1_l2():
    assert huber_c_for(ObjectiveConfig(loss_type="l2"), torch.rand(3)) is None
    assert huber_c_for(ObjectiveConfig(loss_type="l1"), torch.rand(3)) is None


def test_huber_constant_and_exponential_schedules():
    t = torch.tensor([0.0, 0.5, 1.0])
    constant = huber_c_for(
        ObjectiveConfig(loss_type="huber", huber_schedule="constant", huber_c=0.2, huber_scale=2.0), t
    )
    assert torch.allclose(constant, torch.full((3,), 0.4))
    cfg = ObjectiveConfig(loss_type="huber", huber_schedule="exponential", huber_c=0.1, huber_scale=2.0)
    alpha = -math.log(0.1) / 1000  # upstream: exp(-alpha * timestep) * scale, timestep = 1000 t
    assert torch.allclose(huber_c_for(cfg, t), torch.exp(-alpha * 1000 * t) * 2.0)
    assert torch.allclose(huber_c_for(cfg, t)[[0, 2]], torch.tensor([2.0, 0.2]))


def test_huber_snr_schedule_for_flow_matching():
    cfg = ObjectiveConfig(loss_type="smooth_l1", huber_c=0.1)
    t = torch.tensor([0.0, 1e-6, 0.2, 0.5, 1 - 1e-6, 1.0])
    c = huber_c_for(cfg, t)
    assert torch.isfinite(c).all() and (c >= 0.1).all() and (c <= 1.0).all()
    assert torch.allclose(c[[0, 5]], torch.tensor([1.0, 0.1]))
    inner = t[2:4]
    noise_to_signal = inner / (1 - inner)  # = snr^-1/2 with snr = ((1 - t) / t)^2
    assert torch.allclose(c[2:4], (1 - 0.1) / (1 + noise_to_signal) ** 2 + 0.1)
    assert torch.allclose(c[3], torch.tensor(0.1 + 0.9 * 0.25))


def test_l1_l2_losses():
    a, b = torch.randn(2, 3, 4, 4, generator=_gen(1)), torch.randn(2, 3, 4, 4, generator=_gen(2))
    assert torch.equal(conditional_loss(a, b, "l2"), (a - b) ** 2)
    assert torch.equal(conditional_loss(a, b, "l1"), (a - b).abs())
    assert torch.allclose(conditional_loss(a, b, "l2", reduction="mean"), F.mse_loss(a, b))
    assert torch.allclose(conditional_loss(a, b, "l1", reduction="sum"), F.l1_loss(a, b, reduction="sum"))


def test_pseudo_huber_losses():
    a = torch.tensor([[0.0, 0.01, 10.0], [0.0, 0.01, 10.0]]).view(2, 3, 1, 1)
    b = torch.zeros_like(a)
    c = torch.tensor([0.1, 1.0])
    huber = conditional_loss(a, b, "huber", c)
    smooth = conditional_loss(a, b, "smooth_l1", c)
    expected_smooth = 2 * (torch.sqrt(a**2 + c.view(-1, 1, 1, 1) ** 2) - c.view(-1, 1, 1, 1))
    assert torch.allclose(smooth, expected_smooth)
    assert torch.allclose(huber, c.view(-1, 1, 1, 1) * expected_smooth)
    assert huber[:, 0].abs().max() == 0
    assert math.isclose(huber[0, 1].item(), 0.01**2, rel_tol=0.01)  # quadratic below c: ~ r^2
    assert math.isclose(huber[0, 2].item(), 2 * 0.1 * 10 - 2 * 0.1**2, rel_tol=1e-3)  # linear above c: ~ 2 c |r|
    assert torch.allclose(conditional_loss(a, b, "huber", 0.5), conditional_loss(a, b, "huber", torch.full((2,), 0.5)))
    with pytest.raises(ValueError, match="huber_c"):
        conditional_loss(a, b, "huber")


# --- masks and the composed loss -------------------------------------------------------------------------------


def test_masked_mean_loss():
    loss = torch.ones(2, 4, 4, 4)
    assert torch.equal(masked_mean_loss(loss), torch.ones(2))
    mask = torch.zeros(2, 32, 32)  # image resolution, 8x the latent
    mask[0, :, :16] = 1
    mask[1, :4, :4] = 1
    assert torch.allclose(masked_mean_loss(loss, mask), torch.tensor([0.5, 1 / 64]))
    assert torch.allclose(masked_mean_loss(loss, mask.unsqueeze(1)), torch.tensor([0.5, 1 / 64]))
    weighting = torch.tensor([2.0, 3.0]).view(2, 1, 1, 1)
    assert torch.allclose(masked_mean_loss(loss, mask, weighting), torch.tensor([1.0, 3 / 64]))


def test_per_sample_loss_pins_seeded_value_and_backpropagates():
    x0, noise, t, noisy = _batch()
    pred = torch.randn(x0.shape, generator=_gen(5), requires_grad=True)
    cfg = ObjectiveConfig(model_prediction_type="raw", loss_type="huber")
    loss = per_sample_loss(pred, noisy, x0, noise, t, cfg)
    c = (0.1 + 0.9 * (1 - t) ** 2).view(-1, 1, 1, 1)
    expected = (2 * c * (torch.sqrt((pred - (noise - x0)) ** 2 + c**2) - c)).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, expected)
    loss.sum().backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_config_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ObjectiveConfig().loss_type = "l1"


def test_density_shift_is_the_sd3_scripts_sampling():
    """u from the weighting-scheme density, then t = s u / (1 + (s - 1) u), continuous, in --min/--max_timestep."""
    cfg = ObjectiveConfig(timestep_sampling="density_shift", discrete_flow_shift=3.0, weighting_scheme="logit_normal",
                          logit_mean=0.5, logit_std=0.8)  # fmt: skip
    u = torch.sigmoid(0.5 + 0.8 * torch.randn(4096, generator=_gen(5)))
    expected = 3.0 * u / (1 + 2.0 * u)
    torch.testing.assert_close(sample_timesteps(cfg, 4096, generator=_gen(5)), expected)
    bounded = ObjectiveConfig(timestep_sampling="density_shift", discrete_flow_shift=3.0, min_timestep=100,
                              max_timestep=500)  # fmt: skip
    t = sample_timesteps(bounded, 4096, generator=_gen(6))
    assert 0.1 <= float(t.min()) and float(t.max()) <= 0.5 and len(set(t.tolist())) > 4000  # continuous
