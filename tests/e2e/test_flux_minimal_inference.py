"""flux_minimal_inference.py through its real command line, on tiny checkpoints in the real layouts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_script


def _args(models, out, *extra):
    return [
        "--ckpt", str(models["flux_dev"]), "--clip_l", str(models["clip_l"]), "--t5xxl", str(models["t5xxl"]),
        "--ae", str(models["ae"]), "--dtype", "fp32", "--width", "64", "--height", "48", "--steps", "3",
        "--seed", "7", "--prompt", "a cat holding a sign", "--out", str(out), *extra,
    ]  # fmt: skip


def _only_png(folder):
    files = sorted(folder.glob("*.png"))
    assert len(files) == 1, files
    assert not list(folder.glob(".*tmp*")), "temporary files left behind"
    return files[0]


def test_generates_png_and_seed_is_reproducible(tiny_models, tmp_path):
    first = run_script("flux_minimal_inference.py", *_args(tiny_models, tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    image = Image.open(_only_png(tmp_path / "a"))
    assert image.size == (64, 48) and image.mode == "RGB"
    assert image.info["seed"] == "7"
    assert "sampling" in first.stderr  # the progress bar

    again = run_script("flux_minimal_inference.py", *_args(tiny_models, tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(_only_png(tmp_path / "b"))))


@pytest.mark.parametrize(
    "extra",
    [
        ["--flux_dtype", "fp8", "--t5xxl_dtype", "fp8", "--apply_t5_attn_mask", "--offload"],
        ["--negative_prompt", "blurry", "--cfg_scale", "2.0", "--guidance", "1.0"],
    ],
    ids=["fp8-mask-offload", "true-cfg"],
)
def test_variants(tiny_models, tmp_path, extra):
    result = run_script("flux_minimal_inference.py", *_args(tiny_models, tmp_path, *extra))
    assert result.returncode == 0, result.stderr
    assert Image.open(_only_png(tmp_path)).size == (64, 48)


def test_schnell(tiny_models, tmp_path):
    args = _args(tiny_models, tmp_path)
    args[1] = str(tiny_models["flux_schnell"])
    result = run_script("flux_minimal_inference.py", *args)
    assert result.returncode == 0, result.stderr
    assert "schnell" in result.stderr
    _only_png(tmp_path)


def _error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_wrong_files_give_one_line(tiny_models, tmp_path):
    text_file = tmp_path / "notes.safetensors"
    text_file.write_text("not a model\n" * 20)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_models["clip_l"].read_bytes()[:5000])
    cases = [
        ("--ae", tiny_models["clip_l"], "--ae", "CLIP text encoder"),
        ("--clip_l", tiny_models["ae"], "--clip_l", "autoencoder"),
        ("--clip_l", tiny_models["t5xxl"], "--clip_l", "T5"),
        ("--t5xxl", tiny_models["clip_l"], "--t5xxl", "CLIP text encoder"),
        ("--ckpt", tiny_models["ae"], "--ckpt_path", "autoencoder"),
        ("--ckpt", text_file, "--ckpt_path", "not a safetensors file"),
        ("--t5xxl", truncated, "--t5xxl", "truncated"),
    ]
    for option, path, named_option, found in cases:
        args = _args(tiny_models, tmp_path / "out")
        args[args.index(option) + 1] = str(path)
        line = _error_line(run_script("flux_minimal_inference.py", *args))
        assert named_option in line and str(path) in line and found in line, line


def test_bad_option_values(tiny_models, tmp_path):
    line = _error_line(run_script("flux_minimal_inference.py", *_args(tiny_models, tmp_path, "--flux_dtype", "fp9")))
    assert "--flux_dtype" in line and "fp9" in line


def _make_lora(tiny_models, path):
    """A LoRA over FLUX, CLIP-L and T5 with random (non-zero) up weights, saved as training saves it."""
    import torch

    from library.models.flux.loading import load_flux_model
    from library.models.text_encoders.clip import load_clip_text_model
    from library.models.text_encoders.t5 import load_t5_encoder
    from networks import lora_flux

    flux = load_flux_model(tiny_models["flux_dev"], dtype=torch.float32)
    encoders = [load_clip_text_model(tiny_models["clip_l"]), load_t5_encoder(tiny_models["t5xxl"])]
    network = lora_flux.create_network(1.0, 4, 2.0, None, encoders, flux, train_t5xxl="True")
    network.apply_to(encoders, flux)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    network.save_weights(path, torch.float32, {"ss_network_module": "networks.lora_flux"})
    assert any(k.startswith("lora_te1_") for k in network.state_dict())
    assert any(k.startswith("lora_te3_") for k in network.state_dict())


def test_lora_applied_merged_and_scaled(tiny_models, tmp_path):
    lora = tmp_path / "lora.safetensors"
    _make_lora(tiny_models, lora)

    def image(name, *extra):
        result = run_script("flux_minimal_inference.py", *_args(tiny_models, tmp_path / name, *extra))
        assert result.returncode == 0, result.stderr
        return np.asarray(Image.open(_only_png(tmp_path / name)), dtype=np.float32)

    base = image("base")
    applied = image("applied", "--lora", f"{lora};1.0")
    merged = image("merged", "--lora", f"{lora};1.0", "--merge_lora_weights")
    zero = image("zero", "--lora_weights", f"{lora};0")
    assert np.abs(applied - base).mean() > 2.0  # the LoRA changes the image
    assert np.abs(applied - merged).max() <= 2.0  # merged weights give the same image (rounding aside)
    np.testing.assert_array_equal(zero, base)


def test_lora_errors(tiny_models, tmp_path):
    line = _error_line(
        run_script("flux_minimal_inference.py", *_args(tiny_models, tmp_path, "--lora", "missing.safetensors;1"))
    )
    assert "--lora_weights missing.safetensors: file not found" in line
    line = _error_line(
        run_script("flux_minimal_inference.py", *_args(tiny_models, tmp_path, "--lora", "x.safetensors;strong"))
    )
    assert "multiplier 'strong' is not a number" in line
