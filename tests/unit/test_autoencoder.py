"""The LDM autoencoder against diffusers' AutoencoderKL (loaded through diffusers' own converter), its latent
scaling, and loading every file users have, refusing the wrong ones in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.io.safetensors_file import SafetensorsHeader, TensorInfo
from library.models.autoencoder.loading import (
    detect_autoencoder_params,
    load_autoencoder,
    make_tiny_autoencoder_state_dict,
)
from library.models.autoencoder.model import (
    SD3_SCALE_FACTOR,
    SD3_SHIFT_FACTOR,
    AutoEncoder,
    AutoEncoderParams,
    flux1_autoencoder_params,
)

TINY = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=16)
SCALE, SHIFT = 0.3611, 0.1159


def _save(state: dict, path: Path, dtype: torch.dtype | None = None) -> Path:
    save_file({k: v.to(dtype) if dtype else v for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return make_tiny_autoencoder_state_dict(**TINY, seed=1)


@pytest.fixture(scope="module")
def tiny_file(tiny_state, tmp_path_factory) -> Path:
    return _save(tiny_state, tmp_path_factory.mktemp("ae") / "ae.safetensors")


def _diffusers_vae(state: dict, params: AutoEncoderParams):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    levels = len(params.ch_mult)
    config = dict(
        in_channels=params.in_channels, out_channels=params.out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=params.channels, layers_per_block=params.num_res_blocks,
        latent_channels=params.z_channels, norm_num_groups=32, sample_size=32,
        scaling_factor=params.scale_factor, shift_factor=params.shift_factor,
        use_quant_conv=params.use_quant_conv, use_post_quant_conv=params.use_quant_conv,
    )  # fmt: skip
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(state), config), strict=True)
    return vae.eval()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Tight tolerance relative to the output's scale: fp32 round-off passes, a wrong operation does not."""
    assert actual.shape == expected.shape, what
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * scale, msg=what)


@pytest.mark.parametrize(
    "variant, z_channels, scale, shift, quant",
    [("flux1", 16, SCALE, SHIFT, False), ("sd3", 16, SD3_SCALE_FACTOR, SD3_SHIFT_FACTOR, False), ("sdxl", 4, 0.13025, 0.0, True)],
)  # fmt: skip
@torch.no_grad()
def test_matches_diffusers_autoencoderkl(tmp_path, variant, z_channels, scale, shift, quant):
    state = make_tiny_autoencoder_state_dict(**{**TINY, "z_channels": z_channels}, seed=2, use_quant_conv=quant)
    ours = load_autoencoder(_save(state, tmp_path / f"{variant}.safetensors"), scale_factor=scale, shift_factor=shift)
    assert ours.params.use_quant_conv is quant
    reference = _diffusers_vae(state, ours.params)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 24, generator=generator) * 2 - 1
    # low-contrast images keep GroupNorm variances small, so a wrong eps shows
    images[1] = 0.02 * images[1] + 0.3

    posterior = reference.encode(images).latent_dist
    mean, logvar = ours.encode_moments(images)
    _assert_close(mean, posterior.mean, "posterior mean")
    _assert_close(logvar, posterior.logvar, "posterior log-variance")
    latents = ours.encode(images)
    _assert_close(latents, (posterior.mean - shift) * scale, "scaled latents (pipeline convention)")

    latents = torch.randn(2, z_channels, 4, 3, generator=generator)
    decoded = ours.decode(latents)
    assert decoded.shape == (2, 3, 16, 12)
    _assert_close(decoded, reference.decode(latents / scale + shift).sample, "decoded images")
    _assert_close(ours(images), reference.decode(posterior.mean).sample, "encode-decode round trip")


@torch.no_grad()
def test_sampled_latents_follow_the_posterior(tiny_file):
    ae = load_autoencoder(tiny_file)
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first = ae.encode(images, sample=True, generator=torch.Generator().manual_seed(7))
    again = ae.encode(images, sample=True, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    mean, logvar = ae.encode_moments(images)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, SCALE * (mean + torch.exp(0.5 * logvar) * noise - SHIFT))
    assert not torch.allclose(first, ae.encode(images))


def _header_of(model: AutoEncoder, prefix: str = "") -> SafetensorsHeader:
    tensors = {prefix + k: TensorInfo("BF16", tuple(v.shape)) for k, v in model.state_dict().items()}
    return SafetensorsHeader(path=Path("ae.safetensors"), tensors=tensors)


