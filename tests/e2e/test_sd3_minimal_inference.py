"""sd3_minimal_inference.py through its real command line, on tiny SD3 checkpoints in the real layouts.

Each process start costs seconds, so cases share runs: one plain run gives the reference image, ``--interactive``
runs make several images per process, and the one-line errors run ``main`` in this process through ``run_cli``."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO, run_script

PROMPT = "a cat holding a sign"
SCRIPT = "sd3_minimal_inference.py"


def _args(ckpt, out, *extra) -> list[str]:
    return [
        "--ckpt_path", str(ckpt), "--width", "64", "--height", "64", "--steps", "4", "--seed", "7",
        "--prompt", PROMPT, "--output_dir", str(out), *extra,
    ]  # fmt: skip


def _separate(models) -> list[str]:
    return ["--clip_l", str(models["clip_l"]), "--clip_g", str(models["clip_g"]), "--t5xxl", str(models["t5xxl"])]


def _run_interactive(stdin: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(REPO / SCRIPT), *args, "--interactive"], input=stdin, capture_output=True, text=True,
        cwd=REPO, env=env, timeout=600,
    )  # fmt: skip


def _run_in_process(argv: list[str]) -> list:
    """The script's parse and run in this process (for cases the subprocess runs already cover)."""
    import sd3_minimal_inference

    return sd3_minimal_inference.run_sd3_inference(sd3_minimal_inference.parse_args(argv))


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.float32)


def _saved(result) -> list[str]:
    """The PNGs a run wrote, in the order it wrote them (from its log)."""
    return [line.rsplit("saved ", 1)[1] for line in result.stderr.splitlines() if " saved " in line]


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def reference(tiny_sd3_models, tmp_path_factory):
    """The plain run's image from the checkpoint with every encoder embedded: 64x64, 4 steps, seed 7, cfg 5."""
    out = tmp_path_factory.mktemp("reference")
    result = run_script(SCRIPT, *_args(tiny_sd3_models["sd3_medium_incl_t5"], out))
    assert result.returncode == 0, result.stderr
    assert "sampling" in result.stderr  # the progress bar
    files = list(out.iterdir())
    assert len(files) == 1 and re.fullmatch(r"\d{8}_\d{6}\.png", files[0].name), files  # upstream's name, no temp
    return files[0]


def test_embedded_encoders_image_and_metadata(reference):
    image = Image.open(reference)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.info["prompt"] == PROMPT and image.info["seed"] == "7"
    assert np.ptp(_pixels(reference)) > 0


def test_same_image_as_training_samples(tiny_sd3_models, reference):
    from library.training.families.sd3 import SD3
    from library.training.family import LoadOptions
    from library.training.network_training import build_network_parser
    from library.training.sample_prompts import SamplePrompt

    args = build_network_parser(SD3, "").parse_args(
        ["--pretrained_model_name_or_path", str(tiny_sd3_models["sd3_medium_incl_t5"])]
    )
    family = SD3.load(args, LoadOptions(dtype=torch.float32, device=torch.device("cpu")))
    prompt = SamplePrompt(0, PROMPT, width=64, height=64, sample_steps=4, scale=5.0)
    sample = np.asarray(family.sample_image(prompt, seed=7, dtype=torch.float32)).astype(np.float32)
    np.testing.assert_array_equal(sample, _pixels(reference))


def test_separate_encoders_seeds_and_inline_options(tiny_sd3_models, tmp_path, reference):
    lines = [
        f"{PROMPT} --d 7",
        f"{PROMPT} --g 3.5",  # FLUX's distilled guidance: one error line, nothing generated
        f"{PROMPT} --d 7",
        f"{PROMPT} --d 8",
        f"{PROMPT} --w 96 --h 48 --s 2",  # size and steps carry over; the seed is the command line's again
        "",  # ends the loop
        "never read",
    ]
    args = _args(tiny_sd3_models["sd3_medium"], tmp_path, *_separate(tiny_sd3_models))
    result = _run_interactive("\n".join(lines) + "\n", *args)
    assert result.returncode == 0, result.stderr
    assert _error_lines(result.stderr) == ["error: --g: SD3 has no distilled guidance; --c sets the CFG scale"]
    assert result.stderr.count("SD3 Medium loaded") == 1
    first, again, other, inline = _saved(result)
    assert sorted(str(p) for p in tmp_path.glob("*.png")) == sorted([first, again, other, inline])
    np.testing.assert_array_equal(_pixels(first), _pixels(again))
    assert np.abs(_pixels(first) - _pixels(other)).mean() > 1.0
    assert np.abs(_pixels(first) - _pixels(reference)).mean() > 1.0  # the separate files' encoders were used
    image = Image.open(inline)
    assert image.size == (96, 48) and image.info["seed"] == "7" and image.info["steps"] == "2"


