"""Multi-process training: how the accelerator is made (DDP options, DeepSpeed), launch checks, and the module
every trained forward runs through.

Gradients are averaged by DDP itself, once per optimizer step, whatever the target is (a LoRA that patches the
base model's forward, the full denoiser, a ControlNet): the loop computes each batch's loss inside
``TrainedModules.forward``, so the DDP wrapper's forward always runs and its reducer always sees the backward.

Launching two CPU processes for testing: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2
script.py ...`` (or ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 script.py ...``). ``accelerate launch --cpu
--num_processes 2`` starts a single process.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from library.errors import UserError

logger = logging.getLogger(__name__)

CPU_LAUNCH = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N script.py ..."
DEEPSPEED_OPTIONS = ("zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
                     "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                     "fp16_master_weights_and_gradients")  # fmt: skip


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-GPU (DDP) and DeepSpeed")
    g.add_argument("--ddp_timeout", type=int, default=None,
                   help="minutes the processes wait for each other (torch's default: 30)")  # fmt: skip
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true",
                   help="DDP's gradient_as_bucket_view: gradients share the all-reduce buckets' memory")  # fmt: skip
    g.add_argument("--ddp_static_graph", action="store_true",
                   help="DDP's static_graph: the same parameters are used in every step")  # fmt: skip
    g.add_argument("--ddp_check_sync", action="store_true",
                   help="after every step, check that all processes hold bit-identical trained weights (a checksum "
                   "each; stops with an error otherwise)")  # fmt: skip
    g.add_argument("--deepspeed", action="store_true", help="train through DeepSpeed (pip install deepspeed)")
    g.add_argument("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (2)")
    g.add_argument("--offload_optimizer_device", default=None, choices=[None, "cpu", "nvme"],
                   help="DeepSpeed: where the optimizer state lives (ZeRO 2/3)")  # fmt: skip
    g.add_argument("--offload_optimizer_nvme_path", default=None, help="DeepSpeed: folder for nvme optimizer offload")
    g.add_argument("--offload_param_device", default=None, choices=[None, "cpu", "nvme"],
                   help="DeepSpeed: where the parameters live (ZeRO 3)")  # fmt: skip
    g.add_argument("--offload_param_nvme_path", default=None, help="DeepSpeed: folder for nvme parameter offload")
    g.add_argument("--zero3_init_flag", action="store_true", help="DeepSpeed ZeRO 3: build models partitioned")
    g.add_argument("--zero3_save_16bit_model", action="store_true",
                   help="DeepSpeed ZeRO 3: gather a 16-bit model when saving")  # fmt: skip
    g.add_argument("--fp16_master_weights_and_gradients", action="store_true",
                   help="DeepSpeed with fp16, ZeRO 2 and CPU optimizer offload: fp16 master weights and gradients")  # fmt: skip


def check_distributed_args(args: argparse.Namespace) -> None:
    """Option checks before anything loads: DeepSpeed's options need --deepspeed and the package."""
    if args.ddp_timeout is not None and args.ddp_timeout < 1:
        raise UserError(f"--ddp_timeout must be at least 1 minute, got {args.ddp_timeout}")
    if not args.deepspeed:
        given = [f"--{name}" for name in DEEPSPEED_OPTIONS if getattr(args, name) not in (None, False, 2)]
        if given:
            raise UserError(f"{', '.join(given)} configure DeepSpeed; add --deepspeed or remove them")
        return
    for option in ("fused_backward_pass", "blockwise_fused_optimizers"):
        if getattr(args, option, None):
            raise UserError(f"--deepspeed with --{option}: DeepSpeed steps its own optimizer; drop one of them")
    if getattr(args, "blocks_to_swap", None):
        raise UserError("--deepspeed with --blocks_to_swap: DeepSpeed places the whole model itself; use its "
                        "--offload_param_device / --offload_optimizer_device instead")  # fmt: skip
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("--deepspeed needs the deepspeed package: pip install deepspeed (see README, multi-GPU)")
    for device, path, name in ((args.offload_optimizer_device, args.offload_optimizer_nvme_path, "optimizer"),
                               (args.offload_param_device, args.offload_param_nvme_path, "param")):  # fmt: skip
        if device == "nvme" and not path:
            raise UserError(f"--offload_{name}_device nvme needs --offload_{name}_nvme_path (a folder on the drive)")
    if args.offload_param_device and args.zero_stage != 3:
        raise UserError(f"--offload_param_device needs --zero_stage 3 (got {args.zero_stage})")
    if args.offload_optimizer_device and args.zero_stage < 2:
        raise UserError(f"--offload_optimizer_device needs --zero_stage 2 or 3 (got {args.zero_stage})")


