"""flux_minimal_inference.py through its real command line, on tiny checkpoints in the real layouts."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, run_script


def _args(models, out, *extra):
    return [
        "--ckpt", str(models["flux_dev"]), "--clip_l", str(models["clip_l"]), "--t5xxl", str(models["t5xxl"]),
        "--ae", str(models["ae"]), "--dtype", "fp32", "--width", "64", "--height", "48", "--steps", "3",
        "--seed", "7", "--prompt", "a cat holding a sign", "--out", str(out), *extra,
    ]  # fmt: skip


def _run_interactive(stdin: str, *args: str) -> subprocess.CompletedProcess:
    """``flux_minimal_inference.py --interactive`` with ``stdin`` typed in (run_script without input)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(REPO / "flux_minimal_inference.py"), *args, "--interactive"], input=stdin,
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )  # fmt: skip


def _pixels(path):
    return np.asarray(Image.open(path))


def _only_png(folder):
    files = sorted(folder.glob("*.png"))
    assert len(files) == 1, files
    assert not list(folder.glob(".*tmp*")), "temporary files left behind"
    return files[0]


def _saved(result) -> list:
    """The PNGs a run wrote, in the order it wrote them (from its log)."""
    return [line.rsplit("saved ", 1)[1] for line in result.stderr.splitlines() if " saved " in line]


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    """The non-interactive image of ``_args``: 64x48, 3 steps, seed 7."""
    out = tmp_path_factory.mktemp("reference")
    result = run_script("flux_minimal_inference.py", *_args(tiny_models, out))
    assert result.returncode == 0, result.stderr
    assert "sampling" in result.stderr  # the progress bar
    return _only_png(out)


def test_generates_png_and_seed_is_reproducible(tiny_models, tmp_path, reference):
    image = Image.open(reference)
    assert image.size == (64, 48) and image.mode == "RGB"
    assert image.info["seed"] == "7"

    again = run_script("flux_minimal_inference.py", *_args(tiny_models, tmp_path))
    assert again.returncode == 0, again.stderr
    np.testing.assert_array_equal(np.asarray(image), _pixels(_only_png(tmp_path)))


def test_interactive_loop(tiny_models, tmp_path, reference):
    lines = [
        "x --w abc",  # one error line, asked again, nothing generated
        "a red circle --w 64 --h 48 --s 2 --d 7",
        "a cat holding a sign --s 3 --d 7",  # 64x48 carries over: the reference image
        "",  # ends the loop
        "never read --w 64",
    ]
    args = _args(tiny_models, tmp_path, "--width", "32", "--height", "32", "--steps", "5", "--seed", "3")
    result = _run_interactive("\n".join(lines) + "\n", *args)
    assert result.returncode == 0, result.stderr
    assert _error_lines(result) == ["error: --w 'abc': expected an integer"], result.stderr
    assert result.stdout.count("Enter prompt (empty to exit). Options: --w <width>") == 4
    assert result.stderr.count("FLUX.1 dev loaded") == 1  # models loaded once for every prompt
    circle, cat = _saved(result)
    assert sorted(str(p) for p in tmp_path.glob("*.png")) == sorted([circle, cat])
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"
    image = Image.open(circle)
    assert image.size == (64, 48) and image.info["prompt"] == "a red circle" and image.info["seed"] == "7"
    np.testing.assert_array_equal(_pixels(cat), _pixels(reference))