def _make_lora(path, ckpt, **files) -> None:
    """A LoRA over the MMDiT of ``ckpt``, CLIP-L, CLIP-G and T5 (``ckpt``'s or ``files``, by resolve_sd3_files) with
    random (non-zero) up weights, saved as training saves it."""
    from library.models.sd3.components import SD3TextSettings, load_sd3_text_encoder, resolve_sd3_files
    from library.models.sd3.loading import load_sd3_mmdit
    from networks import lora_sd3

    files = resolve_sd3_files(ckpt, **files)
    mmdit = load_sd3_mmdit(files.checkpoint.path, dtype=torch.float32)
    text = load_sd3_text_encoder(files, SD3TextSettings(), dtype=torch.float32, device="cpu")
    encoders = [text.clip_l, text.clip_g, text.t5]
    network = lora_sd3.create_network(1.0, 4, 2.0, None, encoders, mmdit, train_t5xxl="True")
    network.apply_to(encoders, mmdit)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    network.save_weights(path, torch.float32, {"ss_network_module": "networks.lora_sd3"})
    assert {k[:8] for k in network.state_dict()} == {"lora_une", "lora_te1", "lora_te2", "lora_te3"}


def test_lora_applied_scaled_and_merged(tiny_sd3_models, tmp_path, reference):
    lora = tmp_path / "lora.safetensors"
    ckpt = tiny_sd3_models["sd3_medium_incl_t5"]
    _make_lora(lora, ckpt)
    stdin = f"{PROMPT}\n{PROMPT} --m 0.5,1\n{PROMPT} --m 0\n\n"
    result = _run_interactive(stdin, *_args(ckpt, tmp_path / "applied", "--lora_weights", f"{lora};0.5", "--offload"))
    assert result.returncode == 0, result.stderr
    assert _error_lines(result.stderr) == ["error: --m: 2 multipliers for 1 LoRA(s) in --lora_weights"]
    applied, zero = (_pixels(p) for p in _saved(result))
    base = _pixels(reference)
    assert np.abs(applied - base).mean() > 2.0  # the LoRA changes the image
    np.testing.assert_array_equal(zero, base)  # multiplier 0 does not

    (merged,) = _run_in_process(
        _args(ckpt, tmp_path / "merged", "--lora_weights", f"{lora};0.5", "--merge_lora_weights")
    )
    assert np.abs(_pixels(merged) - applied).max() <= 2.0  # the same image, rounding aside


@pytest.fixture(scope="module")
def deep_sd3(tiny_sd3_models, tmp_path_factory):
    """A 4-block SD3.5 Medium MMDiT alone (block 0 has attn2, so a swap trades blocks of different shapes), the
    options that complete it from the tiny set, and a LoRA for it."""
    from safetensors.torch import save_file

    from library.models.checkpoint_kind import DIFFUSION_MODEL_PREFIX
    from library.models.sd3.tiny import make_sd3_state_dict, tiny_sd3_params

    folder = tmp_path_factory.mktemp("deep_sd3")
    ckpt, lora = folder / "sd3.5_medium-deep.safetensors", folder / "lora.safetensors"
    state = make_sd3_state_dict(tiny_sd3_params("5-medium", depth=4), seed=3)
    save_file({DIFFUSION_MODEL_PREFIX + k: v for k, v in state.items()}, ckpt)
    files = {name: str(tiny_sd3_models[name]) for name in ("clip_l", "clip_g", "t5xxl", "vae")}
    _make_lora(lora, ckpt, **files)
    options = [item for name, path in files.items() for item in (f"--{name}", path)]
    return ckpt, options, lora


