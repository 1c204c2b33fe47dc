"""sd3_train_network.py through its real command line on tiny SD3/SD3.5 files: upstream's command, separate and
embedded encoders, upstream's cache files, text-encoder LoRA, SD3.5's position options with encoder dropout and an
exact resume, the cache tools, and one-line errors for wrong files and FLUX-only options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.e2e.test_flux_train_network import tiny_dataset
from tests.helpers import REPO, run_script

PROMPTS = str(REPO / "examples" / "tiny_prompts.txt")


def separate_files(models: dict[str, Path], checkpoint: str = "sd3_medium") -> list[str]:
    return ["--pretrained_model_name_or_path", str(models[checkpoint]), "--clip_l", str(models["clip_l"]),
            "--clip_g", str(models["clip_g"]), "--t5xxl", str(models["t5xxl"])]  # fmt: skip


def common(config: Path, out: Path, *, steps: int = 3) -> list[str]:
    return ["--dataset_config", str(config), "--output_dir", str(out), "--output_name", "lora", "--network_module",
            "networks.lora_sd3", "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", str(steps),
            "--seed", "42", "--t5xxl_max_token_length", "16"]  # fmt: skip


def train(*args: str):
    return run_script("sd3_train_network.py", *args)


def accelerate_launch(*args: str) -> subprocess.CompletedProcess:
    """The way users run it: ``accelerate launch sd3_train_network.py ...`` (on the CPU here)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1",
               "sd3_train_network.py", *args]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1")
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[-1]


def test_upstream_command_with_separate_files_caches_and_samples(tiny_sd3_models, tmp_path):
    config = tiny_dataset(tmp_path)
    out = tmp_path / "out"
    result = accelerate_launch(
        *separate_files(tiny_sd3_models), *common(config, out),
        "--cache_latents_to_disk", "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk",
        "--network_train_unet_only", "--weighting_scheme", "logit_normal", "--logit_mean", "0.0", "--logit_std", "1.0",
        "--training_shift", "3.0", "--apply_lg_attn_mask", "--apply_t5_attn_mask", "--save_precision", "bf16",
        "--sample_prompts", PROMPTS, "--sample_every_n_steps", "3", "--sdpa", "--gradient_checkpointing",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CLIP-L from --clip_l" in result.stderr and "VAE embedded in" in result.stderr  # where each part came from
    final = out / "lora.safetensors"
    tensors = load_file(final)
    assert {t.dtype for k, t in tensors.items() if "lora_" in k} == {torch.bfloat16}
    # every name is the one ComfyUI derives from the checkpoint: lora_unet_ + the Linear's path with . -> _
    with safe_open(str(tiny_sd3_models["sd3_medium"]), "pt") as f:
        prefix = "model.diffusion_model."
        linears = {k[len(prefix) : -len(".weight")] for k in f.keys() if k.startswith(prefix + "joint_blocks.")
                   and k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2 and ".ln_" not in k}  # fmt: skip
    names = {k.split(".")[0] for k in tensors}
    assert names == {"lora_unet_" + path.replace(".", "_") for path in linears}
    assert len(names) == 17  # depth 2: 5 per block, and the last context block has only qkv and adaLN
    meta = metadata_of(final)
    assert meta["ss_base_model_version"] == "medium" and meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    assert meta["modelspec.implementation"] == "diffusers" and meta["ss_network_module"] == "networks.lora_sd3"
    assert meta["ss_training_shift"] == "3.0" and meta["ss_weighting_scheme"] == "logit_normal"
    assert meta["ss_apply_lg_attn_mask"] == "True" and meta["ss_apply_t5_attn_mask"] == "True"
    assert "ss_model_type" not in meta and "ss_guidance_scale" not in meta  # FLUX's keys stay out
    # upstream's cache files: unscaled latents in <stem>_<W>x<H>_sd3.npz, upstream's text keys in <stem>_sd3_te.npz
    images = tmp_path / "tiny_dataset"
    latents = np.load(images / "red_circle_0064x0064_sd3.npz")
    assert latents["latents_8x8"].shape == (16, 8, 8)
    text = np.load(images / "red_circle_sd3_te.npz")
    assert {"lg_out", "t5_out", "lg_pooled", "clip_l_attn_mask", "clip_g_attn_mask", "t5_attn_mask"} <= set(text.files)
    assert text["lg_out"].shape == (77, 128 + 192) and text["t5_out"].shape == (16, 384)
    assert bool(text["apply_lg_attn_mask"]) and bool(text["apply_t5_attn_mask"])
    assert len(list((out / "sample").glob("*.png"))) == 1


def test_latents_are_unscaled_posterior_samples(tiny_sd3_models, tmp_path):
    """The cache holds the VAE's latents before SD3's (z - 0.0609) * 1.5305, as upstream's files do: a draw from the
    posterior (mean + sigma * eps) by default, the mean with --vae_latent_mean."""
    from library.models.sd3.loading import load_sd3_vae
    from library.training.families.sd3 import sd3_latent_codec

    vae = load_sd3_vae(tiny_sd3_models["sd3_medium"], option="--vae")
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    mean, logvar = vae.encode_moments(images)
    torch.testing.assert_close(sd3_latent_codec(vae, sample=False).encode_latents(images), mean)
    torch.manual_seed(0)
    drawn = sd3_latent_codec(vae).encode_latents(images)
    torch.manual_seed(0)
    torch.testing.assert_close(drawn, mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape))
    torch.testing.assert_close(vae.encode(images), (mean - 0.0609) * 1.5305)


