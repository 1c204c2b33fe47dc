"""Loading SD3/SD3.5 files: detection of variant and packaging from the tensors, dtypes and fp8 storage, the
VAE against diffusers' AutoencoderKL with SD3's latent scaling, and one-line errors for wrong files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.io.safetensors_file import read_header
from library.memory.fp8 import enable_fp8_linear
from library.models.autoencoder.model import SD3_SCALE_FACTOR, SD3_SHIFT_FACTOR
from library.models.checkpoint_kind import describe_checkpoint
from library.models.sd3.loading import (
    block_linear_weight_keys,
    has_vae,
    load_sd3_mmdit,
    load_sd3_vae,
    open_sd3_checkpoint,
)

OPTION = "--pretrained_model_name_or_path"
MMDIT = "model.diffusion_model."
CLIP_L, CLIP_G, T5 = (f"text_encoders.{name}.transformer." for name in ("clip_l", "clip_g", "t5xxl"))

# role: variant, table size, attn2 blocks, MMDiT prefix, VAE prefix, embedded encoders, description
DETECTION = {
    "sd3_medium": ("medium", 32, (), MMDIT, "first_stage_model.", {}, "SD3 Medium, with VAE"),
    "sd3_medium_incl_clips": ("medium", 32, (), MMDIT, "first_stage_model.", {"clip_l": CLIP_L, "clip_g": CLIP_G},
                              "SD3 Medium, with VAE, CLIP-L, CLIP-G"),
    "sd3_medium_incl_t5": ("medium", 32, (), MMDIT, "first_stage_model.",
                           {"clip_l": CLIP_L, "clip_g": CLIP_G, "t5xxl": T5}, "SD3 Medium, with VAE, CLIP-L, CLIP-G, T5-XXL"),
    "sd3_medium_mmdit_only": ("medium", 32, (), "", None, {}, "SD3 Medium, MMDiT only"),
    "sd3_5_medium": ("5-medium", 64, (0,), MMDIT, "first_stage_model.", {}, "SD3.5 Medium, with VAE"),
    "sd3_5_large": ("5-large", 32, (), MMDIT, "first_stage_model.", {}, "SD3.5 Large, with VAE"),
}  # fmt: skip


@pytest.mark.parametrize("role", DETECTION)
def test_variant_and_packaging_are_read_from_the_tensors(tiny_sd3_models, role):
    variant, table, attn2, prefix, vae_prefix, embedded, description = DETECTION[role]
    path = tiny_sd3_models[role]
    checkpoint = open_sd3_checkpoint(path)
    params = checkpoint.params
    assert (params.variant, params.depth, params.hidden_size, params.num_heads) == (variant, 2, 128, 2)
    assert params.qk_norm is (variant != "medium")
    assert (params.x_block_self_attn_layers, params.pos_embed_max_size) == (attn2, table)
    assert (params.context_in_dim, params.adm_in_dim) == (384, 320)
    assert (checkpoint.prefix, checkpoint.vae_prefix, checkpoint.embedded) == (prefix, vae_prefix, embedded)
    assert has_vae(path) is (vae_prefix is not None)
    assert describe_checkpoint(read_header(path)) == f"SD3/SD3.5 MMDiT checkpoint ({description})"
    assert checkpoint.file_dtypes() == {"F32"}


def _shape(path: Path, key: str) -> tuple[int, ...]:
    return read_header(path).shape(key)


def test_the_tiny_set_fits_sd3_conditioning(tiny_sd3_models):
    """context = T5 width >= CLIP-L + CLIP-G widths (zero-padded), pooled = CLIP-L + CLIP-G projections."""
    params = open_sd3_checkpoint(tiny_sd3_models["sd3_medium"]).params
    clip_l_width = _shape(tiny_sd3_models["clip_l"], "text_model.encoder.layers.0.self_attn.q_proj.weight")[0]
    clip_g_projection, clip_g_width = _shape(tiny_sd3_models["clip_g"], "text_projection.weight")
    t5_width = _shape(tiny_sd3_models["t5xxl"], "encoder.block.0.layer.0.SelfAttention.q.weight")[1]
    assert (clip_l_width, clip_g_width, t5_width) == (128, 192, 384)
    assert params.context_in_dim == t5_width > clip_l_width + clip_g_width
    assert params.adm_in_dim == clip_l_width + clip_g_projection
    bundled = tiny_sd3_models["sd3_medium_incl_t5"]
    assert _shape(bundled, f"{CLIP_G}text_projection.weight") == (192, 192)
    assert _shape(bundled, f"{T5}shared.weight") == (32128, 384)
    assert _shape(bundled, f"{CLIP_L}text_model.embeddings.token_embedding.weight") == (49408, 128)


def _tensor(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def test_medium_packagings_share_the_mmdit_and_bundled_encoders_differ_from_the_separate_files(tiny_sd3_models):
    key = "joint_blocks.1.x_block.mlp.fc2.weight"
    reference = _tensor(tiny_sd3_models["sd3_medium_mmdit_only"], key)
    for role in ("sd3_medium", "sd3_medium_incl_clips", "sd3_medium_incl_t5"):
        torch.testing.assert_close(_tensor(tiny_sd3_models[role], MMDIT + key), reference, rtol=0, atol=0)
    bundled = tiny_sd3_models["sd3_medium_incl_t5"]
    probe = "text_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(_tensor(bundled, CLIP_L + probe), _tensor(tiny_sd3_models["clip_l"], probe))
    assert not torch.equal(_tensor(bundled, CLIP_G + probe), _tensor(tiny_sd3_models["clip_g"], probe))
    vae_key = "decoder.conv_in.weight"
    assert not torch.equal(_tensor(bundled, "first_stage_model." + vae_key), _tensor(tiny_sd3_models["vae"], vae_key))


def test_loads_in_the_requested_dtype_frozen(tiny_sd3_models):
    model = load_sd3_mmdit(tiny_sd3_models["sd3_5_medium"], dtype=torch.bfloat16)
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    expected = load_file(str(tiny_sd3_models["sd3_5_medium"]))[MMDIT + "pos_embed"].bfloat16()
    torch.testing.assert_close(model.pos_embed, expected, rtol=0, atol=0)


def _inputs(params, batch: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(batch, 16, 8, 12, generator=generator), timesteps=torch.full((batch,), 500.0),
        y=torch.randn(batch, params.adm_in_dim, generator=generator),
        context=torch.randn(batch, 9, params.context_in_dim, generator=generator),
    )  # fmt: skip


@torch.no_grad()
def test_fp8_linear_stores_the_joint_block_linears_in_fp8(tiny_sd3_models, tmp_path):
    path = tiny_sd3_models["sd3_5_medium"]
    reference = load_sd3_mmdit(path, dtype=torch.bfloat16)
    model = load_sd3_mmdit(path, dtype=torch.bfloat16, fp8_linear=True)
    fp8 = {k for k, t in model.state_dict().items() if t.dtype == torch.float8_e4m3fn}
    assert fp8 == block_linear_weight_keys(model)
    assert len(fp8) == 2 * 4 + 2 + 2 * 4 + 1  # per block: qkv, proj, fc1, fc2, adaLN (+ attn2 qkv, proj in block 0)
    assert model.joint_blocks[0].x_block.attn.ln_q.weight.dtype == torch.bfloat16
    assert enable_fp8_linear(model) == len(fp8)
    inputs = {k: v.bfloat16() if k != "timesteps" else v for k, v in _inputs(model.params).items()}
    out, expected = model(**inputs).float(), reference(**inputs).float()
    assert ((out - expected).abs().max() / expected.abs().max()).item() < 0.15

    fp8_file = tmp_path / "sd3.5_medium_fp8.safetensors"
    state = load_file(str(path))
    save_file({k: v.to(torch.float8_e4m3fn) if k[len(MMDIT) :] in fp8 else v for k, v in state.items()}, str(fp8_file))
    from_fp8 = load_sd3_mmdit(fp8_file, dtype=torch.float32, fp8_linear=True)
    key = "joint_blocks.0.x_block.attn2.qkv.weight"
    assert torch.equal(from_fp8.state_dict()[key].view(torch.uint8), model.state_dict()[key].view(torch.uint8))
    assert load_sd3_mmdit(fp8_file, dtype=torch.float32).state_dict()[key].dtype == torch.float32


def test_fp8_compute_dtype_is_refused(tiny_sd3_models):
    with pytest.raises(UserError, match="compute dtype cannot be fp8"):
        load_sd3_mmdit(tiny_sd3_models["sd3_medium"], dtype=torch.float8_e4m3fn)


def _diffusers_vae(state: dict[str, torch.Tensor], params):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    levels = len(params.ch_mult)
    config = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=params.channels,
        layers_per_block=params.num_res_blocks, latent_channels=16, norm_num_groups=32, sample_size=32,
        scaling_factor=SD3_SCALE_FACTOR, shift_factor=SD3_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(state), config), strict=True)
    return vae.eval()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item(), msg=what)


@torch.no_grad()
def test_vae_from_the_checkpoint_matches_diffusers_with_sd3_scaling(tiny_sd3_models):
    path = tiny_sd3_models["sd3_medium"]
    ours = load_sd3_vae(path)
    assert (ours.params.scale_factor, ours.params.shift_factor) == (1.5305, 0.0609)
    assert not ours.params.use_quant_conv and ours.latent_channels == 16
    state = {k.removeprefix("first_stage_model."): v for k, v in load_file(str(path)).items()
             if k.startswith("first_stage_model.")}  # fmt: skip
    reference = _diffusers_vae(state, ours.params)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 48, generator=generator) * 2 - 1
    mean = reference.encode(images).latent_dist.mean
    _assert_close(ours.encode_moments(images)[0], mean, "posterior mean")
    _assert_close(ours.encode(images), (mean - 0.0609) * 1.5305, "process_in: (z - shift) * scale")
    latents = torch.randn(2, 16, 4, 6, generator=generator)
    _assert_close(ours.decode(latents), reference.decode(latents / 1.5305 + 0.0609).sample, "process_out, decode")


def test_separate_vae_file_and_a_file_without_one(tiny_sd3_models):
    separate = load_sd3_vae(tiny_sd3_models["vae"])
    bundled = load_sd3_vae(tiny_sd3_models["sd3_5_large"])
    assert not torch.equal(separate.decoder.conv_in.weight, bundled.decoder.conv_in.weight)
    path = tiny_sd3_models["sd3_medium_mmdit_only"]
    with pytest.raises(UserError) as error:
        load_sd3_vae(path)
    _one_line(error, "--vae", path, "expected an autoencoder (AE/VAE), found SD3/SD3.5 MMDiT checkpoint (SD3 Medium")


def _one_line(error: pytest.ExceptionInfo, option: str, path: Path, fragment: str) -> None:
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{option} {path}: "), message
    assert fragment in message, (fragment, message)


def _write(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(state, str(path))
    return path


def test_other_models_given_as_sd3(tiny_models, tiny_sd3_models, tmp_path):
    diffusers_like = _write(
        {"transformer_blocks.0.attn.add_q_proj.weight": torch.zeros(2, 2), "pos_embed.proj.weight": torch.zeros(2)},
        tmp_path / "diffusion_pytorch_model.safetensors",
    )
    cases = {
        tiny_models["flux_dev"]: "expected an SD3/SD3.5 MMDiT, found FLUX.1 dev transformer",
        tiny_models["ae"]: "expected an SD3/SD3.5 MMDiT, found 16-channel autoencoder",
        tiny_sd3_models["vae"]: "expected an SD3/SD3.5 MMDiT, found 16-channel autoencoder",
        tiny_sd3_models["clip_g"]: "expected an SD3/SD3.5 MMDiT, found CLIP text encoder (width 192)",
        diffusers_like: "found SD3/SD3.5 transformer in diffusers layout",
        tmp_path / "missing.safetensors": "file not found",
    }
    for path, fragment in cases.items():
        with pytest.raises(UserError) as error:
            load_sd3_mmdit(path, option=OPTION)
        _one_line(error, OPTION, path, fragment)


def test_truncated_file(tiny_sd3_models, tmp_path):
    data = tiny_sd3_models["sd3_5_large"].read_bytes()
    truncated = tmp_path / "sd3.5_large.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as error:
        open_sd3_checkpoint(truncated, option="--ckpt_path")
    _one_line(error, "--ckpt_path", truncated, "is truncated")


@pytest.fixture(scope="module")
def medium_state(tiny_sd3_models) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_sd3_models["sd3_medium"]))


def _damaged(state: dict, change) -> dict:
    state = dict(state)
    change(state)
    return state


@pytest.mark.parametrize(
    "what, change, fragment",
    [
        ("missing tensor", lambda s: s.pop(MMDIT + "joint_blocks.1.x_block.mlp.fc2.bias"),
         "not a complete SD3 Medium MMDiT checkpoint: missing 1 keys: model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.bias"),
        ("extra tensor", lambda s: s.update({MMDIT + "joint_blocks.0.x_block.attn.lora_up.weight": torch.zeros(1)}),
         "unexpected 1 keys: model.diffusion_model.joint_blocks.0.x_block.attn.lora_up.weight"),
        ("wrong shape", lambda s: s.update({MMDIT + "final_layer.linear.bias": torch.zeros(63)}),
         "wrong shape 1 keys: model.diffusion_model.final_layer.linear.bias (63,) (expected (64,))"),
        ("no position table", lambda s: s.pop(MMDIT + "pos_embed"),
         "damaged SD3/SD3.5 MMDiT checkpoint, missing key pos_embed"),
        ("non-square table", lambda s: s.update({MMDIT + "pos_embed": torch.zeros(1, 1000, 128)}),
         "inconsistent SD3/SD3.5 MMDiT checkpoint (pos_embed holds 1000 positions, not a square grid)"),
        ("scaled fp8", lambda s: s.update({MMDIT + "joint_blocks.0.x_block.attn.qkv.scale_weight": torch.ones(1)}),
         "'scaled' fp8 files are not supported"),
    ],
)  # fmt: skip
def test_damaged_files_are_named_in_one_line(medium_state, tmp_path, what, change, fragment):
    path = _write(_damaged(medium_state, change), tmp_path / "sd3_medium.safetensors")
    with pytest.raises(UserError) as error:
        load_sd3_mmdit(path, option=OPTION)
    _one_line(error, OPTION, path, fragment)
