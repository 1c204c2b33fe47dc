"""flux_train_control_net.py through its real command line on tiny models: trains on image / control-image pairs,
saves the ControlNet alone in the XLabs layout, resumes exactly, samples with --cn; a LoRA trains alongside the
frozen ControlNet; inference uses the trained file; missing or extra control images stop the run before anything
is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tests.e2e.test_flux_train_network import model_args
from tests.helpers import REPO, run_script


def pairs(folder: Path, count: int = 4) -> tuple[Path, Path]:
    """Images with captions and their control images (the negative), paired by file name."""
    images, controls = folder / "img", folder / "cond"
    images.mkdir(parents=True)
    controls.mkdir(parents=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"i{i}.png")
        Image.fromarray(255 - pixels).save(controls / f"i{i}.png")
        (images / f"i{i}.txt").write_text(f"shp thing {i}", encoding="utf-8")
    return images, controls


def train_controlnet(models, images: Path, controls: Path, out: Path, *extra: str, steps: int = 2):
    return run_script(
        "flux_train_control_net.py", *model_args(models), "--train_data_dir", str(images), "--conditioning_data_dir",
        str(controls), "--resolution", "64", "--caption_extension", ".txt", "--output_dir", str(out), "--output_name",
        "cn", "--max_train_steps", str(steps), "--seed", "3", "--t5xxl_max_token_length", "16", "--learning_rate",
        "1e-3", *extra,
    )  # fmt: skip


def test_trains_saves_xlabs_layout_resumes_and_samples(tiny_models, tmp_path):
    images, controls = pairs(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"shp thing --w 64 --h 64 --s 2 --cn {controls / 'i0.png'}\n", encoding="utf-8")
    out = tmp_path / "out"
    result = train_controlnet(tiny_models, images, controls, out, "--save_every_n_steps", "1", "--save_state",
                              "--sample_prompts", str(prompts), "--sample_every_n_steps", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "a ControlNet (" in result.stderr and "ControlNet: 2 double blocks, new" in result.stderr
    saved = load_file(out / "cn.safetensors")
    base_blocks = {k[len("double_blocks.0."):] for k in load_file(tiny_models["flux_dev"]) if k.startswith("double_blocks.0.")}
    expected = {f"double_blocks.{i}.{k}" for i in range(2) for k in base_blocks}
    expected |= {k for k in load_file(tiny_models["flux_dev"]) if k.split(".")[0] in
                 ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")}  # fmt: skip
    expected |= {f"controlnet_blocks.{i}.{p}" for i in range(2) for p in ("weight", "bias")}
    expected |= {f"pos_embed_input.{p}" for p in ("weight", "bias")}
    expected |= {f"input_hint_block.{i}.{p}" for i in range(0, 16, 2) for p in ("weight", "bias")}
    assert set(saved) == expected
    assert any(v.abs().max() > 0 for k, v in saved.items() if k.startswith("controlnet_blocks."))  # zero init moved
    with safe_open(str(out / "cn.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-dev/controlnet"
    assert len(list((out / "sample").glob("*.png"))) == 1
    resumed = train_controlnet(tiny_models, images, controls, tmp_path / "resumed", "--resume",
                               str(out / "cn-step00000001-state"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_file(tmp_path / "resumed" / "cn.safetensors")
    for key in saved:
        torch.testing.assert_close(again[key], saved[key], rtol=0, atol=0, msg=key)
    # the trained ControlNet in inference changes the image; at scale 0 it changes nothing
    common = ["--ckpt", str(tiny_models["flux_dev"]), "--clip_l", str(tiny_models["clip_l"]), "--t5xxl",
              str(tiny_models["t5xxl"]), "--ae", str(tiny_models["ae"]), "--dtype", "fp32", "--width", "64",
              "--height", "64", "--steps", "2", "--seed", "1", "--prompt", "shp thing", "--t5xxl_max_token_length",
              "16"]  # fmt: skip
    pictures = {}
    for name, extra in (("plain", []), ("cn", ["--controlnet_scale", "1.0"]), ("zero", ["--controlnet_scale", "0"])):
        control = ["--controlnet", str(out / "cn.safetensors"), "--controlnet_image", str(controls / "i0.png")]
        ran = run_script("flux_minimal_inference.py", *common, *(control + extra if extra else []), "--output_dir",
                         str(tmp_path / name))  # fmt: skip
        assert ran.returncode == 0, ran.stderr[-3000:]
        pictures[name] = np.asarray(Image.open(next((tmp_path / name).glob("*.png"))))
    assert np.array_equal(pictures["zero"], pictures["plain"]) and not np.array_equal(pictures["cn"], pictures["plain"])
    swapped = run_script("flux_minimal_inference.py", *common[:1], str(out / "cn.safetensors"), *common[2:],
                         "--output_dir", str(tmp_path / "wrong"))  # fmt: skip
    assert swapped.returncode == 2 and "found FLUX.1 dev ControlNet (XLabs layout)" in swapped.stderr


def test_a_lora_trains_alongside_the_frozen_controlnet(tiny_models, tmp_path):
    images, controls = pairs(tmp_path)
    first = train_controlnet(tiny_models, images, controls, tmp_path / "cn", steps=2)
    assert first.returncode == 0, first.stderr[-3000:]
    config = tmp_path / "data.toml"
    config.write_text(f"""
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{images}'
  conditioning_data_dir = '{controls}'
  caption_extension = ".txt"