def test_interactive_end_of_input_without_prompts(tiny_models, tmp_path):
    result = _run_interactive("", *_args(tiny_models, tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Enter prompt") == 1 and not _error_lines(result)
    assert not list(tmp_path.glob("*.png"))


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
    """A LoRA over FLUX (``tiny_models["flux_dev"]``), CLIP-L and T5 with random (non-zero) up weights, saved as
    training saves it."""
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


def test_lora_applied_merged_and_scaled(tiny_models, tmp_path, reference):
    lora = tmp_path / "lora.safetensors"
    _make_lora(tiny_models, lora)

    def image(name, *extra):
        result = run_script("flux_minimal_inference.py", *_args(tiny_models, tmp_path / name, *extra))
        assert result.returncode == 0, result.stderr
        return np.asarray(Image.open(_only_png(tmp_path / name)), dtype=np.float32)

    base = _pixels(reference).astype(np.float32)
    applied = image("applied", "--lora", f"{lora};1.0")
    merged = image("merged", "--lora", f"{lora};1.0", "--merge_lora_weights")
    assert np.abs(applied - base).mean() > 2.0  # the LoRA changes the image
    assert np.abs(applied - merged).max() <= 2.0  # merged weights give the same image (rounding aside)

    prompt = "a cat holding a sign"
    stdin = f"{prompt}\n{prompt} --m 1,1\n{prompt} --m 1.0\n\n"
    result = _run_interactive(stdin, *_args(tiny_models, tmp_path / "interactive", "--lora_weights", f"{lora};0"))
    assert result.returncode == 0, result.stderr
    assert _error_lines(result) == ["error: --m: 2 multipliers for 1 LoRA(s) in --lora_weights"], result.stderr
    zero, one = (_pixels(p).astype(np.float32) for p in _saved(result))
    np.testing.assert_array_equal(zero, base)
    np.testing.assert_array_equal(one, applied)


def test_lora_errors(tiny_models, tmp_path):
    line = _error_line(
        run_script("flux_minimal_inference.py", *_args(tiny_models, tmp_path, "--lora", "missing.safetensors;1"))
    )
    assert "--lora_weights missing.safetensors: file not found" in line
    line = _error_line(
        run_script("flux_minimal_inference.py", *_args(tiny_models, tmp_path, "--lora", "x.safetensors;strong"))
    )
    assert "multiplier 'strong' is not a number" in line


DEEP_SWAP = 4  # 2 of 4 double blocks (the first/last-k schedule) and 4 of 6 single blocks (the cycling one)


@pytest.fixture(scope="module")
def deep_flux(tiny_models, tmp_path_factory):
    """The tiny set with a deeper FLUX.1 dev (4 double, 6 single blocks) and a LoRA for it."""
    from safetensors.torch import save_file

    from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params

    folder = tmp_path_factory.mktemp("deep_flux")
    models = {**tiny_models, "flux_dev": folder / "flux1-dev-deep.safetensors", "lora": folder / "lora.safetensors"}
    save_file(make_flux_state_dict(tiny_flux_params(depth=4, depth_single_blocks=6), seed=3), models["flux_dev"])
    _make_lora(models, models["lora"])
    return models


def _generate(argv: list[str]) -> list:
    """The script's parse and run in this process, short T5 text and two steps for speed; the PNGs written."""
    import flux_minimal_inference
    from library.inference.flux_cli import run_flux_inference

    argv = [*argv, "--t5xxl_max_token_length", "32", "--steps", "2"]
    return run_flux_inference(flux_minimal_inference.parse_args(argv))


def test_block_swap_gives_the_same_images(deep_flux, tmp_path, caplog, monkeypatch):
    """On the CPU the swapped weights still trade storage, so a block run with another's weights changes pixels."""
    caplog.set_level(logging.INFO)
    lora, swap = f"{deep_flux['lora']};1.0", ["--blocks_to_swap", str(DEEP_SWAP)]
    (base,) = _generate(_args(deep_flux, tmp_path / "base"))
    (applied,) = _generate(_args(deep_flux, tmp_path / "applied", "--lora", lora))
    (merged,) = _generate(_args(deep_flux, tmp_path / "merged", "--lora", lora, "--merge_lora_weights"))
    assert np.abs(_pixels(applied).astype(np.float32) - _pixels(base)).mean() > 2.0  # the LoRA changes the image
    assert "block swap" not in caplog.text

    prompt = "a cat holding a sign"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{prompt}\n{prompt} --m 0\n{prompt} --m 1\n\n"))
    swapped = _generate(_args(deep_flux, tmp_path / "swapped", "--lora", lora, *swap, "--interactive"))
    assert "block swap: 2 of 4 double blocks" in caplog.text and "block swap: 4 of 6 single blocks" in caplog.text
    assert caplog.text.count("block swap: 2 of 4") == 1  # attached once, for every image
    for path, expected in zip(swapped, [applied, base, applied], strict=True):
        np.testing.assert_array_equal(_pixels(path), _pixels(expected))

    caplog.clear()
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{prompt}\n{prompt}\n\n"))
    offloaded = _generate(
        _args(deep_flux, tmp_path / "offload", "--lora", lora, "--merge_lora_weights", *swap, "--offload",
              "--interactive")
    )  # fmt: skip
    assert caplog.text.count("block swap: 2 of 4") == 2  # with --offload, attached for each image
    for path in offloaded:
        np.testing.assert_array_equal(_pixels(path), _pixels(merged))


def test_block_swap_beyond_the_limit(deep_flux, tmp_path, capsys, caplog):
    import flux_minimal_inference
    from library.errors import run_cli

    caplog.set_level(logging.INFO)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: flux_minimal_inference.main(_args(deep_flux, tmp_path, "--blocks_to_swap", "5")))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: --blocks_to_swap 5:") and "at most 4 is possible" in line, line
    assert "FLUX.1" not in caplog.text  # refused from the checkpoint's header, before anything loads


# Upstream flux_minimal_inference.py's options (with no aliases), as its argparse sees them.
UPSTREAM_OPTIONS = {
    "ckpt_path": "c.safetensors", "model_type": "flux", "clip_l": "l.safetensors", "t5xxl": "t.safetensors",
    "ae": "a.safetensors", "apply_t5_attn_mask": None, "prompt": "p", "output_dir": "o", "dtype": "fp16",
    "clip_l_dtype": "fp8", "ae_dtype": "fp32", "t5xxl_dtype": "fp8", "flux_dtype": "fp8", "seed": "5", "steps": "3",
    "guidance": "2.5", "negative_prompt": "n", "cfg_scale": "2.0", "offload": None, "lora_weights": "x;1",
    "merge_lora_weights": None, "width": "64", "height": "48", "interactive": None,
}  # fmt: skip


def _upstream_spellings():
    """Every spelling upstream's parser accepts: each option in full and every prefix unique among its options."""
    names = [*UPSTREAM_OPTIONS, "help"]
    for name in UPSTREAM_OPTIONS:
        for end in range(1, len(name) + 1):
            prefix = name[:end]
            if prefix == name or [n for n in names if n.startswith(prefix)] == [name]:
                yield f"--{prefix}", name


def test_every_upstream_spelling_reaches_its_option():
    import flux_minimal_inference

    required = ["--ckpt_path", "C", "--clip_l", "L", "--t5xxl", "T", "--ae", "A"]
    spellings = list(_upstream_spellings())
    assert {"--ckpt", "--out", "--lora", "--ck", "--ou", "--lor", "--d"} <= {s for s, _ in spellings}
    for spelling, name in spellings:
        value = UPSTREAM_OPTIONS[name]
        args = flux_minimal_inference.parse_args([*required, spelling, *([value] if value else [])])
        expected = True if value is None else [value] if name == "lora_weights" else value
        assert str(getattr(args, name)) == str(expected), spelling
    suite_only = [
        "--device",
        "cpu",
        "--clip_l_tokenizer",
        "x",
        "--t5xxl_tokenizer",
        "y",
        "--t5xxl_max_token_length",
        "9",
    ]
    args = flux_minimal_inference.parse_args([*required, *suite_only])
    assert (args.device, args.clip_l_tokenizer, args.t5xxl_tokenizer, args.t5xxl_max_token_length) == (
        "cpu",
        "x",
        "y",
        9,
    )


@pytest.fixture(scope="module")
def controlnet(tiny_models, tmp_path_factory):
    """A random XLabs-layout ControlNet for the tiny FLUX.1 dev's widths, one for a wider model, a control image."""
    from safetensors.torch import save_file

    from library.models.flux.controlnet import ControlNetParams
    from library.models.flux.loading import open_flux_checkpoint
    from library.models.flux.tiny import make_flux_controlnet_state_dict

    folder = tmp_path_factory.mktemp("controlnet")
    base = open_flux_checkpoint(tiny_models["flux_dev"]).params
    files = {"file": folder / "controlnet.safetensors", "wide": folder / "wide.safetensors", "image": folder / "c.png"}
    save_file(make_flux_controlnet_state_dict(ControlNetParams(base), seed=5), files["file"])
    wide = ControlNetParams(replace(base, hidden_size=384, num_heads=3))
    save_file(make_flux_controlnet_state_dict(wide, seed=5), files["wide"])
    rows, cols = np.mgrid[0:30, 0:40]
    edges = np.stack([(cols // 5 % 2) * 255, (rows // 6 % 2) * 255, (rows + cols) * 3], axis=-1)
    Image.fromarray(edges.astype(np.uint8)).save(files["image"])  # 40x30: resized to every request's size
    return files


def _control_args(controlnet, *extra):
    return ["--controlnet", str(controlnet["file"]), "--controlnet_image", str(controlnet["image"]), *extra]


def test_controlnet_steers_the_image(tiny_models, controlnet, tmp_path):
    (base,) = _generate(_args(tiny_models, tmp_path / "base"))
    (steered,) = _generate(_args(tiny_models, tmp_path / "steered", *_control_args(controlnet)))
    (zero,) = _generate(_args(tiny_models, tmp_path / "zero", *_control_args(controlnet, "--controlnet_scale", "0")))
    assert Image.open(steered).size == (64, 48)
    assert np.abs(_pixels(steered).astype(np.float32) - _pixels(base)).mean() > 2.0  # the ControlNet changes it
    np.testing.assert_array_equal(_pixels(zero), _pixels(base))  # scale 0: exactly the image without it


def test_controlnet_with_cfg_lora_swap_offload_interactive(deep_flux, controlnet, tmp_path, monkeypatch, caplog):
    """The same images with --blocks_to_swap, --offload and --interactive as without, the control image resized to
    each prompt's size; CFG runs the ControlNet on both halves."""
    caplog.set_level(logging.INFO)
    lora = ["--lora", f"{deep_flux['lora']};1.0", "--negative_prompt", "blurry", "--cfg_scale", "2.0"]
    args = [*lora, *_control_args(controlnet, "--controlnet_scale", "0.8")]
    (wide,) = _generate(_args(deep_flux, tmp_path / "wide", *args))
    (tall,) = _generate(_args(deep_flux, tmp_path / "tall", *args, "--width", "48", "--height", "64"))
    (plain,) = _generate(_args(deep_flux, tmp_path / "plain", *lora))
    assert np.abs(_pixels(wide).astype(np.float32) - _pixels(plain)).mean() > 2.0

    prompt = "a cat holding a sign"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{prompt}\n{prompt} --w 48 --h 64\n\n"))
    swap = ["--blocks_to_swap", str(DEEP_SWAP), "--offload", "--interactive"]
    caplog.clear()
    swapped = _generate(_args(deep_flux, tmp_path / "swapped", *args, *swap))
    assert "block swap: 2 of 4 double blocks" in caplog.text and caplog.text.count("FLUX.1 ControlNet (dev)") == 1
    assert [Image.open(p).size for p in swapped] == [(64, 48), (48, 64)]
    for path, expected in zip(swapped, [wide, tall], strict=True):
        np.testing.assert_array_equal(_pixels(path), _pixels(expected))


def test_controlnet_errors_give_one_line(tiny_models, controlnet, tmp_path, capsys):
    import flux_minimal_inference
    from library.errors import run_cli

    missing = tmp_path / "missing.png"
    line = _error_line(run_script("flux_minimal_inference.py", *_args(tiny_models, tmp_path, "--controlnet",
                                  str(controlnet["file"]), "--controlnet_image", str(missing))))  # fmt: skip
    assert line == f"error: --controlnet_image {missing}: file not found"

    cases = [
        (["--controlnet", str(controlnet["file"])], "error: --controlnet needs --controlnet_image too"),
        (["--controlnet_image", str(controlnet["image"])], "error: --controlnet_image needs --controlnet too"),
        (["--controlnet_scale", "0.5"], "error: --controlnet_scale needs --controlnet too"),
        (_control_args(controlnet)[:1] + [str(tiny_models["flux_dev"])] + _control_args(controlnet)[2:],
         f"error: --controlnet {tiny_models['flux_dev']}: expected a FLUX.1 ControlNet in XLabs' layout, found "
         "FLUX.1 dev transformer"),
        (["--controlnet", str(controlnet["wide"]), "--controlnet_image", str(controlnet["image"])],
         f"error: --controlnet {controlnet['wide']}: made for another FLUX.1 model (hidden_size 384 vs 256; "
         "num_heads 3 vs 2: ControlNet vs base model)"),
        (["--controlnet", str(controlnet["file"]), "--controlnet_image", str(controlnet["file"])],
         f"error: --controlnet_image {controlnet['file']}: not a readable image"),
    ]  # fmt: skip
    for extra, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda e=extra: flux_minimal_inference.main(_args(tiny_models, tmp_path, *e)))
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert exit_info.value.code == 2 and "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith(expected), lines[0]
    assert not list(tmp_path.glob("*.png"))
