"""Multi-GPU option handling on one process: DDP's options reach accelerate, DeepSpeed's options are checked before
anything loads, a plain `python script.py --deepspeed` gets a one-process world, and the misconfigured launch is
recognised (the two-process runs are tests/e2e/test_multi_process.py)."""

from __future__ import annotations

import argparse
import importlib.util
from datetime import timedelta

import pytest

from library.errors import UserError
from library.training import distributed


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    distributed.add_distributed_args(parser)
    parser.add_argument("--blocks_to_swap", type=int, default=None)
    parser.add_argument("--fused_backward_pass", action="store_true")
    return parser.parse_args(argv)


def test_ddp_options_become_accelerate_handlers():
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = distributed.accelerator_kwargs(parse("--ddp_timeout", "7", "--ddp_static_graph",
                                                    "--ddp_gradient_as_bucket_view"))["kwargs_handlers"]  # fmt: skip
    ddp = next(h for h in handlers if isinstance(h, DistributedDataParallelKwargs))
    assert ddp.static_graph and ddp.gradient_as_bucket_view
    assert next(h for h in handlers if isinstance(h, InitProcessGroupKwargs)).timeout == timedelta(minutes=7)
    assert distributed.accelerator_kwargs(parse())["kwargs_handlers"] == []


@pytest.mark.parametrize("argv,message", [
    (["--ddp_timeout", "0"], "--ddp_timeout must be at least 1 minute"),
    (["--offload_optimizer_device", "cpu"], "--offload_optimizer_device configure DeepSpeed; add --deepspeed"),
    (["--zero3_init_flag", "--zero_stage", "3"], "--zero_stage, --zero3_init_flag configure DeepSpeed"),
    (["--deepspeed", "--blocks_to_swap", "4"], "--deepspeed with --blocks_to_swap"),
    (["--deepspeed", "--fused_backward_pass"], "--deepspeed with --fused_backward_pass"),
])  # fmt: skip
def test_bad_combinations_are_one_line_errors(argv, message):
    with pytest.raises(UserError, match=message.replace("-", "\\-")):
        distributed.check_distributed_args(parse(*argv))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_without_the_package_names_it():
    with pytest.raises(UserError, match="--deepspeed needs the deepspeed package: pip install deepspeed"):
        distributed.check_distributed_args(parse("--deepspeed"))


def test_offload_settings_are_checked_with_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else None)
    for argv, message in (
        (["--offload_optimizer_device", "nvme"], "--offload_optimizer_device nvme needs --offload_optimizer_nvme_path"),
        (["--offload_param_device", "cpu"], "--offload_param_device needs --zero_stage 3"),
        (["--offload_optimizer_device", "cpu", "--zero_stage", "1"], "--offload_optimizer_device needs --zero_stage"),
    ):
        with pytest.raises(UserError, match=message.replace("-", "\\-")):
            distributed.check_distributed_args(parse("--deepspeed", *argv))
    distributed.check_distributed_args(parse("--deepspeed", "--zero_stage", "3", "--offload_param_device", "cpu",
                                             "--offload_optimizer_device", "cpu"))  # fmt: skip


def test_without_a_launcher_deepspeed_gets_a_one_process_world(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")  # recorded, so the variables the test sets are removed afterwards
        monkeypatch.delenv(key)
    distributed.launch_environment()
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert int(os.environ["MASTER_PORT"]) > 0
    monkeypatch.setenv("WORLD_SIZE", "4")
    distributed.launch_environment()  # a launcher's values stay
    assert os.environ["WORLD_SIZE"] == "4"


def test_the_misconfigured_launch_and_ddp_with_swapped_trained_blocks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="WORLD_SIZE is 3 but accelerate sees one process"):
        distributed.check_launch(1)
    distributed.check_launch(3, blocks_to_swap=8)  # a LoRA with swap
    with pytest.raises(UserError, match="--blocks_to_swap with full fine-tuning on 3 processes"):
        distributed.check_launch(3, blocks_to_swap=8, full_model=True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.check_launch(1, blocks_to_swap=8, full_model=True)
