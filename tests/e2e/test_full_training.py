"""flux_train.py and sd3_train.py (full fine-tuning) through their real command lines on tiny models: the saved files
load strictly through diffusers' own single-file converters and differ from the base, trained text encoders are
written as files users pass back, a resumed run equals the uninterrupted one, and wrong combinations are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.e2e.test_flux_train_network import model_args, tiny_dataset
from tests.e2e.test_sd3_train_network import separate_files
from tests.helpers import flux_state_to_diffusers, run_script


def finetune(script: str, models: list[str], config, out, *extra: str, steps: int = 2):
    return run_script(script, *models, "--dataset_config", str(config), "--output_dir", str(out), "--output_name",
                      "ft", "--max_train_steps", str(steps), "--seed", "7", "--t5xxl_max_token_length", "16",
                      "--learning_rate", "1e-4", *extra)  # fmt: skip


def _changed(base: dict, tuned: dict) -> bool:
    return any(not torch.equal(base[k].float(), tuned[k].float()) for k in tuned)


def test_flux_train_saves_a_bfl_file_diffusers_loads(tiny_models, tmp_path):
    from diffusers import FluxTransformer2DModel

    config = tiny_dataset(tmp_path)
    result = finetune("flux_train.py", model_args(tiny_models), config, tmp_path / "out", "--save_precision", "bf16",
                      "--save_every_n_steps", "1", "--save_state")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the full model" in result.stderr and "trainable parameters" in result.stderr
    saved = load_file(tmp_path / "out" / "ft.safetensors")
    base = load_file(tiny_models["flux_dev"])
    assert saved.keys() == base.keys() and {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert _changed(base, saved)
    with safe_open(str(tmp_path / "out" / "ft.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-dev"
    converted = flux_state_to_diffusers({k: v.float() for k, v in saved.items()}, hidden=256)
    config_kwargs = dict(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
                         num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=128,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56))  # fmt: skip
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config_kwargs)
    model.load_state_dict(converted, strict=True, assign=True)  # every key, nothing left over
    resumed = finetune("flux_train.py", model_args(tiny_models), config, tmp_path / "resumed", "--save_precision",
                       "bf16", "--resume", str(tmp_path / "out" / "ft-step00000001-state"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_file(tmp_path / "resumed" / "ft.safetensors")
    for key in saved:
        torch.testing.assert_close(again[key], saved[key], rtol=0, atol=0, msg=key)


def test_sd3_train_with_text_encoders_saves_sai_file_and_encoder_files(tiny_sd3_models, tmp_path):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from library.models.text_encoders.clip import load_clip_text_model

    config = tiny_dataset(tmp_path)
    out = tmp_path / "out"
    result = finetune("sd3_train.py", separate_files(tiny_sd3_models), config, out, "--train_text_encoder",
                      "--learning_rate_te1", "1e-4", "--text_encoder_lr2", "1e-4", "--num_last_block_to_freeze", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["ft.safetensors", "ft_clip_g.safetensors",
                                                                 "ft_clip_l.safetensors"]  # fmt: skip
    saved = load_file(out / "ft.safetensors")
    base = load_file(tiny_sd3_models["sd3_medium"])
    assert saved.keys() == base.keys() and _changed(base, saved)
    frozen = [k for k in saved if k.startswith("model.diffusion_model.joint_blocks.1.")]
    assert frozen and all(torch.equal(saved[k], base[k]) for k in frozen)  # --num_last_block_to_freeze 1
    state = {k[len("model.diffusion_model."):]: v for k, v in saved.items() if k.startswith("model.diffusion_model.")}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(state))
    with torch.device("meta"):
        model = SD3Transformer2DModel(patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
                                      num_attention_heads=2, caption_projection_dim=128, joint_attention_dim=384,
                                      pooled_projection_dim=320, pos_embed_max_size=32)  # fmt: skip
    model.load_state_dict(converted, strict=True, assign=True)
    for name, role in (("ft_clip_l", "clip_l"), ("ft_clip_g", "clip_g")):
        width = 768 if role == "clip_l" else 1280
        tuned = load_clip_text_model(out / f"{name}.safetensors", option=f"--{role}", expect_width=width)
        original = load_clip_text_model(tiny_sd3_models[role], option=f"--{role}", expect_width=width)
        assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), original.state_dict().values()))


@pytest.mark.parametrize(
    "extra,summary",
    [
        (["--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
          "warmup_init=False", "--fused_backward_pass", "--full_bf16", "--mixed_precision", "bf16"],
         "each gradient clipped by its own norm"),
        (["--optimizer_type", "AdamW", "--blockwise_fused_optimizers"], "each with its own lr scheduler"),
    ],
    ids=["fused-adafactor-bf16", "blockwise-adamw"],
)
def test_flux_train_with_fused_optimizer_steps(tiny_models, tmp_path, extra, summary):
    config = tiny_dataset(tmp_path)
    result = finetune("flux_train.py", model_args(tiny_models), config, tmp_path / "out", *extra,
                      "--save_every_n_steps", "1", "--save_state")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary in result.stderr, result.stderr[-3000:]
    saved = load_file(tmp_path / "out" / "ft.safetensors")
    assert _changed(load_file(tiny_models["flux_dev"]), saved)
    resumed = finetune("flux_train.py", model_args(tiny_models), config, tmp_path / "resumed", *extra,
                       "--resume", str(tmp_path / "out" / "ft-step00000001-state"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_file(tmp_path / "resumed" / "ft.safetensors")
    for key in saved:
        torch.testing.assert_close(again[key], saved[key], rtol=0, atol=0, msg=key)


def test_block_swap_gives_the_same_weights(tiny_models, tiny_sd3_models, tmp_path):
    """On the CPU both devices are the same, so swapping must change nothing: the same seed with and without
    --blocks_to_swap gives identical weights -- FLUX.1 LoRA with CPU-offloaded checkpointing and SD3 LoRA bit for
    bit; full fine-tuning (fused steps) up to float rounding: the gradients of inputs every block shares (FLUX's
    time and guidance vector) are summed in another order once swap's backward hooks sit between the blocks."""
    from safetensors.torch import save_file

    from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params
    from library.models.sd3.tiny import make_sd3_state_dict, tiny_sd3_params
    from tests.e2e.test_flux_train_network import train as train_flux_lora
    from tests.e2e.test_sd3_train_network import common as sd3_common

    config = tiny_dataset(tmp_path)
    deep_flux = tmp_path / "flux-deep.safetensors"  # 4 + 4 blocks: two of each can be swapped
    save_file(make_flux_state_dict(tiny_flux_params(depth=4, depth_single_blocks=4)), deep_flux)
    flux_models = {**tiny_models, "flux_dev": deep_flux}
    deep_sd3 = tmp_path / "sd3-deep.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in make_sd3_state_dict(tiny_sd3_params(depth=4)).items()},
              deep_sd3)  # fmt: skip
    sd3_files = ["--pretrained_model_name_or_path", str(deep_sd3), *separate_files(tiny_sd3_models)[2:], "--vae",
                 str(tiny_sd3_models["vae"])]  # fmt: skip
    fused = ["--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
             "warmup_init=False", "--fused_backward_pass"]  # fmt: skip
    runs = {
        "ft": lambda out, *swap: finetune("flux_train.py", model_args(flux_models), config, out, *fused, *swap),
        "flux-lora": lambda out, *swap: train_flux_lora(flux_models, out, config, "--cpu_offload_checkpointing",
                                                        *swap, steps=2),
        "sd3-lora": lambda out, *swap: run_script("sd3_train_network.py", *sd3_files,
                                                  *sd3_common(config, out, steps=2), "--network_train_unet_only",
                                                  "--gradient_checkpointing", *swap),
    }  # fmt: skip
    for name, run in runs.items():
        plain, swapped = run(tmp_path / name / "plain"), run(tmp_path / name / "swap", "--blocks_to_swap", "2")
        assert plain.returncode == 0 and swapped.returncode == 0, (plain.stderr + swapped.stderr)[-3000:]
        assert "block swap:" in swapped.stderr and "blocks swapped" in swapped.stderr, name
        a, b = (load_file(next((tmp_path / name / kind).glob("*.safetensors"))) for kind in ("plain", "swap"))
        exact = name != "ft"
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-7,
                                       msg=f"{name}: {key}")  # fmt: skip
    too_many = run_script("flux_train_network.py", *model_args(flux_models), "--dataset_config", str(config),
                          "--output_dir", str(tmp_path / "x"), "--network_module", "networks.lora_flux",
                          "--blocks_to_swap", "3")  # fmt: skip
    assert "--blocks_to_swap 3: FLUX.1 would swap 1 of 4 double and 4 of 4 single blocks; at most 2" in too_many.stderr
    plain_step = finetune("flux_train.py", model_args(flux_models), config, tmp_path / "y", "--blocks_to_swap", "2")
    assert plain_step.returncode == 2 and "--blocks_to_swap with full fine-tuning needs" in plain_step.stderr


