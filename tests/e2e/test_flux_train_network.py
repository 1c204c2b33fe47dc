"""flux_train_network.py through its real command line on tiny FLUX.1 checkpoints and generated or bundled images:
upstream's README command, the loss on an overfit set, resume, samples, caches and the pre-cache tools, metadata,
LoRA files diffusers reads, and one-line errors for bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import REPO, run_script, write_images, write_toml


def model_args(models: dict[str, Path], schnell: bool = False) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(models["flux_schnell" if schnell else "flux_dev"]),
        "--clip_l", str(models["clip_l"]), "--t5xxl", str(models["t5xxl"]), "--ae", str(models["ae"]),
    ]  # fmt: skip


def tiny_dataset(tmp_path: Path) -> Path:
    """The bundled example set, copied so caches are written beside the copies; returns its config."""
    images = tmp_path / "tiny_dataset"
    shutil.copytree(REPO / "examples" / "tiny_dataset", images)
    text = (REPO / "examples" / "tiny_dataset.toml").read_text(encoding="utf-8")
    return write_toml(tmp_path / "tiny_dataset.toml", text.replace('"examples/tiny_dataset"', f"'{images}'"))


def train(models, out: Path, config: Path, *extra: str, steps: int = 4, script: str = "flux_train_network.py",
          unet_only: bool = True):  # fmt: skip
    args = [
        *model_args(models), "--dataset_config", str(config), "--output_dir", str(out), "--output_name", "lora",
        "--network_module", "networks.lora_flux", "--network_dim", "4", "--learning_rate", "1e-3",
        "--max_train_steps", str(steps), "--seed", "42", "--t5xxl_max_token_length", "16",
        *(["--network_train_unet_only"] if unet_only else []), *extra,
    ]  # fmt: skip
    return run_script(script, *args)


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_upstream_readme_command_trains_and_saves(tiny_models, tmp_path):
    config = tiny_dataset(tmp_path)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "bf16",
        "--num_cpu_threads_per_process", "1", "flux_train_network.py", *model_args(tiny_models),
        "--cache_latents_to_disk", "--save_model_as", "safetensors", "--sdpa", "--persistent_data_loader_workers",
        "--max_data_loader_n_workers", "2", "--seed", "42", "--gradient_checkpointing", "--mixed_precision", "bf16",
        "--save_precision", "bf16", "--network_module", "networks.lora_flux", "--network_dim", "4",
        "--network_train_unet_only", "--optimizer_type", "adamw8bit", "--learning_rate", "1e-4",
        "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk", "--fp8_base", "--highvram",
        "--max_train_epochs", "2", "--save_every_n_epochs", "1", "--dataset_config", str(config),
        "--output_dir", str(out), "--output_name", "flux-lora-name", "--timestep_sampling", "shift",
        "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw", "--guidance_scale", "1.0",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = sorted(p.name for p in out.glob("*.safetensors"))
    assert saved == ["flux-lora-name-000001.safetensors", "flux-lora-name.safetensors"]
    final = out / "flux-lora-name.safetensors"
    tensors = load_file(final)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    meta = metadata_of(final)
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_network_dim"] == "4"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    assert meta["ss_num_train_images"] == "8" and meta["ss_epoch"] == "2"
    assert meta["ss_steps"] == str(2 * int(meta["ss_num_batches_per_epoch"]))
    assert json.loads(meta["ss_datasets"])[0]["subsets"][0]["num_repeats"] == 2
    images = tmp_path / "tiny_dataset"
    assert (images / "red_circle_0064x0064_flux.npz").exists() and (images / "red_circle_flux_te.npz").exists()
    assert "trainable parameters" in result.stderr and "bucket" in result.stderr  # the start-up summary
    assert "steps" in result.stderr  # the progress bar


def _losses(logging_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(logging_dir.rglob("events.out.tfevents.*"))
    assert files, f"no tensorboard events under {logging_dir}"
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    return [e.value for e in acc.Scalars("loss/current")]


def test_overfitting_a_few_images_the_loss_falls_and_is_logged(tiny_models, tmp_path):
    write_images(tmp_path / "img", [(64, 64)] * 2, ["a red thing", "a blue thing"])
    config = write_toml(
        tmp_path / "d.toml",
        f"""
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
  caption_extension = ".txt"