def test_real_flux_and_sdxl_configs_are_detected():
    flux = flux1_autoencoder_params()
    with torch.device("meta"):
        model = AutoEncoder(flux)
    assert len(model.state_dict()) == 244
    assert (model.latent_channels, model.downscale_factor) == (16, 8)
    assert detect_autoencoder_params(_header_of(model), SCALE, SHIFT) == flux

    sdxl = AutoEncoderParams(256, 3, 128, 3, (1, 2, 4, 4), 2, 4, 0.13025, 0.0, use_quant_conv=True)
    with torch.device("meta"):
        header = _header_of(AutoEncoder(sdxl), "first_stage_model.")
    assert detect_autoencoder_params(header, 0.13025, 0.0, prefix="first_stage_model.") == sdxl


@pytest.mark.parametrize(
    "file_dtype, dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float8_e4m3fn, torch.float32), (torch.float8_e4m3fn, torch.bfloat16),
     (torch.float32, torch.float16)],
)  # fmt: skip
def test_loads_any_file_dtype_into_the_requested_one(tiny_state, tmp_path, file_dtype, dtype):
    ae = load_autoencoder(_save(tiny_state, tmp_path / "ae.safetensors", file_dtype), dtype=dtype)
    loaded = ae.state_dict()
    assert {t.dtype for t in loaded.values()} == {dtype}
    for key, value in tiny_state.items():
        torch.testing.assert_close(loaded[key], value.to(file_dtype).to(dtype), rtol=0, atol=0, msg=key)
    assert not any(p.requires_grad for p in ae.parameters())


def test_fp8_compute_dtype_is_refused(tiny_file):
    with pytest.raises(UserError, match="--ae.*fp32, bf16 or fp16"):
        load_autoencoder(tiny_file, dtype=torch.float8_e4m3fn)


def test_full_checkpoint_prefix_and_linear_attention_weights(tiny_state, tmp_path):
    state = {f"first_stage_model.{k}": v for k, v in tiny_state.items()}
    state["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"] = torch.zeros(3, 2)
    q = "first_stage_model.decoder.mid.attn_1.q.weight"
    state[q] = state[q][:, :, 0, 0].clone()  # some converters store the 1x1 convs as Linear weights
    ae = load_autoencoder(_save(state, tmp_path / "sd3.safetensors"), scale_factor=SD3_SCALE_FACTOR)
    for key, value in tiny_state.items():
        torch.testing.assert_close(ae.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert ae.params.scale_factor == SD3_SCALE_FACTOR


def test_missing_unexpected_and_misshaped_keys_are_named(tiny_state, tmp_path):
    state = dict(tiny_state)
    del state["decoder.up.1.block.2.norm2.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    state["encoder.mid.attn_1.proj_out.bias"] = torch.zeros(3)
    path = _save(state, tmp_path / "broken.safetensors")
    with pytest.raises(UserError) as info:
        load_autoencoder(path)
    message = str(info.value)
    assert message.startswith(f"--ae {path}:") and "\n" not in message
    assert "missing 1 keys: decoder.up.1.block.2.norm2.bias" in message
    assert "unexpected 1 keys: decoder.extra.weight" in message
    assert "encoder.mid.attn_1.proj_out.bias [3] (expected [64])" in message


def test_a_missing_level_tensor_is_a_user_error(tiny_state, tmp_path):
    state = {k: v for k, v in tiny_state.items() if k != "encoder.down.1.block.0.conv2.weight"}
    with pytest.raises(UserError, match=r"--vae .*missing encoder\.down\.1\.block\.0\.conv2\.weight"):
        load_autoencoder(_save(state, tmp_path / "ae.safetensors"), option="--vae")


@pytest.mark.parametrize(
    "tensors, looks_like",
    [
        ({"double_blocks.0.img_attn.qkv.weight": (3, 1), "guidance_in.in_layer.weight": (1, 1)}, "FLUX.1 dev"),
        ({"text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 1),
          "text_model.embeddings.token_embedding.weight": (1, 1)}, "CLIP-L"),
        ({"encoder.block.0.layer.0.SelfAttention.q.weight": (1, 1), "shared.weight": (1, 1)}, "T5"),
        ({"joint_blocks.0.x_block.attn.qkv.weight": (3, 1)}, "SD3"),
    ],
)  # fmt: skip
def test_wrong_files_are_named(tmp_path, tensors, looks_like):
    path = _save({k: torch.zeros(s) for k, s in tensors.items()}, tmp_path / "wrong.safetensors")
    with pytest.raises(UserError) as info:
        load_autoencoder(path)
    message = str(info.value)
    assert message.startswith(f"--ae {path}: expected an autoencoder") and looks_like in message


def test_diffusers_layout_is_refused_with_a_hint(tmp_path):
    keys = ("encoder.conv_in.weight", "decoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight")
    path = _save({k: torch.zeros(1) for k in keys}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match="--ae .*diffusers layout"):
        load_autoencoder(path)
