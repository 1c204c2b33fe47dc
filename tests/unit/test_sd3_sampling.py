"""The SD3 Euler sampler (fixed shift 3) against its formulas and a hand-run Euler loop on a linear stand-in model,
the seed contract, and decoding with the SD3 VAE scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from library.errors import UserError
from library.inference.sd3_generate import (
    SD3SampleSettings,
    decode_sd3_images,
    generate_sd3_image,
    get_sd3_sigmas,
    initial_sd3_noise,
    sample_sd3_latents,
    sd3_image_size,
)
from library.models.autoencoder.loading import load_autoencoder, make_tiny_autoencoder_state_dict
from library.models.autoencoder.model import SD3_SCALE_FACTOR, SD3_SHIFT_FACTOR


class LinearVelocity(nn.Module):
    """v = a*x + c(y, context): a per-sample constant from the conditioning; records what it was called with."""

    def __init__(self, a: float = -0.7):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a), requires_grad=False)
        self.calls: list[tuple[Tensor, Tensor]] = []

    @staticmethod
    def offset(y: Tensor, context: Tensor) -> Tensor:
        return (y.float().mean(dim=1) + context.float().mean(dim=(1, 2)))[:, None, None, None]

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor, context: Tensor) -> Tensor:
        self.calls.append((x.clone(), timesteps.clone()))
        return self.a * x + self.offset(y, context)


def _cond(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 5, 8, generator=g), torch.randn(1, 6, generator=g)


def _hand_euler(noise: np.ndarray, sigmas: list[float], a: float, c_pos: float, c_neg: float | None, scale: float):
    """Upstream's loop written out in float64: denoised = x - v*sigma, CFG on denoised, x += d * dsigma."""
    x = sigmas[0] * noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        pos = x - (a * x + c_pos) * sigma
        denoised = (
            pos if c_neg is None else (x - (a * x + c_neg) * sigma) + scale * (pos - (x - (a * x + c_neg) * sigma))
        )
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return x


def test_sigma_schedule_matches_the_formula():
    for steps in (1, 4, 28, 50):
        sigmas = get_sd3_sigmas(steps)
        s = 3.0
        sigma_min = s * 1e-3 / (1 + (s - 1) * 1e-3)  # sigma of the smallest training timestep, 1
        tau = np.linspace(1000.0, 1000.0 * sigma_min, steps) / 1000.0
        expected = np.append(s * tau / (1 + (s - 1) * tau), 0.0)
        assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
        np.testing.assert_allclose(sigmas.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert get_sd3_sigmas(1).tolist() == [1.0, 0.0]
    assert torch.all(get_sd3_sigmas(50).diff() < 0)
    np.testing.assert_allclose(get_sd3_sigmas(2, shift=1.0).numpy(), [1.0, 0.001, 0.0], rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 4.5])
def test_euler_with_cfg_matches_hand_computation(scale):
    model = LinearVelocity()
    settings = SD3SampleSettings(width=32, height=48, steps=6, cfg_scale=scale, seed=5)
    cond, negative = _cond(1), _cond(2)
    out = sample_sd3_latents(model, cond, negative, settings, torch.float32, show_progress=False)
    noise = initial_sd3_noise(5, (1, 16, 6, 4)).double().numpy()
    c_pos = LinearVelocity.offset(cond[1], cond[0]).item()
    c_neg = LinearVelocity.offset(negative[1], negative[0]).item()
    sigmas = get_sd3_sigmas(6).double().tolist()
    expected = _hand_euler(noise, sigmas, -0.7, c_pos, None if scale == 1.0 else c_neg, scale)
    assert out.shape == (1, 16, 6, 4) and out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    timesteps = [t for _, t in model.calls]
    assert len(timesteps) == 6
    for t, sigma in zip(timesteps, sigmas):
        assert t.dtype == torch.float32 and t.shape == ((2,) if scale != 1.0 else (1,))
        torch.testing.assert_close(t, torch.full_like(t, sigma * 1000))


def test_cfg_scale_one_equals_no_negative():
    settings = SD3SampleSettings(width=32, height=32, steps=4, cfg_scale=1.0, seed=3)
    with_negative = sample_sd3_latents(LinearVelocity(), _cond(1), _cond(2), settings, torch.float32, False)
    without = sample_sd3_latents(LinearVelocity(), _cond(1), None, settings, torch.float32, False)
    assert torch.equal(with_negative, without)
    guided = SD3SampleSettings(width=32, height=32, steps=4, cfg_scale=3.0, seed=3)
    assert not torch.allclose(sample_sd3_latents(LinearVelocity(), _cond(1), _cond(2), guided, torch.float32, False),
                              without)  # fmt: skip