""",
    )
    steps = 60
    result = train(tiny_models, tmp_path / "out", config, "--learning_rate", "3e-3", "--network_dim", "8",
                   "--cache_latents", "--cache_text_encoder_outputs", "--log_with", "tensorboard",
                   "--logging_dir", str(tmp_path / "logs"), steps=steps)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    losses = _losses(tmp_path / "logs")
    assert len(losses) == steps
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.6 * first, (first, last)


def test_readme_multi_resolution_config_trains_every_resolution(tiny_models, tmp_path):
    """upstream README's three-resolution config (sizes scaled down): one epoch trains every batch of every dataset,
    and a batch never mixes sizes (the transformer would fail on a ragged batch)."""
    from tests.unit.data.test_config import README_EXAMPLE

    write_images(tmp_path / "img", [(64, 64), (96, 64), (64, 80)])
    text = README_EXAMPLE.replace("path/to/image/dir", str(tmp_path / "img"))
    for big, small in (("1024", "64"), ("768", "48"), ("512", "32")):
        text = text.replace(f"[{big}, {big}]", f"[{small}, {small}]")
    text = text.replace("[general]", "[general]\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 16")
    config = write_toml(tmp_path / "multi.toml", text)
    result = train(tiny_models, tmp_path / "out", config, "--max_train_epochs", "1", "--cache_latents")
    assert result.returncode == 0, result.stderr[-3000:]
    meta = metadata_of(tmp_path / "out" / "lora.safetensors")
    datasets = json.loads(meta["ss_datasets"])
    assert [tuple(d["resolution"]) for d in datasets] == [(64, 64), (48, 48), (32, 32)]
    assert [d["batch_size_per_device"] for d in datasets] == [2, 3, 4]
    per_dataset = [sum(-(-b["count"] // d["batch_size_per_device"]) for b in d["bucket_info"]["buckets"].values())
                   for d in datasets]  # fmt: skip
    assert all(n > 0 for n in per_dataset)
    assert int(meta["ss_steps"]) == int(meta["ss_num_batches_per_epoch"]) == sum(per_dataset)


def test_resume_from_a_state_gives_the_uninterrupted_lora(tiny_models, tmp_path):
    config = tiny_dataset(tmp_path)
    common = ("--save_every_n_steps", "3", "--save_state", "--flip_aug")
    full = train(tiny_models, tmp_path / "full", config, *common, steps=6)
    assert full.returncode == 0, full.stderr[-3000:]
    state = tmp_path / "full" / "lora-step00000003-state"
    assert state.is_dir()
    resumed = train(tiny_models, tmp_path / "resumed", config, *common, "--resume", str(state), steps=6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = load_file(tmp_path / "full" / "lora.safetensors"), load_file(tmp_path / "resumed" / "lora.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_text_encoder_lora_samples_and_diffusers_reads_the_file(tiny_models, tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    config = tiny_dataset(tmp_path)
    out = tmp_path / "out"
    result = run_script(
        "flux_train_network.py", *model_args(tiny_models), "--dataset_config", str(config), "--output_dir", str(out),
        "--output_name", "te", "--network_module", "networks.lora_flux", "--network_dim", "4", "--network_args",
        "train_t5xxl=True", "--max_train_steps", "3", "--seed", "1", "--t5xxl_max_token_length", "16",
        "--sample_prompts", str(REPO / "examples" / "tiny_prompts.txt"), "--sample_every_n_steps", "2",
        "--sample_at_first", "--text_encoder_lr", "1e-4", "5e-5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tensors = load_file(out / "te.safetensors")
    prefixes = {k.split("_")[1] for k in tensors}
    assert prefixes == {"unet", "te1", "te3"}
    for prefix in ("lora_te1_", "lora_te3_", "lora_unet_"):  # every part learned (up weights start at zero)
        assert any(v.abs().max() > 0 for k, v in tensors.items() if k.startswith(prefix) and "lora_up" in k), prefix
    samples = sorted((out / "sample").glob("*.png"))
    assert len(samples) == 3  # at first, step 2, and the end (step 3)
    # diffusers splits single-block linear1 as [3072, 3072, 3072, 12288], the real width; that part is checked on a
    # 3072-wide model in tests/unit/test_lora_compat.py, every other key of the trained file here
    unet_only = {k: v for k, v in tensors.items() if k.startswith("lora_unet_") and "_linear1." not in k}
    converted = _convert_kohya_flux_lora_to_diffusers(dict(unet_only))
    assert converted and all(k.startswith("transformer.") for k in converted)


def test_precache_tools_fill_the_caches_training_reuses(tiny_models, tmp_path):
    config = tiny_dataset(tmp_path)
    images = tmp_path / "tiny_dataset"
    common = [*model_args(tiny_models), "--dataset_config", str(config), "--t5xxl_max_token_length", "16"]
    latents = run_script("tools/cache_latents.py", *common, "--vae_batch_size", "2")
    assert latents.returncode == 0, latents.stderr[-3000:]
    text = run_script("tools/cache_text_encoder_outputs.py", *common, "--apply_t5_attn_mask")
    assert text.returncode == 0, text.stderr[-3000:]
    npz = sorted(p.name for p in images.glob("*.npz"))
    assert len(npz) == 8, npz
    stamps = {p: p.stat().st_mtime_ns for p in images.glob("*.npz")}
    result = train(tiny_models, tmp_path / "out", config, "--cache_latents_to_disk", "--apply_t5_attn_mask",
                   "--cache_text_encoder_outputs_to_disk", steps=2)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in images.glob("*.npz")} == stamps  # reused, not rewritten
    changed = train(tiny_models, tmp_path / "out2", config, "--cache_latents_to_disk",
                    "--cache_text_encoder_outputs_to_disk", steps=1)  # fmt: skip
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "apply_t5_attn_mask" in changed.stderr and "making it again" in changed.stderr


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize(
    "toml, expected",
    [
        ("[[datasets]]\nresolutoin = 64\n[[datasets.subsets]]\nimage_dir = '{img}'\n", ["datasets[0]", "resolutoin"]),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{img}/missing'\n", ["datasets[0].subsets[0]", "missing"]),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{img}'\nnum_repeats = 'ten'\n", ["num_repeats"]),
    ],
    ids=["unknown-key", "missing-folder", "wrong-type"],
)
def test_bad_dataset_configs_fail_before_loading_models(tmp_path, toml, expected):
    write_images(tmp_path / "img", [(64, 64)])
    config = write_toml(tmp_path / "bad.toml", toml.format(img=tmp_path / "img"))
    missing = {role: tmp_path / "nope.safetensors" for role in ("flux_dev", "clip_l", "t5xxl", "ae")}
    line = _one_line_error(train(missing, tmp_path / "out", config, "--resolution", "64"))
    for part in [str(config.name), *expected]:
        assert part in line, line


def test_missing_sample_prompts_is_an_error_at_start(tiny_models, tmp_path):
    config = tiny_dataset(tmp_path)
    result = train(tiny_models, tmp_path / "out", config, "--sample_prompts", str(tmp_path / "nope.txt"),
                   "--sample_every_n_steps", "1")  # fmt: skip
    assert "nope.txt" in _one_line_error(result)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_debug_dataset_needs_no_models(tmp_path):
    config = tiny_dataset(tmp_path)
    missing = {role: tmp_path / "nope.safetensors" for role in ("flux_dev", "clip_l", "t5xxl", "ae")}
    result = train(missing, tmp_path / "out", config, "--debug_dataset", "--debug_dataset_dir", str(tmp_path / "dbg"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shp a red circle on a white background" in result.stdout
    assert len(list((tmp_path / "dbg").glob("*.png"))) == 8


def _tensorboard_tags(logging_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for folder in {p.parent for p in logging_dir.rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        tags.update({tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})
    return tags


def test_continue_from_a_lora_and_text_encoder_only(tiny_models, tmp_path):
    config = tiny_dataset(tmp_path)
    first = train(tiny_models, tmp_path / "first", config, "--no_metadata", steps=2)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = tmp_path / "first" / "lora.safetensors"
    assert not any(k.startswith(("ss_", "modelspec.")) for k in metadata_of(saved) or {})  # --no_metadata
    # --network_weights with --dim_from_weights: the file's ranks, not --network_dim; a tiny lr keeps it (Adam's
    # step is about lr in size)
    again = train(tiny_models, tmp_path / "again", config, "--network_weights", str(saved), "--dim_from_weights",
                  "--network_dim", "16", "--learning_rate", "1e-9", steps=1)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = load_file(saved), load_file(tmp_path / "again" / "lora.safetensors")
    assert a.keys() == b.keys() and any(v.abs().max() > 1e-4 for k, v in a.items() if "lora_up" in k)
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0, atol=1e-6, msg=key)
    zero = train(tiny_models, tmp_path / "zero", config, "--learning_rate", "0", steps=1)
    assert "nothing to train" in _one_line_error(zero)
    assert metadata_of(tmp_path / "again" / "lora.safetensors")["ss_network_dim"] == "4"
    te = train(tiny_models, tmp_path / "te", config, "--network_train_text_encoder_only", steps=1, unet_only=False)
    assert te.returncode == 0, te.stderr[-3000:]
    te_tensors = load_file(tmp_path / "te" / "lora.safetensors")
    assert {k.split("_")[1] for k in te_tensors} == {"te1"}
    assert any(v.abs().max() > 0 for k, v in te_tensors.items() if "lora_up" in k)  # the text encoder learned


def test_logging_options_and_secrets(tiny_models, tmp_path):
    config = tiny_dataset(tmp_path)
    secret = "SECRETKEY0123456789"
    result = train(tiny_models, tmp_path / "out", config, "--log_with", "tensorboard", "--logging_dir",
                   str(tmp_path / "logs"), "--log_prefix", "run1_", "--log_config", "--wandb_api_key", secret,
                   "--initial_step", "2", "--skip_until_initial_step", "--sample_prompts",
                   str(REPO / "examples" / "tiny_prompts.txt"), "--sample_every_n_steps", "0", steps=4)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tags = _tensorboard_tags(tmp_path / "logs")
    assert tags["run1_loss/current"] == [3, 4]  # --initial_step 2: steps 3 and 4 trained, with the prefix
    assert "sample_every_n_steps" in result.stderr and not (tmp_path / "out" / "sample").exists()
    for path in [*tmp_path.rglob("*")]:
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.stderr + result.stdout
    if importlib.util.find_spec("wandb") is None:
        line = _one_line_error(train(tiny_models, tmp_path / "w", config, "--log_with", "wandb", "--logging_dir",
                                     str(tmp_path / "wl"), steps=1))  # fmt: skip
        assert "pip install wandb" in line


def test_a_truncated_image_is_one_line_naming_it_even_from_loader_workers(tiny_models, tmp_path):
    config = tiny_dataset(tmp_path)
    broken = tmp_path / "tiny_dataset" / "red_circle.png"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # the header still reads: the scan passes, decoding fails
    result = train(tiny_models, tmp_path / "out", config, "--max_data_loader_n_workers", "2", steps=4)
    line = _one_line_error(result)
    assert "red_circle.png" in line and "cannot be decoded" in line, line


@pytest.mark.parametrize(("schnell", "length", "architecture"), [(False, 512, "flux-1-dev/lora"),
                                                                  (True, 256, "flux-1-schnell/lora")])  # fmt: skip
def test_t5_length_defaults_to_512_for_dev_and_256_for_schnell(tiny_models, tmp_path, schnell, length, architecture):
    config = tiny_dataset(tmp_path)
    out = tmp_path / "out"
    result = run_script(
        "flux_train_network.py", *model_args(tiny_models, schnell=schnell), "--dataset_config", str(config),
        "--output_dir", str(out), "--output_name", "lora", "--network_module", "networks.lora_flux",
        "--network_dim", "4", "--network_train_unet_only", "--max_train_steps", "1",
        "--cache_text_encoder_outputs_to_disk",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "tiny_dataset" / "red_circle_flux_te.npz") as npz:
        assert npz["t5_out"].shape[0] == length
    assert metadata_of(out / "lora.safetensors")["modelspec.architecture"] == architecture


def test_dataset_network_multiplier_scales_what_the_lora_learns(tiny_models, tmp_path):
    """network_multiplier = 0 for the only dataset: the LoRA gets no gradient, so it stays at its zero start."""
    config = tiny_dataset(tmp_path)
    config.write_text(config.read_text(encoding="utf-8").replace("batch_size = 2", "batch_size = 2\nnetwork_multiplier = 0.0"),
                      encoding="utf-8")  # fmt: skip
    result = train(tiny_models, tmp_path / "out", config, steps=2)
    assert result.returncode == 0, result.stderr[-3000:]
    ups = [v for k, v in load_file(tmp_path / "out" / "lora.safetensors").items() if "lora_up" in k]
    assert ups and all(v.abs().max() == 0 for v in ups)


def test_scale_weight_norms_caps_every_module_and_is_logged(tiny_models, tmp_path):
    config = tiny_dataset(tmp_path)
    cap = 1e-3
    result = train(tiny_models, tmp_path / "out", config, "--scale_weight_norms", str(cap), "--learning_rate", "1e-2",
                   "--log_with", "tensorboard", "--logging_dir", str(tmp_path / "logs"), steps=3)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tensors = load_file(tmp_path / "out" / "lora.safetensors")
    names = {k.rsplit(".", 2)[0] for k in tensors if k.endswith("lora_down.weight")}
    norms = []
    for name in names:
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        norms.append(float((up @ down).norm() * tensors[f"{name}.alpha"].float() / down.shape[0]))
    assert max(norms) <= cap * 1.01 and max(norms) > cap * 0.5  # capped, and the cap was reached
    assert _tensorboard_tags(tmp_path / "logs")["max_norm/keys_scaled"] == [1, 2, 3]
    assert metadata_of(tmp_path / "out" / "lora.safetensors")["ss_scale_weight_norms"] == str(cap)
