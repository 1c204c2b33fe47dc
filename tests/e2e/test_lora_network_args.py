"""LoRA network_args and --network_weights through flux_train_network.py's real command line, as upstream users
pass them: continuing from an upstream-written file with other modules, unused SD-era args, GGPO,
network_reg_lrs, and a LoRA of another model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.e2e.test_flux_train_network import _losses, _one_line_error, metadata_of, tiny_dataset, train

RANK = 4


def upstream_double_block_lora(flux_file: Path, path: Path) -> dict[str, torch.Tensor]:
    """A LoRA as upstream's lora_flux writes it with train_blocks=double: ``lora_unet_double_blocks_*`` only,
    bf16 down/up weights, 0-dim alphas in bf16 for the image stream and fp32 for the text stream."""
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    with safe_open(str(flux_file), "pt") as f:
        for key in f.keys():
            bare = key.removeprefix("model.diffusion_model.")
            if (
                not (bare.startswith("double_blocks.") and bare.endswith(".weight"))
                or len(f.get_slice(key).get_shape()) != 2
            ):
                continue
            out_dim, in_dim = f.get_slice(key).get_shape()
            name = "lora_unet_" + bare.removesuffix(".weight").replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = (torch.randn(RANK, in_dim, generator=gen) * 0.1).bfloat16()
            tensors[f"{name}.lora_up.weight"] = (torch.randn(out_dim, RANK, generator=gen) * 0.01).bfloat16()
            dtype = torch.bfloat16 if "_img_" in name else torch.float32
            tensors[f"{name}.alpha"] = torch.tensor(2.0, dtype=dtype)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_flux", "ss_network_dim": str(RANK)})
    return tensors


def test_continuing_from_an_upstream_double_blocks_lora_with_all_blocks(tiny_models, tmp_path):
    config = tiny_dataset(tmp_path)
    file = tmp_path / "upstream_double.safetensors"
    given = upstream_double_block_lora(tiny_models["flux_dev"], file)
    modules = {k.partition(".")[0] for k in given}
    result = train(tiny_models, tmp_path / "out", config, "--network_weights", str(file), "--learning_rate", "1e-5",
                   steps=2)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_file(tmp_path / "out" / "lora.safetensors")
    fresh = {k.partition(".")[0] for k in saved} - modules
    assert fresh and all("single_blocks" in name for name in fresh)  # default train_blocks=all adds the singles
    assert f"{len(modules)} modules from the file, {len(fresh)} start fresh (not in the file), 0 file modules " \
           "unused" in result.stderr  # fmt: skip
    for key, value in given.items():  # the double blocks started from the file: 2 Adam steps of 1e-5 move little
        torch.testing.assert_close(saved[key].float(), value.float(), rtol=0, atol=1e-4, msg=key)


def test_unused_network_args_warn_and_training_runs(tiny_models, tmp_path):
    config = tiny_dataset(tmp_path)
    result = train(tiny_models, tmp_path / "out", config, "--network_args", "conv_dim=4", "dropout=0.1",
                   "split_qkv=true", steps=2)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("not used by networks.lora_flux") == 1
    assert "--network_args conv_dim, dropout: not used by networks.lora_flux, ignored" in result.stderr
    saved = load_file(tmp_path / "out" / "lora.safetensors")
    assert saved["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 3 * 4  # split_qkv=true
    args = json.loads(metadata_of(tmp_path / "out" / "lora.safetensors")["ss_network_args"])
    assert args == {"conv_dim": "4", "dropout": "0.1", "split_qkv": "true"}


def test_network_reg_lrs_give_matched_modules_their_own_groups(tiny_models, tmp_path):
    config = tiny_dataset(tmp_path)
    result = train(tiny_models, tmp_path / "out", config, "--network_args",
                   "network_reg_lrs=double_blocks_0=0,single_blocks=1e-2", steps=2)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    groups = re.search(r"optimizer groups: (.*)", result.stderr).group(1)
    assert groups.startswith("unet reg_lr_1 lr 0.01 (12 tensors), unet lr 0.001 ("), groups
    saved = load_file(tmp_path / "out" / "lora.safetensors")
    ups = {k: v for k, v in saved.items() if k.endswith("lora_up.weight")}
    assert all(not v.any() for k, v in ups.items() if "double_blocks_0_" in k)  # lr 0: frozen at zero
    assert all(v.any() for k, v in ups.items() if "double_blocks_0_" not in k)
    meta = metadata_of(tmp_path / "out" / "lora.safetensors")
    # upstream also records the --network_dropout it passes to the network as "dropout"
    assert json.loads(meta["ss_network_args"]) == {"network_reg_lrs": "double_blocks_0=0,single_blocks=1e-2",
                                                   "dropout": None}  # fmt: skip


def test_ggpo_perturbs_from_the_second_step_and_the_loss_stays_finite(tiny_models, tmp_path):
    config = tiny_dataset(tmp_path)
    result = train(tiny_models, tmp_path / "out", config, "--network_args", "ggpo_beta=0.01", "ggpo_sigma=0.03",
                   "--log_with", "tensorboard", "--logging_dir", str(tmp_path / "logs"), steps=3)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    losses = _losses(tmp_path / "logs")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert "GGPO: norms of 26 modules updated" in result.stderr


def test_an_sd3_lora_given_to_flux_is_one_line(tiny_models, tmp_path):
    config = tiny_dataset(tmp_path)
    file = tmp_path / "sd3_lora.safetensors"
    name = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    save_file({f"{name}.lora_down.weight": torch.zeros(RANK, 128), f"{name}.lora_up.weight": torch.zeros(384, RANK),
               f"{name}.alpha": torch.tensor(1.0)}, str(file))  # fmt: skip
    line = _one_line_error(train(tiny_models, tmp_path / "out", config, "--network_weights", str(file), steps=1))
    assert str(file) in line and f"(e.g. {name}.alpha)" in line and "none of its 1 modules" in line
