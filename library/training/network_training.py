"""Network (LoRA/OFT) training on any model family: the network plan for the shared recipe
(``library/training/recipe.py``): the network's options, continuing from a file, --base_weights, partial text
caching, its optimizer groups, target and metadata."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from library.data.dataset import add_dataset_args, add_validation_args
from library.errors import UserError
from library.io.safetensors_file import read_header
from library.training import args as training_args
from library.training.family import FamilySpec, LoadOptions, ModelFamily
from library.training.loop import TrainState
from library.training.metadata import network_metadata
from library.training.optimizer_step import StepKind
from library.training.recipe import run_training
from library.training.targets import NetworkOptions, NetworkTarget, import_network_module, trained_text_encoders
from networks.adapter import network_module_for_keys

logger = logging.getLogger(__name__)


def build_network_parser(spec: FamilySpec, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    for add in (
        spec.add_args, add_dataset_args, add_validation_args, training_args.add_objective_args,
        training_args.add_optimizer_args, training_args.add_training_args, training_args.add_saving_args,
        training_args.add_validation_loop_args, training_args.add_sample_args, training_args.add_logging_args,
        training_args.add_network_args, training_args.add_config_file_args, training_args.add_unsupported_args,
    ):  # fmt: skip
        add(parser)
    return parser


def _module_for_file(path: str, module: str, option: str) -> str:
    """The network module that reads ``path``: ``module``, or its OFT/LoRA counterpart when the file's keys are of
    the other kind."""
    return network_module_for_keys(read_header(path, option).tensors, module, f"{option} {path}")


def _create_network(options: NetworkOptions, family: ModelFamily):
    module = import_network_module(options.module)
    if options.weights and Path(options.weights).is_file():
        other = _module_for_file(options.weights, options.module, "--network_weights")
        if other != options.module:
            raise UserError(f"--network_weights {options.weights}: holds {other}'s weights, not {options.module}'s; "
                            f"continue it with --network_module {other}")  # fmt: skip
    encoders = family.text_encoders
    if options.dim_from_weights:
        network, _ = module.create_network_from_weights(
            1.0, options.weights, family.vae, encoders, family.denoiser, **options.args
        )
    else:
        network = module.create_network(1.0, options.dim, options.alpha, family.vae, encoders, family.denoiser,
                                        neuron_dropout=options.dropout, **options.args)  # fmt: skip
    network.apply_to(encoders, family.denoiser, options.train_text_encoder, options.train_unet)
    if options.weights:
        network.load_weights(options.weights)  # as upstream: modules not in the file start fresh (it logs the counts)
    return network


def _merge_base_weights(args: argparse.Namespace, options: NetworkOptions, family: ModelFamily) -> None:
    """--base_weights: LoRA (or OFT) files merged into the frozen base model (each at its --base_weights_multiplier,
    1.0 by default) before the new network is made, as upstream; each file is read by the network module of its kind
    (its keys), whichever --network_module trains."""
    if not args.base_weights:
        return
    multipliers = args.base_weights_multiplier or [1.0] * len(args.base_weights)
    if len(multipliers) != len(args.base_weights):
        raise UserError(f"--base_weights_multiplier: give one per --base_weights file ({len(args.base_weights)}), "
                        f"got {len(multipliers)}")  # fmt: skip
    for path in args.base_weights:
        if not Path(path).is_file():
            raise UserError(f"--base_weights {path}: file not found")
    modules = [import_network_module(_module_for_file(path, options.module, "--base_weights"))
               for path in args.base_weights]  # fmt: skip
    for swap in family.block_swaps:  # the merge reads and writes base weights that may be in flight
        swap.synchronize()
    with torch.random.fork_rng(devices=[]):  # building the merged networks must not move the training's random stream
        for path, multiplier, module in zip(args.base_weights, multipliers, modules):
            network, weights = module.create_network_from_weights(multiplier, path, family.vae, family.text_encoders,
                                                                  family.denoiser, for_inference=True)  # fmt: skip
            network.merge_to(family.text_encoders, family.denoiser, weights)
            logger.info("merged %s x %g into the base model", path, multiplier)


def _check_partial_caching(args: argparse.Namespace, family: ModelFamily, network) -> None:
    """Cached text outputs with a text-encoder network: the encoders that can run live do (their LoRA trains), the
    others' outputs come from the cache, as upstream; an encoder that can only be cached cannot train."""
    if not (args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk):
        return
    trained = trained_text_encoders(network)
    cached_only = sorted(trained - family.live_text_encoders)
    if cached_only:
        names = ", ".join(family.text_encoder_names[i] for i in cached_only)
        raise UserError(f"--cache_text_encoder_outputs caches {names}'s outputs, so its network modules cannot train; "
                        "remove the caching or train that encoder's LoRA without it")  # fmt: skip
    if trained:
        live = ", ".join(family.text_encoder_names[i] for i in sorted(trained))
        logger.info("partial caching: %s run for every batch (their LoRA trains); the other text encoders' outputs "
                    "come from the cache", live)  # fmt: skip


