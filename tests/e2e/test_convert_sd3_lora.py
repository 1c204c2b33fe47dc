"""networks/convert_sd3_lora.py through its command line: both directions, --save_precision, and one-line errors
for files that are not SD3 LoRAs."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.models.sd3.model import MMDiT
from library.models.sd3.tiny import tiny_sd3_params
from networks import lora_flux, lora_sd3
from tests.e2e.test_flux_train_network import _one_line_error
from tests.helpers import run_script
from tests.unit.test_lora import meta_flux, randomize

SCRIPT = "networks/convert_sd3_lora.py"


def test_cli_converts_both_ways_and_refuses_other_files(tiny_sd3_models, tmp_path):
    with torch.device("meta"):
        mmdit = MMDiT(tiny_sd3_params("medium"))
    network = lora_sd3.create_network(1.0, 4, 2.0, None, None, mmdit, emb_dims="[2,2,2,2,2,2]")
    randomize(network)
    src, peft, back = tmp_path / "sd3.safetensors", tmp_path / "peft.safetensors", tmp_path / "back.safetensors"
    network.save_weights(src, torch.float32, {"ss_network_module": "networks.lora_sd3"})

    result = run_script(SCRIPT, "--src_path", str(src), "--dst_path", str(peft), "--save_precision", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    converted = load_file(peft)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in converted
    assert "transformer.norm_out.linear.lora_B.weight" in converted
    assert {v.dtype for v in converted.values()} == {torch.bfloat16}
    with safe_open(str(peft), "pt") as f:
        assert f.metadata()["format"] == "pt" and "sshs_model_hash" not in f.metadata()

    result = run_script(SCRIPT, "--src_path", str(peft), "--dst_path", str(back), "--src", "diffusers", "--dst",
                        "sd-scripts")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_file(back).keys() == network.state_dict().keys()

    flux_lora = tmp_path / "flux.safetensors"
    lora_flux.create_network(1.0, 4, 1.0, None, None, meta_flux()).save_weights(flux_lora, torch.float16, None)
    for args, expected in (
        ((str(tiny_sd3_models["sd3_medium"]),), "not a LoRA file, found SD3/SD3.5 MMDiT checkpoint (SD3 Medium"),
        ((str(flux_lora),), "not an SD3/SD3.5 LoRA: lora_unet_double_blocks_0"),
        ((str(src), "--src", "diffusers", "--dst", "sd-scripts"), "already an sd-scripts LoRA"),
    ):
        line = _one_line_error(run_script(SCRIPT, "--src_path", *args, "--dst_path", str(tmp_path / "x.safetensors")))
        assert expected in line, line