""", encoding="utf-8")  # fmt: skip
    loras = {}
    for name, extra in (("with", ["--controlnet_model_name_or_path", str(tmp_path / "cn" / "cn.safetensors")]),
                        ("without", ["--masked_loss"])):  # fmt: skip
        result = run_script("flux_train_network.py", *model_args(tiny_models), "--dataset_config", str(config),
                            "--output_dir", str(tmp_path / name), "--output_name", "lora", "--network_module",
                            "networks.lora_flux", "--network_train_unet_only", "--max_train_steps", "2", "--seed", "3",
                            "--t5xxl_max_token_length", "16", "--learning_rate", "1e-3", *extra)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        loras[name] = load_file(tmp_path / name / "lora.safetensors")
        assert ("ControlNet: 2 double blocks, from" in result.stderr) == (name == "with")
    assert any(not torch.equal(loras["with"][k], loras["without"][k]) for k in loras["with"])


@pytest.mark.parametrize("problem", ["missing", "extra"])
def test_missing_or_extra_control_images_stop_before_anything_is_written(tiny_models, tmp_path, problem):
    images, controls = pairs(tmp_path)
    if problem == "missing":
        (controls / "i2.png").unlink()
    else:
        Image.new("RGB", (64, 64)).save(controls / "stray.png")
    out = tmp_path / "out"
    result = train_controlnet(tiny_models, images, controls, out, "--cache_latents_to_disk")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert ("i2.png" if problem == "missing" else "stray.png") in line, line
    assert not list(images.glob("*.npz")) and not (out.exists() and any(out.iterdir()))


def test_every_upstream_option_parses_or_is_rejected():
    from library.errors import UserError
    from library.training import args as training_args
    from library.training.controlnet_training import build_controlnet_parser
    from library.training.families.flux import FLUX

    parser = build_controlnet_parser(FLUX, "test")
    inventory = REPO / "docs" / "reference" / "upstream_flux_train_control_net_options.txt"
    upstream = {line.split()[0][2:] for line in inventory.read_text().splitlines() if line.startswith("--")}
    ours = {a.dest for a in parser._actions} | {s[2:] for a in parser._actions for s in a.option_strings}
    assert not sorted(upstream - ours)
    for name in sorted(upstream & set(training_args.rejected_options(parser))):
        with pytest.raises(UserError, match=f"--{name} "):
            parser.parse_args([f"--{name}"])