def test_embedded_encoders_alone_text_encoder_lora_and_explicit_option_wins(tiny_sd3_models, tmp_path):
    config = tiny_dataset(tmp_path)
    out = tmp_path / "out"
    result = accelerate_launch(
        "--pretrained_model_name_or_path", str(tiny_sd3_models["sd3_medium_incl_t5"]), *common(config, out),
        "--network_args", "train_t5xxl=True", "--text_encoder_lr", "1e-3", "5e-4", "2e-4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "T5-XXL embedded in" in result.stderr and "CLIP-G embedded in" in result.stderr
    tensors = load_file(out / "lora.safetensors")
    for prefix in ("lora_te1_", "lora_te2_", "lora_te3_", "lora_unet_"):  # every part trained (ups start at zero)
        assert any(v.abs().max() > 0 for k, v in tensors.items() if k.startswith(prefix) and "lora_up" in k), prefix
    explicit = train("--pretrained_model_name_or_path", str(tiny_sd3_models["sd3_medium_incl_t5"]), "--t5xxl",
                     str(tiny_sd3_models["t5xxl"]), *common(config, tmp_path / "explicit", steps=1),
                     "--network_train_unet_only")  # fmt: skip
    assert explicit.returncode == 0, explicit.stderr[-3000:]
    assert "--t5xxl" in explicit.stderr and "instead of the T5-XXL embedded" in explicit.stderr


def test_sd35_positions_and_encoder_dropout_resume_exactly(tiny_sd3_models, tmp_path):
    config = tiny_dataset(tmp_path)
    options = [*separate_files(tiny_sd3_models, "sd3_5_medium"), "--vae", str(tiny_sd3_models["vae"]),
               "--enable_scaled_pos_embed", "--pos_emb_random_crop_rate", "0.5", "--clip_l_dropout_rate", "0.5",
               "--clip_g_dropout_rate", "0.5", "--t5_dropout_rate", "0.5", "--cache_text_encoder_outputs",
               "--network_train_unet_only", "--save_every_n_steps", "2", "--save_state"]  # fmt: skip
    full = train(*options, *common(config, tmp_path / "full", steps=4))
    assert full.returncode == 0, full.stderr[-3000:]
    assert "scaled position embeddings" in full.stderr
    state = tmp_path / "full" / "lora-step00000002-state"
    resumed = train(*options, *common(config, tmp_path / "resumed", steps=4), "--resume", str(state))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(tmp_path / "full" / "lora.safetensors"), load_file(tmp_path / "resumed" / "lora.safetensors")
    assert a.keys() == b.keys() and any("attn2" in k for k in a)  # SD3.5 Medium's dual attention is trained too
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    meta = metadata_of(tmp_path / "full" / "lora.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora" and meta["ss_t5_dropout_rate"] == "0.5"


def test_cache_tools_serve_sd3_and_training_reuses_their_files(tiny_sd3_models, tmp_path):
    config = tiny_dataset(tmp_path)
    images = tmp_path / "tiny_dataset"
    args = ["--sd3", "--pretrained_model_name_or_path", str(tiny_sd3_models["sd3_medium_incl_t5"]), "--dataset_config",
            str(config), "--t5xxl_max_token_length", "16"]  # fmt: skip
    for tool in ("tools/cache_latents.py", "tools/cache_text_encoder_outputs.py"):
        result = run_script(tool, *args)
        assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(images.glob("*_sd3*.npz"))
    assert len(files) == 8, files
    stamps = {f: f.stat().st_mtime_ns for f in files}
    result = train("--pretrained_model_name_or_path", str(tiny_sd3_models["sd3_medium_incl_t5"]),
                   *common(config, tmp_path / "out", steps=1), "--cache_latents_to_disk",
                   "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # reused, not encoded again


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--timestep_sampling", "shift"], "--timestep_sampling is FLUX.1's; SD3 draws timesteps from --weighting_scheme"),
        (["--guidance_scale", "1.0"], "--guidance_scale is FLUX.1 dev's distilled guidance"),
        (["--discrete_flow_shift", "3.0"], "--discrete_flow_shift is FLUX.1's; SD3 shifts timesteps with --training_shift"),
        (["--model_prediction_type", "raw"], "--model_prediction_type is FLUX.1's"),
        (["--t5xxl_device", "cpu"], "--t5xxl_device is marked [DOES NOT WORK] upstream"),
        (["--save_t5xxl"], "--save_t5xxl is marked [DOES NOT WORK] upstream"),
    ],
)
def test_flux_only_and_broken_upstream_options_are_rejected(tmp_path, extra, message):
    result = train("--pretrained_model_name_or_path", "x.safetensors", "--output_dir", str(tmp_path), *extra)
    assert message in one_line_error(result)


def test_wrong_files_give_one_line(tiny_models, tiny_sd3_models, tmp_path):
    config = tiny_dataset(tmp_path)
    cases = [
        (["--pretrained_model_name_or_path", str(tiny_models["flux_dev"])], "expected an SD3/SD3.5 MMDiT"),
        (["--pretrained_model_name_or_path", str(tiny_sd3_models["sd3_medium_mmdit_only"]), "--clip_l",
          str(tiny_sd3_models["clip_l"]), "--clip_g", str(tiny_sd3_models["clip_g"]), "--t5xxl",
          str(tiny_sd3_models["t5xxl"])], "--vae is required"),
        ([*separate_files(tiny_sd3_models)[:4], "--clip_g", str(tiny_sd3_models["clip_l"]), "--t5xxl",
          str(tiny_sd3_models["t5xxl"])], "--clip_g"),
        (["--pretrained_model_name_or_path", str(tiny_sd3_models["sd3_medium"])], "--clip_l is required"),
    ]  # fmt: skip
    for args, message in cases:
        line = one_line_error(train(*args, *common(config, tmp_path / "out", steps=1)))
        assert message in line, line