def test_seed_gives_the_cpu_generator_noise_in_every_dtype():
    """With v = 0 nothing moves: the result is sigma_0 (= 1) times the noise, which must be the fp32 draw of a CPU
    generator seeded with the seed, whatever the model dtype."""

    def zero(x, t, y, context):
        return torch.zeros_like(x)

    settings = SD3SampleSettings(width=64, height=32, steps=3, seed=1234)
    expected = torch.randn(1, 16, 4, 8, generator=torch.Generator("cpu").manual_seed(1234))
    for dtype in (torch.float32, torch.bfloat16):
        out = sample_sd3_latents(zero, _cond(0), None, settings, dtype, show_progress=False)
        assert torch.equal(out, expected)
    a = sample_sd3_latents(LinearVelocity(), _cond(0), _cond(1), settings, torch.float32, False)
    b = sample_sd3_latents(LinearVelocity(), _cond(0), _cond(1), settings, torch.float32, False)
    other = SD3SampleSettings(width=64, height=32, steps=3, seed=1235)
    c = sample_sd3_latents(LinearVelocity(), _cond(0), _cond(1), other, torch.float32, False)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_model_inputs_dtype_and_progress_callback():
    model = LinearVelocity()
    steps_seen = []
    settings = SD3SampleSettings(width=32, height=32, steps=5, cfg_scale=2.0)
    seen = {}

    def wrapped(x, t, y, context):
        seen.update(x=x.dtype, y=y.dtype, context=context.dtype, batch=x.shape[0])
        return model(x.float(), t, y.float(), context.float()).to(x.dtype)

    sample_sd3_latents(wrapped, _cond(0), _cond(1), settings, torch.bfloat16, False, on_step=steps_seen.append)
    assert steps_seen == [0, 1, 2, 3, 4]
    assert seen == {"x": torch.bfloat16, "y": torch.bfloat16, "context": torch.bfloat16, "batch": 2}


def test_sizes_round_down_to_16_pixels():
    assert sd3_image_size(1000, 520) == (992, 512) and sd3_image_size(8, 1024) == (16, 1024)
    out = sample_sd3_latents(LinearVelocity(), _cond(0), None, SD3SampleSettings(width=70, height=40, steps=1),
                             torch.float32, False)  # fmt: skip
    assert out.shape == (1, 16, 4, 8)
    with pytest.raises(UserError, match="steps must be at least 1"):
        SD3SampleSettings(steps=0)


def test_decode_uses_the_sd3_latent_scaling(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(make_tiny_autoencoder_state_dict(seed=4), str(path))
    vae = load_autoencoder(path, option="--vae", scale_factor=SD3_SCALE_FACTOR, shift_factor=SD3_SHIFT_FACTOR)
    latents = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    image = decode_sd3_images(vae, latents)[0]
    assert image.size == (48, 32)
    with torch.no_grad():
        pixels = vae.decoder(latents / 1.5305 + 0.0609).clamp(-1, 1)
    expected = ((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.abs(np.asarray(image).astype(int) - expected.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="SD3 needs 1.5305 and 0.0609"):
        decode_sd3_images(load_autoencoder(path), latents)  # FLUX.1 scaling


def test_generate_image_end_to_end_with_tiny_models(tmp_path):
    from library.models.sd3.text_conditioning import SD3TextEncoder, load_sd3_tokenizers
    from library.models.text_encoders.clip import load_clip_text_model, make_tiny_clip_state_dict
    from library.models.text_encoders.t5 import load_t5_encoder, make_tiny_t5_state_dict

    files = {"l": make_tiny_clip_state_dict(hidden=128, layers=1),
             "g": make_tiny_clip_state_dict(hidden=192, layers=1, with_projection=True),
             "t5": make_tiny_t5_state_dict(d_model=384, num_heads=6, layers=1),
             "vae": make_tiny_autoencoder_state_dict()}  # fmt: skip
    for name, state in files.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    text = SD3TextEncoder(
        load_clip_text_model(tmp_path / "l.safetensors", with_projection=True),
        load_clip_text_model(tmp_path / "g.safetensors", option="--clip_g", expect_width=1280),
        load_t5_encoder(tmp_path / "t5.safetensors"), *load_sd3_tokenizers(), t5_max_length=16,
    )  # fmt: skip
    vae = load_autoencoder(tmp_path / "vae.safetensors", scale_factor=SD3_SCALE_FACTOR, shift_factor=SD3_SHIFT_FACTOR)
    for scale, batch in ((5.0, 2), (1.0, 1)):
        model = LinearVelocity(a=-0.2)
        settings = SD3SampleSettings(width=48, height=32, steps=2, cfg_scale=scale, seed=7)
        image = generate_sd3_image(model, vae, text, "a cat", None, settings, torch.float32, "cpu", False)
        assert image.size == (48, 32) and image.mode == "RGB"
        assert [x.shape[0] for x, _ in model.calls] == [batch, batch]
