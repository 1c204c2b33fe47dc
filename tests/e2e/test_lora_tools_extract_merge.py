"""networks/flux_extract_lora.py, sd3_extract_lora.py, flux_merge_lora.py and sd3_merge_lora.py through their
command lines on tiny real-layout files: a known low-rank change is extracted and merged back, LoRAs merge into
prefixed, bundled and fp8 checkpoints and into one LoRA exactly, and bad input gets one line and no file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import run_cli
from library.models.flux.model import Flux
from library.models.flux.tiny import tiny_flux_params
from library.models.layouts import open_encoder_file, open_sd3_file
from library.models.sd3.model import MMDiT
from library.models.sd3.tiny import tiny_sd3_params
from networks import flux_extract_lora, flux_merge_lora, lora_flux, lora_sd3, sd3_merge_lora
from networks.convert_flux_lora import sd_scripts_to_ai_toolkit
from networks.lora import lora_delta
from tests.e2e.test_flux_train_network import _one_line_error
from tests.helpers import run_script
from tests.unit.test_lora import randomize

PREFIX = "model.diffusion_model."


def add_low_rank(state: dict[str, torch.Tensor], changes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with a random delta of the given rank added to each named weight (Linear or Conv2d)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for key, rank in changes.items():
        weight = state[key]
        flat = torch.randn(weight.shape[0], rank, generator=gen) @ torch.randn(rank, weight[0].numel(), generator=gen)
        out[key] = weight + 0.02 * flat.reshape(weight.shape)
    return out


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def assert_close_rel(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float = 1e-4) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        error = (actual[key].float() - value.float()).norm() / value.float().norm().clamp(min=1e-12)
        assert error <= rel, f"{key}: relative error {error:.2e}"


def cli_error(main, argv: list[str], capsys) -> str:
    """The one line a user sees from a script's ``main`` run as its command line runs it (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


# ---- extract, then merge back ----------------------------------------------------------------------------------


FLUX_CHANGES = {"double_blocks.0.img_attn.qkv.weight": 3, "single_blocks.1.linear1.weight": 2,
                "vector_in.in_layer.weight": 1}  # fmt: skip
CLIP_CHANGES = {"text_model.encoder.layers.1.self_attn.q_proj.weight": 2}


