"""Two real processes on the CPU (gloo) through the real command line, launched as users launch (accelerate launch
--multi_gpu with ACCELERATE_USE_CPU=1): LoRA and full fine-tuning of FLUX.1 and an SD3 LoRA. The processes' weights
are bit-identical after every step (--ddp_check_sync), each save is one file, two processes with batch size 1 train
exactly as one process with batch size 2, and a two-process resume continues the uninterrupted run. ControlNet training
too."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.e2e.test_flux_train_network import model_args, tiny_dataset
from tests.e2e.test_sd3_train_network import common as sd3_common
from tests.e2e.test_sd3_train_network import separate_files
from tests.helpers import REPO, run_script


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N script ...``"""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), str(REPO / script), *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)


def dataset(tmp_path: Path, batch_size: int) -> Path:
    """The bundled tiny dataset (copied once into ``tmp_path``) with ``batch_size``."""
    config = tmp_path / "tiny_dataset.toml"
    if not config.exists():
        tiny_dataset(tmp_path)
    target = config.with_name(f"batch{batch_size}.toml")
    target.write_text(config.read_text(encoding="utf-8").replace("batch_size = 2", f"batch_size = {batch_size}"))
    return target


# SGD: an update linear in the gradient, so float rounding (a batch of 2 against two of 1) stays at rounding size;
# Adam's g / sqrt(v) would magnify it for the gradients near zero
SGD = ("--optimizer_type", "SGD", "--learning_rate", "0.5")


def lora_args(models, config: Path, out: Path, *extra: str) -> list[str]:
    return [*model_args(models), "--dataset_config", str(config), "--output_dir", str(out), "--output_name", "lora",
            "--network_module", "networks.lora_flux", "--network_dim", "4", *SGD,
            "--max_train_steps", "4", "--seed", "7", "--t5xxl_max_token_length", "16", "--network_train_unet_only",
            "--cache_latents", "--cache_latents_to_disk", "--cache_text_encoder_outputs",
            "--max_data_loader_n_workers", "0", *extra]  # fmt: skip


def assert_same(a: dict, b: dict, exact: bool, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5,
                                   msg=f"{what}: {key}")  # fmt: skip


def assert_in_sync(result: subprocess.CompletedProcess, steps: int, first: int = 1) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    for step in range(first, steps + 1):
        assert f"step {step}: the 2 processes' trained weights are identical" in result.stderr, result.stderr[-3000:]