class NetworkPlan:
    """A LoRA/OFT network (``--network_module``) attached to the family's denoiser and text encoders."""

    tracker_name = "network_train"
    estimates_memory = True
    full_model = False
    device_placement = True

    def __init__(self) -> None:
        self.options: NetworkOptions | None = None
        self.max_norm: float | None = None
        self.family: ModelFamily | None = None
        self.spec: FamilySpec | None = None
        self.control_hints = False

    def check_args(self, args: argparse.Namespace, spec: FamilySpec) -> None:
        self.spec, self.max_norm = spec, args.scale_weight_norms
        self.control_hints = bool(args.controlnet_model_name_or_path)
        if self.control_hints:  # the dataset's conditioning images are the ControlNet's hints, not loss masks
            args.dataset_conditioning = "control"
        self.options = NetworkOptions.from_cli(
            args.network_module, args.network_dim, args.network_alpha, args.network_dropout, args.network_args,
            args.network_weights, args.dim_from_weights, args.network_train_unet_only,
            args.network_train_text_encoder_only, example_module=spec.network_module,
        )  # fmt: skip

    @property
    def trains_text_encoders(self) -> bool:
        return self.options.train_text_encoder

    def load_options(self, args: argparse.Namespace, options: LoadOptions) -> LoadOptions:
        return options

    def step_kind(self, args: argparse.Namespace, num_processes: int) -> StepKind:
        return StepKind.PLAIN

    def build(self, args: argparse.Namespace, family: ModelFamily) -> tuple[nn.Module, list[tuple[str, list]]]:
        _merge_base_weights(args, self.options, family)
        if self.control_hints:  # a LoRA trained alongside a frozen ControlNet, as upstream's docs describe
            family.attach_controlnet(self.spec.make_controlnet(args, family, trained=False))
        network = _create_network(self.options, family)
        if self.max_norm and not hasattr(network, "apply_max_norm_regularization"):
            raise UserError(f"--scale_weight_norms: {self.options.module} has no max-norm regularization (OFT bounds "
                            "its rotations with --network_alpha instead); remove the option")  # fmt: skip
        _check_partial_caching(args, family, network)
        if args.full_bf16 or args.full_fp16:  # the network's weights (and so its gradients) in that dtype, as upstream
            network.to(torch.bfloat16 if args.full_bf16 else torch.float16)
        params, _ = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
        self.family = family
        return network, [("network", params)]

    def target(self, module: nn.Module, prepared: nn.Module, save_dtype: torch.dtype | None) -> NetworkTarget:
        """The text encoders train only when the network has modules in them (OFT has none: cached or encoded text
        without gradients, even without --network_train_unet_only)."""
        trains_text = self.options.train_text_encoder and bool(module.text_encoder_adapters)
        return NetworkTarget(module, trains_text, save_dtype, prepared, self.max_norm, self.family.block_swaps)

    def metadata(self, args, spec, family, groups, optimizer_name, steps, started, module, num_processes):
        held_out = groups[1] if len(groups) > 1 else None
        return network_metadata(args, spec, family, groups[0], optimizer_name, steps, started, module, held_out,
                                num_processes)  # fmt: skip

    def describe(self, module: nn.Module) -> str:
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        return f"a network of {len(module.adapters)} {module.KIND} modules ({trainable} trainable parameters)"


def run_network_training(args: argparse.Namespace, spec: FamilySpec) -> TrainState:
    return run_training(args, spec, NetworkPlan())
