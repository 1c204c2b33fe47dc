"""Training metadata against upstream's: the key set of a typical FLUX.1 and SD3 command (derived from upstream's
source, cited below), values as upstream str()s them, the model hashes against hashlib, the dataset part, modelspec,
--no_metadata and secrets."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from library.data.dataset import DatasetOptions, build_dataset_groups
from library.training.args import parse_args_with_config
from library.training.families.flux import FLUX
from library.training.families.sd3 import SD3
from library.training.family import LoadOptions
from library.training.metadata import (
    file_sha256,
    legacy_model_hash,
    model_file_keys,
    network_metadata,
    saved_metadata,
)
from library.training.network_training import build_network_parser
from tests.helpers import REPO, write_images, write_toml

# kohya-ss/sd-scripts train_network.py, NetworkTrainer.train(): the `metadata = {...}` literal (~line 1003)
UPSTREAM_TRAIN_NETWORK_KEYS = {
    "ss_session_id", "ss_training_started_at", "ss_output_name", "ss_learning_rate", "ss_text_encoder_lr",
    "ss_unet_lr", "ss_num_train_images", "ss_num_validation_images", "ss_num_reg_images", "ss_num_batches_per_epoch",
    "ss_num_epochs", "ss_gradient_checkpointing", "ss_gradient_accumulation_steps", "ss_max_train_steps",
    "ss_lr_warmup_steps", "ss_lr_scheduler", "ss_network_module", "ss_network_dim", "ss_network_alpha",
    "ss_network_dropout", "ss_mixed_precision", "ss_full_fp16", "ss_v2", "ss_base_model_version", "ss_clip_skip",
    "ss_max_token_length", "ss_cache_latents", "ss_seed", "ss_lowram", "ss_noise_offset",
    "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_adaptive_noise_scale", "ss_zero_terminal_snr",
    "ss_training_comment", "ss_sd_scripts_commit_hash", "ss_optimizer", "ss_max_grad_norm", "ss_caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate", "ss_face_crop_aug_range",
    "ss_prior_loss_weight", "ss_min_snr_gamma", "ss_scale_weight_norms", "ss_ip_noise_gamma", "ss_debiased_estimation",
    "ss_noise_offset_random_strength", "ss_ip_noise_gamma_random_strength", "ss_loss_type", "ss_huber_schedule",
    "ss_huber_scale", "ss_huber_c", "ss_fp8_base", "ss_fp8_base_unet", "ss_validation_seed", "ss_validation_split",
    "ss_max_validation_steps", "ss_validate_every_n_epochs", "ss_validate_every_n_steps", "ss_resize_interpolation",
}  # fmt: skip
# flux_train_network.py FluxNetworkTrainer.update_metadata
UPSTREAM_FLUX_KEYS = {
    "ss_model_type", "ss_apply_t5_attn_mask", "ss_weighting_scheme", "ss_logit_mean", "ss_logit_std", "ss_mode_scale",
    "ss_guidance_scale", "ss_timestep_sampling", "ss_sigmoid_scale", "ss_model_prediction_type",
    "ss_discrete_flow_shift",
}  # fmt: skip
# sd3_train_network.py Sd3NetworkTrainer.update_metadata
UPSTREAM_SD3_KEYS = {"ss_apply_lg_attn_mask", "ss_apply_t5_attn_mask", "ss_weighting_scheme", "ss_logit_mean",
                     "ss_logit_std", "ss_mode_scale"}  # fmt: skip
# our SD3 additions (documented in docs/metadata.md): upstream records none of these SD3 options
SD3_ADDITIONS = {"ss_training_shift", "ss_clip_l_dropout_rate", "ss_clip_g_dropout_rate", "ss_t5_dropout_rate",
                 "ss_enable_scaled_pos_embed", "ss_pos_emb_random_crop_rate"}  # fmt: skip
# train_network.py `if use_user_config:` / `else:` branches, then the network args and the model file
UPSTREAM_CONFIG_DATASET_KEYS = {"ss_datasets", "ss_tag_frequency", "ss_dataset_dirs"}
UPSTREAM_FOLDER_DATASET_KEYS = {
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso",
    "ss_max_bucket_reso", "ss_keep_tokens", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency",
    "ss_bucket_info",
}  # fmt: skip
UPSTREAM_MODEL_FILE_KEYS = {"ss_sd_model_hash", "ss_new_sd_model_hash", "ss_sd_model_name"}
# library/sai_model_spec.py build_metadata for a LoRA (implementation_version is always set; prediction_type for
# every architecture but FLUX)
UPSTREAM_MODELSPEC_KEYS = {
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.resolution", "modelspec.date", "modelspec.implementation_version",
}  # fmt: skip


def _flux_command(models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """upstream's README FLUX.1 LoRA command (the dataset comes with ``extra``)."""
    return [
        "--pretrained_model_name_or_path", str(models["flux_dev"]), "--clip_l", str(models["clip_l"]),
        "--t5xxl", str(models["t5xxl"]), "--ae", str(models["ae"]), "--cache_latents_to_disk",
        "--save_model_as", "safetensors", "--sdpa", "--persistent_data_loader_workers",
        "--max_data_loader_n_workers", "2", "--seed", "42", "--gradient_checkpointing", "--mixed_precision", "bf16",
        "--save_precision", "bf16", "--network_module", "networks.lora_flux", "--network_dim", "4",
        "--network_train_unet_only", "--optimizer_type", "adamw8bit", "--learning_rate", "1e-4",
        "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk", "--fp8_base", "--highvram",
        "--max_train_epochs", "4", "--save_every_n_epochs", "1", "--output_dir", str(out),
        "--output_name", "flux-lora-name", "--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582",
        "--model_prediction_type", "raw", "--guidance_scale", "1.0", "--t5xxl_max_token_length", "16", *extra,
    ]  # fmt: skip