def test_lora_two_processes_equal_one_process_with_twice_the_batch_and_resume(tiny_models, tmp_path):
    saves = ("--save_every_n_steps", "2", "--save_state", "--ddp_check_sync")
    two = launch("flux_train_network.py", *lora_args(tiny_models, dataset(tmp_path, 1), tmp_path / "two", *saves))
    assert_in_sync(two, 4)
    files = {p.name for p in (tmp_path / "two").iterdir()}  # one file per save, no leftovers of the state writes
    assert files == {"lora-step00000002-state", "lora-step00000002.safetensors", "lora-state", "lora.safetensors"}
    state = tmp_path / "two" / "lora-step00000002-state"
    assert {"random_states_0.pkl", "random_states_1.pkl", "train_state.json"} <= {p.name for p in state.iterdir()}
    caches = sorted((tmp_path / "tiny_dataset").glob("*.npz"))
    assert len(caches) == 4, caches  # each image's latents written once, by one of the processes

    one = run_script("flux_train_network.py", *lora_args(tiny_models, dataset(tmp_path, 2), tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two_file, one_file = (load_file(tmp_path / d / "lora.safetensors") for d in ("two", "one"))
    assert_same(one_file, two_file, exact=False, what="2 x batch 1 vs 1 x batch 2")
    assert max(v.abs().max().item() for k, v in two_file.items() if "lora_up" in k) > 1e-3  # it trained

    resumed = launch("flux_train_network.py", *lora_args(tiny_models, dataset(tmp_path, 1), tmp_path / "resumed",
                                                         *saves, "--resume", str(state)))  # fmt: skip
    assert_in_sync(resumed, 4, first=3)
    assert "resumed from" in resumed.stderr
    assert_same(two_file, load_file(tmp_path / "resumed" / "lora.safetensors"), exact=True, what="2-process resume")


def test_full_fine_tuning_with_two_processes_and_block_swap_refused(tiny_models, tmp_path):
    def args(config: Path, out: Path, *extra: str) -> list[str]:
        return [*model_args(tiny_models), "--dataset_config", str(config), "--output_dir", str(out),
                "--output_name", "ft", *SGD, "--max_train_steps", "2", "--seed", "3",
                "--t5xxl_max_token_length", "16", "--cache_latents", "--cache_text_encoder_outputs",
                "--max_data_loader_n_workers", "0", *extra]  # fmt: skip

    two = launch("flux_train.py", *args(dataset(tmp_path, 1), tmp_path / "two", "--ddp_check_sync"))
    assert_in_sync(two, 2)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["ft.safetensors"]
    one = run_script("flux_train.py", *args(dataset(tmp_path, 2), tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same(load_file(tmp_path / "one" / "ft.safetensors"), load_file(tmp_path / "two" / "ft.safetensors"),
                exact=False, what="full fine-tuning, 2 x batch 1 vs 1 x batch 2")  # fmt: skip

    swap = launch("flux_train.py", *args(dataset(tmp_path, 1), tmp_path / "swap", "--blocks_to_swap", "1",
                                         "--fused_backward_pass", "--optimizer_type", "adafactor"))  # fmt: skip
    assert swap.returncode != 0
    assert "error: --blocks_to_swap with full fine-tuning on 2 processes: DDP cannot hold" in swap.stderr
    assert str(REPO / "library") not in swap.stderr  # one line per process (accelerate's launcher adds its own trace)


def test_controlnet_with_two_processes(tiny_models, tmp_path):
    from tests.e2e.test_flux_controlnet_training import pairs

    images, controls = pairs(tmp_path)
    out = tmp_path / "cn"
    result = launch("flux_train_control_net.py", *model_args(tiny_models), "--train_data_dir", str(images),
                    "--conditioning_data_dir", str(controls), "--resolution", "64", "--caption_extension", ".txt",
                    "--output_dir", str(out), "--output_name", "cn", "--max_train_steps", "2", "--seed", "3",
                    "--t5xxl_max_token_length", "16", "--learning_rate", "1e-3", "--max_data_loader_n_workers", "0",
                    "--ddp_check_sync")  # fmt: skip
    assert_in_sync(result, 2)
    assert sorted(p.name for p in out.iterdir()) == ["cn.safetensors"]


def test_sd3_lora_with_two_processes(tiny_sd3_models, tmp_path):
    config = dataset(tmp_path, 1)
    out = tmp_path / "sd3"
    result = launch("sd3_train_network.py", *separate_files(tiny_sd3_models), *sd3_common(config, out, steps=2),
                    "--network_train_unet_only", "--ddp_check_sync", "--ddp_timeout", "5", "--ddp_static_graph",
                    "--ddp_gradient_as_bucket_view")  # DDP's own options, passed through to it  # fmt: skip
    assert_in_sync(result, 2)
    assert len(list(out.glob("*.safetensors"))) == 1


def test_a_launch_whose_processes_would_train_alone_stops_with_the_right_command(tiny_models, tmp_path):
    """torchrun on a machine without CUDA and without ACCELERATE_USE_CPU=1: WORLD_SIZE says 2, accelerate sees one
    process; and the DeepSpeed options' checks (deepspeed is not installed here)."""
    config = dataset(tmp_path, 1)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "flux_train_network.py"), *lora_args(tiny_models, config, tmp_path / "x")],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=600)  # fmt: skip
    assert result.returncode != 0
    # each process stops with the one line (their lines may interleave), before loading models
    assert result.stderr.count("error: WORLD_SIZE is 2 but accelerate sees one process") == 2, result.stderr[-3000:]
    assert "on CPUs with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in result.stderr
    assert str(REPO / "library") not in result.stderr  # torchrun reports the failed processes with its own trace
    assert not (tmp_path / "x").exists()
    for extra, message in (
        (["--zero_stage", "3"], "--zero_stage configure DeepSpeed; add --deepspeed"),
        (["--deepspeed"], "--deepspeed needs the deepspeed package: pip install deepspeed"),
    ):
        result = run_script("flux_train_network.py", *lora_args(tiny_models, config, tmp_path / "y"), *extra)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert message in result.stderr.strip().splitlines()[-1]