@pytest.mark.parametrize(
    "script,extra,message",
    [
        ("flux_train.py", ["--fp8_base"], "--fp8_base stores the base model in fp8"),
        ("flux_train.py", ["--fused_optimizer_groups", "4"], "--fused_optimizer_groups is marked [DOES NOT WORK]"),
        ("flux_train.py", ["--network_module", "networks.lora_flux"], "unrecognized arguments"),
        ("sd3_train.py", ["--train_t5xxl"], "--train_t5xxl needs --train_text_encoder"),
        ("flux_train.py", ["--fused_backward_pass"], "--fused_backward_pass works with --optimizer_type Adafactor only"),
        ("flux_train.py", ["--fused_backward_pass", "--optimizer_type", "adafactor", "--gradient_accumulation_steps",
                           "2"], "cannot accumulate gradients"),
        ("flux_train.py", ["--blockwise_fused_optimizers", "--optimizer_type", "RAdamScheduleFree"],
         "does not support the schedule-free optimizer"),
        ("sd3_train.py", ["--train_text_encoder", "--train_t5xxl", "--cache_text_encoder_outputs"],
         "--train_t5xxl cannot train T5-XXL from cached outputs"),
    ],
)
def test_wrong_combinations_are_refused_before_loading(tmp_path, script, extra, message):
    files = ["--clip_l", "x", "--t5xxl", "x", "--ae", "x"] if script == "flux_train.py" else []
    result = run_script(script, "--pretrained_model_name_or_path", "missing.safetensors", *files, "--output_dir",
                        str(tmp_path), "--train_data_dir", str(tmp_path), *extra)  # fmt: skip
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_memory_preflight_prints_the_estimate_picks_auto_swap_and_stops_what_cannot_fit(tiny_models, tmp_path):
    """Before any model loads: the estimate is printed; --blocks_to_swap auto picks the fewest blocks that fit the
    --vram_budget (here for a 4 + 4 block FLUX whose estimate is ~111 MiB unswapped, ~104 MiB with one and ~95 MiB
    with two blocks swapped); a budget nothing fits stops the run with the estimate and what would fit."""
    from safetensors.torch import save_file

    from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params
    from tests.e2e.test_flux_train_network import train as train_flux_lora

    config = tiny_dataset(tmp_path)
    deep = tmp_path / "flux-deep.safetensors"
    save_file(make_flux_state_dict(tiny_flux_params(depth=4, depth_single_blocks=4)), deep)
    models = {**tiny_models, "flux_dev": deep}
    fits = train_flux_lora(models, tmp_path / "auto", config, "--blocks_to_swap", "auto", "--vram_budget", "0.1",
                           steps=1)  # fmt: skip
    assert fits.returncode == 0, fits.stderr[-3000:]
    estimate_at = fits.stderr.index("memory estimate (before loading)")
    assert estimate_at < fits.stderr.index("loading FLUX.1") and "peak VRAM" in fits.stderr
    assert "--blocks_to_swap auto: 2 blocks swapped" in fits.stderr and "block swap:" in fits.stderr
    too_small = train_flux_lora(models, tmp_path / "small", config, "--vram_budget", "0.05", steps=1)
    assert too_small.returncode == 2 and "Traceback" not in too_small.stderr, too_small.stderr[-3000:]
    assert "loading FLUX.1" not in too_small.stderr  # stopped before loading