@pytest.fixture
def dataset_config(tmp_path: Path) -> Path:
    write_images(tmp_path / "img", [(64, 64)] * 3, ["a cat, red", "a cat", "blue"])
    return write_toml(tmp_path / "data.toml", f"[[datasets]]\nresolution = 64\nbatch_size = 2\n"
                      f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'img'}'\nnum_repeats = 2\n"
                      "caption_extension = '.txt'\n")  # fmt: skip


def _metadata(spec, argv: list[str], network=None) -> dict[str, str]:
    args = parse_args_with_config(build_network_parser(spec, ""), argv)
    group, held_out = build_dataset_groups(DatasetOptions.from_args(args))
    family = spec.load(args, LoadOptions(dtype=torch.float32, device=torch.device("cpu")))
    return network_metadata(args, spec, family, group, "AdamW8bit", (8, 4), 1718000000.25, network, held_out)


def test_flux_readme_command_writes_upstreams_keys_and_values(tiny_models, dataset_config, tmp_path):
    meta = _metadata(FLUX, _flux_command(tiny_models, tmp_path, "--dataset_config", str(dataset_config)))
    expected = (UPSTREAM_TRAIN_NETWORK_KEYS | UPSTREAM_FLUX_KEYS | UPSTREAM_CONFIG_DATASET_KEYS
                | UPSTREAM_MODEL_FILE_KEYS | UPSTREAM_MODELSPEC_KEYS)  # fmt: skip
    assert set(meta) == expected
    assert all(isinstance(v, str) for v in meta.values())
    # unset options read "None" and flags "True"/"False", as upstream's str(v); floats as Python prints them
    for key in ("ss_text_encoder_lr", "ss_unet_lr", "ss_network_dropout", "ss_clip_skip", "ss_max_token_length",
                "ss_noise_offset", "ss_min_snr_gamma", "ss_training_comment", "ss_face_crop_aug_range",
                "ss_multires_noise_iterations", "ss_adaptive_noise_scale", "ss_validation_seed",
                "ss_resize_interpolation", "ss_scale_weight_norms", "ss_max_validation_steps"):  # fmt: skip
        assert meta[key] == "None", key
    for key in ("ss_v2", "ss_full_fp16", "ss_lowram", "ss_zero_terminal_snr", "ss_debiased_estimation",
                "ss_fp8_base_unet", "ss_noise_offset_random_strength", "ss_apply_t5_attn_mask"):  # fmt: skip
        assert meta[key] == "False", key
    for key in ("ss_gradient_checkpointing", "ss_cache_latents", "ss_fp8_base"):
        assert meta[key] == "True", key
    assert meta["ss_learning_rate"] == "0.0001" and meta["ss_discrete_flow_shift"] == "3.1582"
    assert meta["ss_guidance_scale"] == "1.0" and meta["ss_multires_noise_discount"] == "0.3"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "1.0" and meta["ss_seed"] == "42"
    assert meta["ss_validation_split"] == "0.0" and meta["ss_caption_dropout_rate"] == "0.0"
    assert meta["ss_caption_dropout_every_n_epochs"] == "0" and meta["ss_num_validation_images"] == "0"
    assert meta["ss_training_started_at"] == "1718000000.25" and meta["ss_base_model_version"] == "flux1"
    assert meta["ss_model_type"] == "flux" and meta["ss_timestep_sampling"] == "shift"
    assert meta["ss_optimizer"] == "AdamW8bit" and meta["ss_num_epochs"] == "4" and meta["ss_max_train_steps"] == "8"
    assert meta["ss_num_train_images"] == "6" and meta["ss_num_reg_images"] == "0"
    assert meta["ss_num_batches_per_epoch"] == "3" and meta["ss_output_name"] == "flux-lora-name"
    assert json.loads(meta["ss_tag_frequency"]) == {"img": {"a cat": 2, "red": 1, "blue": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"img": {"n_repeats": 2, "img_count": 3}}
    assert json.loads(meta["ss_datasets"])[0]["resize_interpolation"] is None
    model = tiny_models["flux_dev"]
    assert meta["ss_sd_model_name"] == model.name
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert meta["ss_sd_model_hash"] == hashlib.sha256(model.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    commit = git.stdout.strip() if git.returncode == 0 else None  # this suite's commit, not sd-scripts'
    assert meta["ss_sd_scripts_commit_hash"] == (commit or "(unknown)")
    assert meta["modelspec.implementation_version"] == f"flux-sd3-trainer/{commit or 'unknown'}"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["modelspec.title"] == "flux-lora-name" and meta["modelspec.resolution"] == "1024x1024"
    assert meta["modelspec.date"] == datetime.datetime.fromtimestamp(1718000000).isoformat()


def test_options_reach_their_keys_as_upstream_writes_them(tiny_models, dataset_config, tmp_path):
    thumbnail = tmp_path / "thumb.png"
    thumbnail.write_bytes(b"\x89PNG fake")
    meta = _metadata(FLUX, _flux_command(
        tiny_models, tmp_path, "--dataset_config", str(dataset_config), "--network_args", "train_blocks=single",
        "--text_encoder_lr", "1e-5", "2e-5", "--face_crop_aug_range", "2.0,4.0", "--resolution", "512,768",
        "--min_timestep", "100", "--metadata_author", "me", "--metadata_thumbnail", str(thumbnail),
        "--network_alpha", "16", "--wandb_api_key", "SECRET-KEY", "--validation_split", "0.4",
        "--training_comment", "hello",
    ))  # fmt: skip
    # upstream adds --network_dropout to net_kwargs before dumping them
    assert meta["ss_network_args"] == '{"train_blocks": "single", "dropout": null}'
    assert meta["ss_text_encoder_lr"] == "[1e-05, 2e-05]" and meta["ss_face_crop_aug_range"] == "(2.0, 4.0)"
    assert meta["ss_network_alpha"] == "16.0" and meta["ss_training_comment"] == "hello"
    assert meta["ss_num_validation_images"] == "1" and meta["ss_num_train_images"] == "4"  # round(3 x 0.4) held out
    assert meta["modelspec.resolution"] == "512x768" and meta["modelspec.timestep_range"] == "100,1000"
    assert meta["modelspec.author"] == "me"
    assert meta["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    assert not any("SECRET-KEY" in v for v in meta.values())
    assert not any("wandb" in k or "huggingface" in k or k.endswith(("api_key", "_token")) for k in meta)


def test_no_metadata_writes_nothing(tiny_models, dataset_config, tmp_path):
    argv = _flux_command(tiny_models, tmp_path, "--dataset_config", str(dataset_config), "--no_metadata")
    assert _metadata(FLUX, argv) == {}


def test_folder_style_dataset_keys_with_regularization(tiny_models, tmp_path):
    write_images(tmp_path / "train" / "3_sks dog", [(64, 64)] * 2, ["sks dog, running", None])
    write_images(tmp_path / "reg" / "1_dog", [(64, 64)] * 9, [None] * 9)
    meta = _metadata(FLUX, _flux_command(
        tiny_models, tmp_path, "--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
        "--resolution", "64", "--train_batch_size", "2", "--gradient_accumulation_steps", "3",
        "--caption_extension", ".txt", "--caption_dropout_rate", "0.1",
    ))  # fmt: skip
    expected = (UPSTREAM_TRAIN_NETWORK_KEYS | UPSTREAM_FLUX_KEYS | UPSTREAM_FOLDER_DATASET_KEYS
                | UPSTREAM_MODEL_FILE_KEYS | UPSTREAM_MODELSPEC_KEYS)  # fmt: skip
    assert set(meta) == expected
    assert meta["ss_total_batch_size"] == "6" and meta["ss_batch_size_per_device"] == "2"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_caption_dropout_rate"] == "0.1"
    # upstream counts every regularization image found (9 x 1), though balancing uses only 6
    assert meta["ss_num_train_images"] == "6" and meta["ss_num_reg_images"] == "9"
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 9}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_sks dog": {"n_repeats": 3, "img_count": 2}}
    assert json.loads(meta["ss_tag_frequency"])["3_sks dog"] == {"sks dog": 2, "running": 1}


def test_a_folder_in_two_subsets_is_listed_twice(tmp_path):
    write_images(tmp_path / "img", [(64, 64)] * 2)
    subset = f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'img'}'\ncaption_extension = '.txt'\n"
    config = write_toml(tmp_path / "d.toml", "[[datasets]]\nresolution = 64\nresize_interpolation = 'lanczos'\n"
                        + subset + subset.replace("'.txt'", "'.txt'\nnum_repeats = 5"))  # fmt: skip
    group, _ = build_dataset_groups(DatasetOptions(dataset_config=config))
    meta = group.metadata()
    dirs = {"img": {"n_repeats": 1, "img_count": 2}, "img (2)": {"n_repeats": 5, "img_count": 2}}
    assert json.loads(meta["ss_dataset_dirs"]) == dirs
    assert json.loads(meta["ss_datasets"])[0]["resize_interpolation"] == "lanczos"


def test_sd3_command_writes_upstreams_keys_and_our_documented_additions(tiny_sd3_models, dataset_config, tmp_path):
    models = tiny_sd3_models
    argv = [
        "--pretrained_model_name_or_path", str(models["sd3_medium"]), "--clip_l", str(models["clip_l"]),
        "--clip_g", str(models["clip_g"]), "--t5xxl", str(models["t5xxl"]), "--vae", str(models["vae"]),
        "--dataset_config", str(dataset_config), "--output_dir", str(tmp_path), "--output_name", "sd3-lora",
        "--network_module", "networks.lora_sd3", "--network_dim", "4", "--learning_rate", "1e-4",
        "--weighting_scheme", "logit_normal", "--training_shift", "3.0", "--apply_lg_attn_mask",
    ]  # fmt: skip
    meta = _metadata(SD3, argv)
    upstream = (UPSTREAM_TRAIN_NETWORK_KEYS | UPSTREAM_SD3_KEYS | UPSTREAM_CONFIG_DATASET_KEYS
                | UPSTREAM_MODEL_FILE_KEYS | {"ss_vae_hash", "ss_new_vae_hash", "ss_vae_name"}
                | UPSTREAM_MODELSPEC_KEYS | {"modelspec.prediction_type"})  # fmt: skip
    assert set(meta) == upstream | SD3_ADDITIONS
    assert meta["ss_base_model_version"] == "medium" and meta["ss_apply_lg_attn_mask"] == "True"
    assert meta["ss_vae_name"] == models["vae"].name
    assert meta["ss_new_vae_hash"] == hashlib.sha256(models["vae"].read_bytes()).hexdigest()
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    assert meta["modelspec.prediction_type"] == "epsilon"  # upstream's value for every non-FLUX LoRA
    assert meta["modelspec.implementation"] == "diffusers" and meta["ss_training_shift"] == "3.0"


def test_model_hashes_match_hashlib(tmp_path):
    data = torch.randint(0, 256, (0x100000 + 0x18000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    big = tmp_path / "model.safetensors"
    big.write_bytes(data.numpy().tobytes())
    raw = big.read_bytes()
    assert file_sha256(big) == hashlib.sha256(raw).hexdigest()
    assert legacy_model_hash(big) == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    small = tmp_path / "small.bin"
    small.write_bytes(b"tiny")
    assert legacy_model_hash(small) == hashlib.sha256(b"").hexdigest()[:8]  # nothing at 1 MiB, as upstream
    hashes = {"ss_vae_hash": legacy_model_hash(big), "ss_new_vae_hash": file_sha256(big), "ss_vae_name": big.name}
    assert model_file_keys(str(big), "vae") == hashes
    assert model_file_keys("org/some-model", "sd_model") == {"ss_sd_model_name": "org/some-model"}
    assert model_file_keys(str(tmp_path), "sd_model")["ss_new_sd_model_hash"] == "IsADirectory"
    assert model_file_keys(None, "vae") == {}


def test_each_save_records_its_steps_epoch_and_date():
    base = {"ss_network_dim": "4", "modelspec.date": "2024-01-01T00:00:00"}
    saved = saved_metadata(base, steps=12, epoch=3, finished_at=1718000500.5)
    assert saved["ss_steps"] == "12" and saved["ss_epoch"] == "3" and saved["ss_training_finished_at"] == "1718000500.5"
    assert saved["modelspec.date"] == datetime.datetime.fromtimestamp(1718000500).isoformat()
    assert base["modelspec.date"] == "2024-01-01T00:00:00" and saved_metadata({}, steps=1, epoch=1, finished_at=0) == {}