def launch_environment() -> None:
    """DeepSpeed reads the launcher's variables; a plain ``python script.py --deepspeed`` gets a one-process world
    (upstream raises KeyError on WORLD_SIZE)."""
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def accelerator_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator``: DDP's options and, with --deepspeed, the DeepSpeed plugin."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers: list = []
    if args.ddp_gradient_as_bucket_view or args.ddp_static_graph:
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=args.ddp_gradient_as_bucket_view,
                                                      static_graph=args.ddp_static_graph))  # fmt: skip
    if args.ddp_timeout:
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout)))
    kwargs: dict[str, Any] = {"kwargs_handlers": handlers}
    if args.deepspeed:
        launch_environment()
        kwargs["deepspeed_plugin"] = deepspeed_plugin(args)
    return kwargs


def deepspeed_plugin(args: argparse.Namespace):
    """accelerate's DeepSpeedPlugin from upstream's options (micro batch = the dataset's batch size per device)."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(
        zero_stage=args.zero_stage, gradient_accumulation_steps=args.gradient_accumulation_steps,
        gradient_clipping=args.max_grad_norm, offload_optimizer_device=args.offload_optimizer_device,
        offload_optimizer_nvme_path=args.offload_optimizer_nvme_path, offload_param_device=args.offload_param_device,
        offload_param_nvme_path=args.offload_param_nvme_path, zero3_init_flag=args.zero3_init_flag,
        zero3_save_16bit_model=args.zero3_save_16bit_model,
    )  # fmt: skip
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = max(1, int(getattr(args, "train_batch_size", None) or 1))
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
    plugin.deepspeed_config["train_batch_size"] = micro * args.gradient_accumulation_steps * world
    plugin.set_mixed_precision(args.mixed_precision)
    if args.mixed_precision == "fp16":
        plugin.deepspeed_config["fp16"]["initial_scale_power"] = 0
        if args.full_fp16 or args.fp16_master_weights_and_gradients:
            if args.offload_optimizer_device == "cpu" and args.zero_stage == 2:
                plugin.deepspeed_config["fp16"]["fp16_master_weights_and_grads"] = True
            else:
                logger.warning("--fp16_master_weights_and_gradients works with --zero_stage 2 and "
                               "--offload_optimizer_device cpu only; ignored")  # fmt: skip
    return plugin


def check_launch(num_processes: int, *, blocks_to_swap: int = 0, full_model: bool = False) -> None:
    """A launch whose processes would each train alone (``WORLD_SIZE`` > 1 while accelerate sees one process) stops
    with the launch that works; so does DDP with block swap of trained blocks."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and num_processes == 1:
        raise UserError(f"WORLD_SIZE is {world} but accelerate sees one process, so each process would train alone "
                        "and write the same files. On GPUs launch with `accelerate launch --multi_gpu "
                        f"--num_processes {world} ...`; on CPUs with `{CPU_LAUNCH.replace('N', str(world))}` (or "
                        "set ACCELERATE_USE_CPU=1 before torchrun)")  # fmt: skip
    if num_processes > 1 and blocks_to_swap and full_model:
        raise UserError(f"--blocks_to_swap with full fine-tuning on {num_processes} processes: DDP cannot hold a "
                        "model whose blocks move between the CPU and the GPU; train on one process, or train a "
                        "LoRA (block swap works with DDP there)")  # fmt: skip


class TrainedModules(nn.Module):
    """The trained module, wrapped so that each training forward goes through accelerate's wrapper (DDP or
    DeepSpeed): ``forward(fn)`` runs ``fn()``, the batch's loss. Its state dict is the inner module's, so saved
    states keep the inner module's keys."""

    def __init__(self, module: nn.Module, device_type: str):
        super().__init__()
        self.inner = module
        self.device_type = device_type

    def forward(self, fn: Callable[[], Any]) -> Any:
        # accelerate runs a prepared module's forward under mixed-precision autocast; the loss keeps its own
        # (autocast around the model's prediction only)
        with torch.autocast(self.device_type, enabled=False):
            return fn()

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.inner.load_state_dict(state_dict, strict=strict, assign=assign)


def weights_checksum(module: nn.Module) -> str:
    """A checksum of the trained (requires_grad) parameters' bytes."""
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_in_sync(accelerator, module: nn.Module, step: int) -> None:
    """--ddp_check_sync: UserError unless every process's trained weights are bit-identical after ``step``."""
    from accelerate.utils import gather_object

    checksums = gather_object([weights_checksum(module)])
    if len(set(checksums)) != 1:
        raise UserError(f"after step {step} the {len(checksums)} processes' trained weights differ "
                        f"({', '.join(c[:12] for c in checksums)}); please report this with your command")  # fmt: skip
    if accelerator.is_main_process:
        logger.info("step %d: the %d processes' trained weights are identical (%s)", step, len(checksums),
                    checksums[0][:12])  # fmt: skip
