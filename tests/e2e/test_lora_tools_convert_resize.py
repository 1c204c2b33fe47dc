"""The LoRA and model tools through their command lines: networks/convert_flux_lora.py, networks/resize_lora.py,
tools/show_metadata.py and tools/merge_sd3_safetensors.py. Files, keys, dtypes and metadata as users see them;
bad inputs (the other family's LoRA, a checkpoint, a truncated file, mismatched parts, an existing output) end in
one line and leave no output behind."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models.sd3.loading import open_sd3_checkpoint
from library.models.sd3.model import MMDiT
from library.models.sd3.tiny import tiny_sd3_params
from library.training.metadata import additional_network_hashes
from networks import convert_flux_lora, lora_flux, lora_sd3, resize_lora
from networks.lora import lora_delta, lora_scale
from tests.e2e.test_flux_train_network import _one_line_error
from tests.helpers import run_script
from tests.unit.test_lora import meta_flux, randomize, tiny_clip, tiny_t5
from tools import merge_sd3_safetensors, show_metadata

CONVERT, RESIZE = "networks/convert_flux_lora.py", "networks/resize_lora.py"
SHOW, MERGE = "tools/show_metadata.py", "tools/merge_sd3_safetensors.py"
TRAINING_METADATA = {"ss_network_module": "networks.lora_flux", "ss_network_dim": "8", "ss_network_alpha": "4.0",
                     "ss_training_comment": "my run", "modelspec.architecture": "flux-1-dev/lora"}  # fmt: skip


def error_of(main, *args: str) -> str:
    """The UserError a tool's ``main`` raises for these arguments (in-process; the one-line printing of such
    errors is checked once per tool through a real process)."""
    with pytest.raises(UserError) as caught:
        main(list(args))
    return str(caught.value)


def metadata_of(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def deltas(state: dict) -> dict[str, torch.Tensor]:
    names = {k.partition(".")[0] for k in state}
    return {n: lora_delta(state[f"{n}.lora_down.weight"], state[f"{n}.lora_up.weight"])
            * lora_scale(state[f"{n}.alpha"], state[f"{n}.lora_down.weight"].shape[0]) for n in names}  # fmt: skip


@pytest.fixture
def flux_lora(tmp_path):
    """A split_qkv FLUX.1 LoRA of rank 8 with CLIP-L and T5-XXL parts, saved as training saves it."""
    network = lora_flux.create_network(1.0, 8, 4.0, None, [tiny_clip(), tiny_t5()], meta_flux(), split_qkv="True",
                                       train_t5xxl="True")  # fmt: skip
    randomize(network, std=0.05)
    path = tmp_path / "flux_lora.safetensors"
    network.save_weights(path, torch.float32, dict(TRAINING_METADATA))
    return path


def test_convert_flux_lora_both_ways(flux_lora, tiny_models, tmp_path):
    ait, back = tmp_path / "ait.safetensors", tmp_path / "back.safetensors"
    result = run_script(CONVERT, "--src_path", str(flux_lora), "--dst_path", str(ait), "--save_precision", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    converted, original = load_file(ait), load_file(flux_lora)
    assert {k.split(".")[0] for k in converted} == {"transformer", "text_encoder", "text_encoder_2"}
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in converted
    assert {v.dtype for v in converted.values()} == {torch.bfloat16}
    assert sum(v.numel() for v in converted.values()) < sum(v.numel() for v in original.values())  # small form
    meta = metadata_of(ait)
    assert meta["ss_training_comment"] == "my run" and "sshs_model_hash" not in meta

    line = _one_line_error(run_script(CONVERT, "--src_path", str(flux_lora), "--dst_path", str(ait)))
    assert f"--dst_path {ait}: already exists; pass --overwrite" in line
    result = run_script(CONVERT, "--src_path", str(ait), "--dst_path", str(back), "--src", "ai-toolkit", "--dst",
                        "sd-scripts", "--save_precision", "fp32")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    returned = load_file(back)
    assert returned.keys() == original.keys()
    expected = deltas(original)
    for name, delta in deltas(returned).items():
        torch.testing.assert_close(delta, expected[name], rtol=0.02, atol=2e-4, msg=name)  # bf16 on the way
    meta = metadata_of(back)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == additional_network_hashes(returned, meta)
    assert run_script(CONVERT, "--src_path", str(ait), "--dst_path", str(back), "--overwrite").returncode == 0


def test_convert_flux_lora_refuses_what_it_cannot_convert(flux_lora, tiny_models, tmp_path):
    with torch.device("meta"):
        mmdit = MMDiT(tiny_sd3_params("medium"))
    sd3_lora = tmp_path / "sd3.safetensors"
    lora_sd3.create_network(1.0, 4, 1.0, None, None, mmdit).save_weights(sd3_lora, None, None)
    tagged = tmp_path / "tagged.safetensors"
    save_file(load_file(flux_lora), str(tagged), {"ss_network_module": "networks.lora_sd3"})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(flux_lora.read_bytes()[:-100])
    out = tmp_path / "out.safetensors"
    for args, expected in (
        ((str(sd3_lora),), "not a FLUX.1 LoRA: lora_unet_joint_blocks_0"),
        ((str(tagged),), "its metadata says networks.lora_sd3 (an SD3/SD3.5 LoRA?); convert it with networks/"
                         "convert_sd3_lora.py"),
        ((str(tiny_models["flux_dev"]),), "not a LoRA file, found FLUX.1 dev transformer"),
        ((str(truncated),), "is truncated"),
        ((str(flux_lora), "--src", "ai-toolkit"), "already an sd-scripts LoRA"),
    ):  # fmt: skip
        message = error_of(convert_flux_lora.main, "--src_path", *args, "--dst_path", str(out))
        assert expected in message, message
        assert not out.exists()
    message = error_of(convert_flux_lora.main, "--src_path", str(flux_lora), "--dst_path", str(tmp_path / "x.pt"))
    assert "only .safetensors files are written" in message
    line = _one_line_error(run_script(CONVERT, "--src_path", str(sd3_lora), "--dst_path", str(out)))
    assert "not a FLUX.1 LoRA: lora_unet_joint_blocks_0" in line and not out.exists()


def test_resize_lora(flux_lora, tiny_models, tmp_path):
    small, same, dynamic = (tmp_path / f"{n}.safetensors" for n in ("small", "same", "dynamic"))
    result = run_script(RESIZE, "--model", str(flux_lora), "--save_to", str(small), "--new_rank", "4",
                        "--save_precision", "fp16", "--verbose")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in result.stdout
    assert "Average Frobenius norm retention" in result.stdout
    resized, original = load_file(small), load_file(flux_lora)
    assert resized.keys() == original.keys()
    assert {v.shape[0] for k, v in resized.items() if k.endswith("lora_down.weight")} == {4}
    assert {v.dtype for v in resized.values()} == {torch.float16}
    meta = metadata_of(small)
    assert meta["ss_network_dim"] == "4" and meta["ss_training_comment"] == "dimension is resized from 32 to 4; my run"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == additional_network_hashes(resized, meta)

    result = run_script(RESIZE, "--model", str(flux_lora), "--save_to", str(same), "--new_rank", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = deltas(original)
    for name, delta in deltas(load_file(same)).items():  # at full rank the resize is exact
        torch.testing.assert_close(delta, expected[name], rtol=1e-4, atol=1e-6, msg=name)

    result = run_script(RESIZE, "--model", str(flux_lora), "--save_to", str(dynamic), "--new_rank", "32",
                        "--dynamic_method", "sv_fro", "--dynamic_param", "0.6")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert metadata_of(dynamic)["ss_network_dim"] == "Dynamic"
    assert len({v.shape[0] for k, v in load_file(dynamic).items() if k.endswith("lora_down.weight")}) > 1

    out = tmp_path / "out.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(flux_lora.read_bytes()[:-100])
    for args, expected_line in (
        (("--model", str(flux_lora), "--dynamic_method", "sv_ratio"), "--dynamic_method sv_ratio needs --dynamic_param"),
        (("--model", str(tiny_models["flux_dev"])), "not a LoRA file, found FLUX.1 dev transformer"),
        (("--model", str(flux_lora), "--new_rank", "0"), "ranks must be >= 1"),
        (("--model", str(truncated)), f"--model {truncated}: is truncated"),
    ):  # fmt: skip
        message = error_of(resize_lora.main, *args, "--save_to", str(out))
        assert expected_line in message, message
        assert not out.exists()
    line = _one_line_error(run_script(RESIZE, "--model", str(flux_lora), "--save_to", str(small)))
    assert "--save_to" in line and "already exists; pass --overwrite" in line


def test_show_metadata(flux_lora, tiny_models, tmp_path, capsys):
    datasets = [
        {
            "resolution": [512, 512],
            "batch_size_per_device": 2,
            "num_train_images": 6,
            "num_reg_images": 0,
            "bucket_info": {"buckets": {"0": {"resolution": [512, 512], "count": 3}}},
            "subsets": [{"image_dir": "img", "img_count": 3, "num_repeats": 2, "class_tokens": "sks"}],
        }
    ]
    tags = {"img": {"cat": 3, "dog": 1, "sks": 3, "tree": 2}}
    metadata = {**TRAINING_METADATA, "ss_datasets": json.dumps(datasets), "ss_tag_frequency": json.dumps(tags),
                "modelspec.title": "my lora", "modelspec.thumbnail": "data:image/png;base64," + "A" * 500,
                "format": "pt"}  # fmt: skip
    lora = tmp_path / "lora.safetensors"
    save_file(load_file(flux_lora), str(lora), metadata)

    result = run_script(SHOW, "--model", str(lora), "--top", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "holds     LoRA:" in text and "lora_te3  14 modules (14 x rank 8)" in text
    assert "lora_unet" in text and "x rank 32" in text  # split_qkv modules are fused: 4 parts x rank 8
    for line in ("Training (ss_*):", "Model spec (modelspec.*):", "dataset 0: 512x512, batch 2, 6 train + 0 reg "
                 "images, 1 buckets", "img: 3 images x 2 repeats, class_tokens 'sks'",
                 "Tag frequency (top 2 per folder):", "img: 4 tags (and 2 more)", "Other keys:"):  # fmt: skip
        assert line in text, line
    rows = {tuple(line.split(None, 1)) for line in text.splitlines()}
    for row in (("ss_network_module", "networks.lora_flux"), ("title", "my lora"), ("format", "pt"),
                ("thumbnail", "data:image/png;base64,... (522 characters)")):  # fmt: skip
        assert row in rows, row
    assert text.index("     3  cat") < text.index("     3  sks") and "dog" not in text  # most frequent first

    show_metadata.main(["--model", str(lora), "--json"])
    assert json.loads(capsys.readouterr().out) == metadata
    show_metadata.main(["--model", str(tiny_models["flux_dev"])])
    out = capsys.readouterr().out
    assert "FLUX.1 dev transformer" in out and "  tiny_model  flux_dev" in out
    text_file = tmp_path / "notes.safetensors"
    text_file.write_text("not a model at all, just some words in a file")
    assert "is not a safetensors file" in _one_line_error(run_script(SHOW, "--model", str(text_file)))


def test_merge_sd3_safetensors(tiny_sd3_models, tiny_models, tmp_path):
    m = tiny_sd3_models
    out = tmp_path / "merged.safetensors"
    result = run_script(MERGE, "--dit", str(m["sd3_medium_mmdit_only"]), "--vae", str(m["vae"]), "--clip_l",
                        str(m["clip_l"]), "--clip_g", str(m["clip_g"]), "--t5xxl", str(m["t5xxl"]), "--output",
                        str(out), "--save_precision", "bf16")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = open_sd3_checkpoint(out)
    assert checkpoint.prefix == "model.diffusion_model." and checkpoint.vae_prefix == "first_stage_model."
    assert set(checkpoint.embedded) == {"clip_l", "clip_g", "t5xxl"}
    assert checkpoint.description == "SD3/SD3.5 MMDiT checkpoint (SD3 Medium, with VAE, CLIP-L, CLIP-G, T5-XXL)"
    merged = load_file(out)
    assert {v.dtype for v in merged.values() if v.is_floating_point()} == {torch.bfloat16}
    for prefix, path in (("model.diffusion_model.", m["sd3_medium_mmdit_only"]), ("first_stage_model.", m["vae"]),
                         ("text_encoders.clip_g.transformer.", m["clip_g"]),
                         ("text_encoders.t5xxl.transformer.", m["t5xxl"])):  # fmt: skip
        part = load_file(path)
        assert len(part) == sum(k.startswith(prefix) for k in merged)
        assert all(torch.equal(merged[prefix + k], v.to(torch.bfloat16)) for k, v in part.items()), prefix
    assert metadata_of(out)["tiny_model"] == "sd3_medium_mmdit_only"  # the DiT's metadata

    bare_clip = tmp_path / "clip_l_bare.safetensors"  # transformers 5 saves CLIPTextModel without text_model.
    save_file({k.removeprefix("text_model."): v for k, v in load_file(m["clip_l"]).items()}, str(bare_clip))
    replaced = tmp_path / "replaced.safetensors"
    result = run_script(MERGE, "--dit", str(m["sd3_medium_incl_clips"]), "--clip_l", str(bare_clip), "--output",
                        str(replaced))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    merged, separate = load_file(replaced), load_file(m["clip_l"])
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged["text_encoders.clip_l.transformer." + key], separate[key])  # not the embedded copy
    assert set(open_sd3_checkpoint(replaced).embedded) == {"clip_l", "clip_g"}

    truncated = tmp_path / "t5_truncated.safetensors"
    truncated.write_bytes(m["t5xxl"].read_bytes()[:-1000])
    for args, expected in (
        (("--dit", str(tiny_models["flux_dev"])), "--dit"),
        (("--dit", str(m["sd3_medium"]), "--t5xxl", str(truncated)), f"--t5xxl {truncated}: is truncated"),
        (("--dit", str(m["sd3_medium"]), "--vae", str(m["clip_l"])), "expected an SD3 VAE, found"),
        (("--dit", str(m["sd3_medium"]), "--clip_g", str(m["clip_l"])), "CLIP-G without text_projection.weight"),
        (("--dit", str(m["sd3_medium"]), "--clip_l", str(m["t5xxl"])), "expected a CLIP-L text encoder, found T5"),
        (("--dit", str(m["sd3_medium"]), "--t5xxl", str(m["clip_g"])), "expected a T5-XXL text encoder, found CLIP"),
        (("--dit", str(m["sd3_medium"]), "--output", str(replaced)), "already exists; pass --overwrite"),
    ):  # fmt: skip
        target = tmp_path / "never.safetensors"
        message = error_of(merge_sd3_safetensors.main, "--output", str(target), *args)
        assert expected in message, message
        assert not target.exists()
    line = _one_line_error(run_script(MERGE, "--dit", str(tiny_models["flux_dev"]), "--output", str(out),
                                      "--overwrite"))  # fmt: skip
    assert "expected an SD3/SD3.5 MMDiT, found FLUX.1 dev transformer" in line