def test_flux_extract_from_a_prefixed_tuned_model_and_merge_back(tiny_models, tmp_path):
    org = load_file(tiny_models["flux_dev"])
    tuned = add_low_rank(org, FLUX_CHANGES, seed=0)
    tuned_path, clip_tuned_path = tmp_path / "tuned.safetensors", tmp_path / "clip_tuned.safetensors"
    save_file({PREFIX + k: v for k, v in tuned.items()}, tuned_path)  # ComfyUI's prefix: names must not carry it
    clip_org = load_file(tiny_models["clip_l"])
    clip_tuned = add_low_rank(clip_org, CLIP_CHANGES, seed=1)
    save_file(clip_tuned, clip_tuned_path)
    lora_path = tmp_path / "extracted.safetensors"
    result = run_script("networks/flux_extract_lora.py", "--model_org", str(tiny_models["flux_dev"]),
                        "--model_tuned", str(tuned_path), "--save_to", str(lora_path), "--dim", "4",
                        "--clamp_quantile", "1.0", "--clip_l_org", str(tiny_models["clip_l"]),
                        "--clip_l_tuned", str(clip_tuned_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lora = load_file(lora_path)
    assert {k.partition(".")[0] for k in lora} == {
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1", "lora_unet_vector_in_in_layer",
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj"}  # fmt: skip
    assert float(lora["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 4.0
    metadata = metadata_of(lora_path)
    assert metadata["ss_network_module"] == "networks.lora_flux" and metadata["ss_network_dim"] == "4"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert json.loads(metadata["ss_extracted_from"]) == {
        "model_org": tiny_models["flux_dev"].name, "model_tuned": "tuned.safetensors", "clip_l_org":
        tiny_models["clip_l"].name, "clip_l_tuned": "clip_tuned.safetensors", "clamp_quantile": 1.0}  # fmt: skip
    with torch.device("meta"):
        flux = Flux(tiny_flux_params())
    clip = open_encoder_file(tiny_models["clip_l"], "clip_l", "--clip_l").parts["clip_l"].build()
    network, _ = lora_flux.create_network_from_weights(1.0, str(lora_path), None, [clip, None], flux)
    assert (len(network.unet_loras), len(network.text_encoder_loras)) == (3, 1)  # the suite's loader takes the names

    merged, clip_merged = tmp_path / "merged.safetensors", tmp_path / "clip_merged.safetensors"
    result = run_script("networks/flux_merge_lora.py", "--flux_model", str(tiny_models["flux_dev"]), "--save_to",
                        str(merged), "--clip_l", str(tiny_models["clip_l"]), "--clip_l_save_to", str(clip_merged),
                        "--models", str(lora_path), "--ratios", "1.0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close_rel(load_file(merged), tuned)
    assert_close_rel(load_file(clip_merged), clip_tuned)
    assert metadata_of(merged)["modelspec.merged_from"] == f"{tiny_models['flux_dev'].stem}, extracted"


SD3_CHANGES = {PREFIX + "joint_blocks.0.x_block.attn.qkv.weight": 3, PREFIX + "x_embedder.proj.weight": 2,
               PREFIX + "final_layer.linear.weight": 1,
               "text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight": 2}  # fmt: skip


def test_sd3_extract_with_bundled_encoders_and_conv_then_merge_back(tiny_sd3_models, tmp_path):
    org_path = tiny_sd3_models["sd3_medium_incl_clips"]
    org = load_file(org_path)
    tuned = add_low_rank(org, SD3_CHANGES, seed=2)
    tuned_path, lora_path, merged = (tmp_path / f"{n}.safetensors" for n in ("tuned", "lora", "merged"))
    save_file(tuned, tuned_path)
    result = run_script("networks/sd3_extract_lora.py", "--model_org", str(org_path), "--model_tuned",
                        str(tuned_path), "--save_to", str(lora_path), "--dim", "3", "--conv_dim", "2",
                        "--clamp_quantile", "1", "--save_precision", "float")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lora = load_file(lora_path)
    assert {k.partition(".")[0] for k in lora} == {
        "lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_x_embedder_proj", "lora_unet_final_layer_linear",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1"}  # fmt: skip
    assert lora["lora_unet_x_embedder_proj.lora_down.weight"].shape == (2, 16, 2, 2)
    assert lora["lora_unet_x_embedder_proj.lora_up.weight"].shape == (128, 2, 1, 1)
    metadata = metadata_of(lora_path)
    assert metadata["ss_network_module"] == "networks.lora_sd3" and metadata["ss_base_model_version"] == "medium"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": 2, "conv_alpha": 2}
    with torch.device("meta"):
        mmdit = MMDiT(tiny_sd3_params("medium", context_in_dim=384, adm_in_dim=320))
    clip_g = open_sd3_file(org_path, "--sd3_model").parts["clip_g"].build()
    network, _ = lora_sd3.create_network_from_weights(1.0, str(lora_path), None, [None, clip_g, None], mmdit)
    assert (len(network.unet_loras), len(network.text_encoder_loras)) == (3, 1)

    result = run_script("networks/sd3_merge_lora.py", "--sd3_model", str(org_path), "--save_to", str(merged),
                        "--models", str(lora_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close_rel(load_file(merged), tuned)  # the VAE and CLIP-L as they were, the bundled CLIP-G merged
    assert metadata_of(merged)["modelspec.architecture"] == "stable-diffusion-3-medium"


# ---- merge ---------------------------------------------------------------------------------------------------


def saved_flux_lora(path: Path, rank: int, alpha: float, seed: int,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:  # fmt: skip
    with torch.device("meta"):
        flux = Flux(tiny_flux_params())
    network = lora_flux.create_network(1.0, rank, alpha, None, None, flux)
    randomize(network, seed=seed)
    network.save_weights(path, dtype, {"ss_network_module": "networks.lora_flux"})
    return load_file(path)


def module_deltas(state: dict[str, torch.Tensor], ratio: float = 1.0) -> dict[str, torch.Tensor]:
    names = {k.partition(".")[0] for k in state}
    return {n: lora_delta(state[f"{n}.lora_down.weight"], state[f"{n}.lora_up.weight"]) * ratio
            * float(state[f"{n}.alpha"]) / state[f"{n}.lora_down.weight"].shape[0] for n in names}  # fmt: skip


def test_flux_loras_merge_into_one_lora_exactly(tmp_path):
    first, second, out = (tmp_path / f"{n}.safetensors" for n in ("first", "second", "both"))
    a, b = saved_flux_lora(first, 4, 1.0, seed=1, dtype=torch.float16), saved_flux_lora(second, 8, 16.0, seed=2)
    result = run_script("networks/flux_merge_lora.py", "--save_to", str(out), "--models", str(first), str(second),
                        "--ratios", "0.6", "-0.8", "--concat", "--shuffle")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_file(out)
    assert {v.dtype for v in saved.values()} == {torch.float16}  # the first LoRA's dtype
    merged, expected_a, expected_b = module_deltas(saved), module_deltas(a, 0.6), module_deltas(b, -0.8)
    assert merged.keys() == expected_a.keys()
    for name, delta in merged.items():  # exact up to the fp16 rounding of the saved factors
        expected = expected_a[name] + expected_b[name]
        torch.testing.assert_close(delta, expected, rtol=0, atol=2e-3 * expected.abs().max().item())
    metadata = metadata_of(out)
    assert metadata["ss_network_dim"] == "12" and metadata["ss_network_alpha"] == "12.0"
    parts = json.loads(metadata["ss_merged_loras"])
    assert [(p["file"], p["ratio"], p["dim"], p["alpha"]) for p in parts] == [
        ("first.safetensors", 0.6, 4, 1.0), ("second.safetensors", -0.8, 8, 16.0)]  # fmt: skip
    assert metadata["modelspec.merged_from"] == "first, second" and "sshs_model_hash" in metadata


def test_flux_merge_into_fp8_file_streamed_with_a_peft_lora(tiny_models, tmp_path):
    fp8_path, sds_path, peft_path, merged = (tmp_path / f"{n}.safetensors" for n in ("fp8", "sds", "peft", "out"))
    original = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(tiny_models["flux_dev"]).items()}
    save_file(original, fp8_path)
    lora = saved_flux_lora(sds_path, 4, 2.0, seed=3)
    save_file(sd_scripts_to_ai_toolkit(lora), peft_path)  # diffusers/ai-toolkit keys, recognised by their names
    result = run_script("networks/flux_merge_lora.py", "--flux_model", str(fp8_path), "--save_to", str(merged),
                        "--models", str(peft_path), "--ratios", "0.5", "--mem_eff_load_save", "--diffusers")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = load_file(merged)
    assert {v.dtype for v in out.values()} == {torch.float8_e4m3fn}
    deltas = module_deltas(lora, 0.5)
    for key, weight in original.items():
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        expected = weight.float() + deltas[name] if name in deltas else weight.float()
        torch.testing.assert_close(out[key].float(), expected.to(torch.float8_e4m3fn).float(), rtol=0, atol=0)


# ---- what users get wrong --------------------------------------------------------------------------------------


def test_bad_input_gets_one_line_and_writes_nothing(tiny_models, tiny_sd3_models, tmp_path, capsys):
    flux = str(tiny_models["flux_dev"])
    good, out = tmp_path / "good.safetensors", tmp_path / "out.safetensors"
    saved_flux_lora(good, 4, 1.0, seed=5)
    with torch.device("meta"):
        mmdit = MMDiT(tiny_sd3_params("medium"))
    sd3_lora = tmp_path / "sd3.safetensors"
    lora_sd3.create_network(1.0, 4, 1.0, None, None, mmdit).save_weights(sd3_lora, torch.float16,
                                                                          {"ss_network_module": "networks.lora_sd3"})  # fmt: skip
    with torch.device("meta"):
        deeper = Flux(tiny_flux_params(depth=3))
    deep_lora = tmp_path / "deep.safetensors"
    lora_flux.create_network(1.0, 4, 1.0, None, None, deeper).save_weights(deep_lora, torch.float32, None)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    merge = ["--flux_model", flux, "--save_to", str(out), "--models"]
    for main, argv, expected in [
        (flux_merge_lora.main, merge + [str(sd3_lora)],
         "not a FLUX.1 LoRA: its metadata says networks.lora_sd3 (an SD3/SD3.5 LoRA? use networks/sd3_merge_lora.py)"),
        (flux_merge_lora.main, merge + [str(deep_lora)], "modules are in none of the given models (FLUX.1 denoiser): "
         "lora_unet_double_blocks_2_img_attn_proj"),
        (flux_merge_lora.main, merge + [str(good), str(good), "--ratios", "1"],
         "--models and --ratios: 2 LoRA files but 1 ratios; give one ratio per file"),
        (flux_merge_lora.main, merge + [str(truncated)], f"--models {truncated}: is truncated"),
        (flux_merge_lora.main, ["--flux_model", flux, "--save_to", str(existing), "--models", str(good)],
         f"--save_to {existing}: already exists; pass --overwrite to replace it"),
        (sd3_merge_lora.main, ["--sd3_model", flux, "--save_to", str(out), "--models", str(good)],
         f"--sd3_model {flux}: expected an SD3/SD3.5 MMDiT, found FLUX.1 dev transformer"),
        (flux_merge_lora.main, ["--save_to", str(out), "--models", str(good), str(sd3_lora)],
         "not a FLUX.1 LoRA: its metadata says networks.lora_sd3"),
        (flux_extract_lora.main, ["--model_org", flux, "--model_tuned", flux, "--save_to", str(out)],
         "identical in every LoRA target layer: nothing to extract"),
        (flux_extract_lora.main, ["--model_org", flux, "--model_tuned", str(tiny_sd3_models["sd3_medium"]),
                                  "--save_to", str(out)],
         "--model_tuned {}: expected a FLUX.1 transformer, found SD3/SD3.5 MMDiT checkpoint".format(
             tiny_sd3_models["sd3_medium"])),
        (flux_merge_lora.main, ["--clip_l", str(tiny_models["clip_l"]), "--clip_l_save_to", str(out), "--save_to",
                                str(existing), "--models", str(good)], "the output of --flux_model, which is not given"),
    ]:  # fmt: skip
        line = cli_error(main, argv, capsys)
        assert expected in line, line
        assert not out.exists() and existing.read_bytes() == b"keep me"
    broken = tmp_path / "broken_sd3.safetensors"
    broken.write_bytes(tiny_sd3_models["sd3_medium"].read_bytes()[:-1000])
    line = _one_line_error(run_script("networks/sd3_merge_lora.py", "--sd3_model", str(broken), "--save_to", str(out),
                                      "--models", str(good)))  # fmt: skip
    assert f"--sd3_model {broken}: is truncated" in line and not out.exists()