def test_block_swap_gives_the_same_images(deep_sd3, tmp_path, caplog, monkeypatch):
    """On the CPU the swapped weights still trade storage, so a block run with another's weights changes pixels."""
    caplog.set_level(logging.INFO)
    ckpt, options, lora = deep_sd3

    def args(out, *extra):
        return _args(ckpt, tmp_path / out, *options, "--steps", "2", "--lora_weights", f"{lora};1.0", *extra)

    (applied,) = _run_in_process(args("applied"))
    (base,) = _run_in_process(args("base", "--lora_weights"))  # no LoRA
    (merged,) = _run_in_process(args("merged", "--merge_lora_weights"))
    assert np.abs(_pixels(applied) - _pixels(base)).mean() > 2.0  # the LoRA changes the image
    assert "block swap" not in caplog.text

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPT}\n{PROMPT} --m 0\n{PROMPT} --m 1\n\n"))
    swapped = _run_in_process(args("swapped", "--blocks_to_swap", "2", "--interactive"))
    assert caplog.text.count("block swap: 2 of 4 joint blocks") == 1  # attached once, for every image
    for path, expected in zip(swapped, [applied, base, applied], strict=True):
        np.testing.assert_array_equal(_pixels(path), _pixels(expected))

    caplog.clear()
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPT}\n{PROMPT}\n\n"))
    offloaded = _run_in_process(args("offload", "--merge_lora_weights", "--blocks_to_swap", "2", "--offload",
                                     "--interactive"))  # fmt: skip
    assert caplog.text.count("block swap: 2 of 4 joint blocks") == 2  # with --offload, attached for each image
    for path in offloaded:
        np.testing.assert_array_equal(_pixels(path), _pixels(merged))


def test_block_swap_beyond_the_limit_and_spelling(deep_sd3, tmp_path, capsys, caplog):
    import sd3_minimal_inference

    caplog.set_level(logging.INFO)
    ckpt, options, _ = deep_sd3
    line = _error_line(capsys, _args(ckpt, tmp_path, *options, "--blocks_to_swap", "3"))
    assert line.startswith("error: --blocks_to_swap 3:") and "4 joint blocks, of which 0 to 2" in line, line
    assert " layout, depth " not in caplog.text  # refused from the checkpoint's header, before the MMDiT loads
    args = sd3_minimal_inference.parse_args(["--ckpt_path", "c", "--b"])  # upstream's abbreviation of --bf16
    assert args.bf16 and args.blocks_to_swap is None


def _error_line(capsys, argv: list[str]) -> str:
    """``main(argv)`` as the script's ``run_cli`` runs it, in this process: exit 2 and one error line."""
    import sd3_minimal_inference
    from library.errors import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: sd3_minimal_inference.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


def test_wrong_files_and_options_give_one_line(tiny_sd3_models, tiny_models, tmp_path, capsys):
    models = tiny_sd3_models
    flux = run_script(SCRIPT, *_args(tiny_models["flux_dev"], tmp_path, *_separate(models)))
    assert flux.returncode == 2 and "Traceback" not in flux.stderr, flux.stderr
    (line,) = _error_lines(flux.stderr)
    assert "--ckpt_path" in line and str(tiny_models["flux_dev"]) in line, line

    line = _error_line(capsys, _args(models["sd3_medium_mmdit_only"], tmp_path, *_separate(models)))
    assert "--vae is required" in line and str(models["sd3_medium_mmdit_only"]) in line, line
    separate = _separate(models)
    separate[3] = str(models["clip_l"])  # CLIP-L as --clip_g
    line = _error_line(capsys, _args(models["sd3_medium"], tmp_path, *separate))
    assert "--clip_g" in line and str(models["clip_l"]) in line, line
    line = _error_line(capsys, _args(models["sd3_medium_incl_t5"], tmp_path, "--fp16", "--bf16"))
    assert "--fp16 and --bf16" in line, line
    line = _error_line(capsys, _args(models["sd3_medium_incl_t5"], tmp_path, "--width", "1024"))
    assert "--width/--height 1024x64" in line and "at most 512 px" in line, line
    line = _error_line(capsys, _args(models["sd3_medium_incl_t5"], tmp_path, "--lora_weights", "x.safetensors;hi"))
    assert "multiplier 'hi' is not a number" in line, line
    assert not list(tmp_path.glob("*.png"))


def test_vae_file_precision_and_masks(tiny_sd3_models, tmp_path):
    """``--vae`` completes a checkpoint without one; bf16, the mask flags and a T5 length."""
    models = tiny_sd3_models
    extra = ["--vae", str(models["vae"]), "--bf16", "--apply_lg_attn_mask", "--apply_t5_attn_mask",
             "--t5xxl_token_length", "16", "--cfg_scale", "1.0", "--negative_prompt", "blurry"]  # fmt: skip
    (path,) = _run_in_process(_args(models["sd3_medium_mmdit_only"], tmp_path, *_separate(models), *extra))
    image = Image.open(path)
    assert image.size == (64, 64) and image.info["negative_prompt"] == "blurry" and np.ptp(_pixels(path)) > 0
