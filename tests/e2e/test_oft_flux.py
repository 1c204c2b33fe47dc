"""networks.oft_flux through the real command lines on tiny FLUX.1 checkpoints: flux_train_network.py trains and saves
upstream's OFT keys and metadata and continues from its file; --base_weights merges it under a LoRA training;
flux_minimal_inference.py applies it with a multiplier and merges it, giving the same image both ways."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.models.flux.model import Flux
from library.models.flux.tiny import tiny_flux_params
from networks import oft_flux
from tests.e2e.test_flux_train_network import _one_line_error, metadata_of, tiny_dataset, train
from tests.helpers import run_script

OFT = ("--network_module", "networks.oft_flux", "--network_dim", "4", "--network_alpha", "1e-3")


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """An OFT trained for 4 steps at a high lr (so its rotations reach the constraint) and the run's result."""
    tmp_path = tmp_path_factory.mktemp("oft")
    result = train(tiny_models, tmp_path / "out", tiny_dataset(tmp_path), *OFT, "--learning_rate", "1e-2")
    return tmp_path / "out" / "lora.safetensors", result


def test_training_saves_upstreams_oft_keys_and_metadata(trained):
    path, result = trained
    assert result.returncode == 0, result.stderr[-3000:]
    assert "a network of 8 OFT modules" in result.stderr  # the start-up summary
    with torch.device("meta"):
        expected = oft_flux.create_network(1.0, 4, 1e-3, None, None, Flux(tiny_flux_params())).state_dict()
    tensors = load_file(path)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert tensors["oft_unet_double_blocks_1_txt_attn_qkv.oft_blocks.2"].shape == (4, 64, 64)  # v: 256 rows / 4
    assert all(float(v) == pytest.approx(1e-3) for k, v in tensors.items() if k.endswith(".alpha"))
    assert all(v.abs().max() > 0 for k, v in tensors.items() if ".oft_blocks." in k)  # trained from zero
    meta = metadata_of(path)
    assert meta["ss_network_module"] == "networks.oft_flux"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "0.001"


def _inference(models, out, *extra):
    args = [
        "--ckpt", str(models["flux_dev"]), "--clip_l", str(models["clip_l"]), "--t5xxl", str(models["t5xxl"]),
        "--ae", str(models["ae"]), "--dtype", "fp32", "--width", "64", "--height", "48", "--steps", "3",
        "--seed", "7", "--prompt", "a cat holding a sign", "--out", str(out), *extra,
    ]  # fmt: skip
    result = run_script("flux_minimal_inference.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    (png,) = out.glob("*.png")
    return np.asarray(Image.open(png), dtype=np.float32), result.stderr


def test_inference_applies_and_merges_oft_with_a_multiplier(tiny_models, trained, tmp_path):
    path, _ = trained
    base, _ = _inference(tiny_models, tmp_path / "base")
    applied, log = _inference(tiny_models, tmp_path / "applied", "--lora_weights", f"{path};0.8")
    assert f"OFT {path} x 0.8: 8 modules applied" in log
    merged, log = _inference(tiny_models, tmp_path / "merged", "--lora_weights", f"{path};0.8", "--merge_lora_weights")
    assert f"OFT {path} x 0.8: 8 modules merged" in log
    assert np.abs(applied - base).mean() > 1.0  # the rotations change the image
    assert np.abs(applied - merged).max() <= 2.0  # merged weights give the same image (rounding aside)


def test_continuing_from_the_file_and_merging_it_as_base_weights(tiny_models, trained, tmp_path):
    path, _ = trained
    config = tiny_dataset(tmp_path)
    # --dim_from_weights: the file's modules and blocks, not --network_dim 16; a tiny lr keeps the weights
    again = train(tiny_models, tmp_path / "again", config, *OFT, "--network_weights", str(path), "--dim_from_weights",
                  "--network_dim", "16", "--learning_rate", "1e-9", steps=1)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    first, second = load_file(path), load_file(tmp_path / "again" / "lora.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=1e-6, msg=key)
    assert metadata_of(tmp_path / "again" / "lora.safetensors")["ss_network_dim"] == "4"

    lora = train(tiny_models, tmp_path / "lora", config, "--base_weights", str(path), steps=1)  # a LoRA on top
    assert lora.returncode == 0, lora.stderr[-3000:]
    assert "merged 8 OFT modules into the base weights" in lora.stderr
    assert all(k.startswith("lora_unet_") for k in load_file(tmp_path / "lora" / "lora.safetensors"))

    wrong = train(tiny_models, tmp_path / "wrong", config, "--network_weights", str(path), steps=1)
    assert "holds networks.oft_flux's weights" in _one_line_error(wrong)
    assert "--network_module networks.oft_flux" in _one_line_error(wrong)
    no_max_norm = train(tiny_models, tmp_path / "max_norm", config, *OFT, "--scale_weight_norms", "1", steps=1)
    assert "--scale_weight_norms: networks.oft_flux has no max-norm regularization" in _one_line_error(no_max_norm)
