"""Options and entry points of the extract and merge scripts, one parser per tool with upstream's option names;
each family adds its text-encoder options (``--clip_l``, ``--clip_g``, ``--t5xxl`` and their ``_save_to``,
``_org``, ``_tuned`` forms)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from library.dtypes import parse_dtype
from library.errors import UserError
from library.logging_setup import setup_logging
from library.models.layouts import DENOISER, ENCODER_TITLES, CheckpointFile, open_encoder_file
from networks.convert_lora_common import check_output_path
from networks.lora_tools.extract import ExtractSettings, PartPair, extract_lora
from networks.lora_tools.families import ToolFamily
from networks.lora_tools.lora_files import LORA_DTYPES, LoRAFile, check_family, read_lora, save_checkpoint, save_lora
from networks.lora_tools.merge import Devices, MergeTarget, concat_loras, merged_items, plan_merge
from networks.lora_tools.metadata import extracted_lora_metadata, merged_checkpoint_metadata, merged_lora_metadata

logger = logging.getLogger(__name__)

OVERWRITE_HELP = "replace output files that already exist (without it, an existing output is an error)"


def _add_common_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no_metadata", action="store_true",
                        help="do not save sai modelspec metadata (the minimal ss_* keys of a LoRA are still saved)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


# ---- extract ----------------------------------------------------------------------------------------------------


def extract_parser(family: ToolFamily, description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_org", required=True, help=f"original {family.title} model (.safetensors)")
    parser.add_argument("--model_tuned", required=True,
                        help="tuned model; the LoRA is the difference original -> tuned (.safetensors)")  # fmt: skip
    parser.add_argument("--save_to", required=True, help="the LoRA file to write (.safetensors)")
    parser.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    if family.arch.conv_args:
        parser.add_argument("--conv_dim", type=int, default=None,
                            help="rank of Conv2d layers larger than 1x1 (the patch embedder; default: --dim)")  # fmt: skip
    parser.add_argument("--device", default=None, help="device for the SVD, e.g. cuda (default: cpu)")
    parser.add_argument("--save_precision", default=None, choices=[None, "float", "fp16", "bf16"],
                        help="precision of the saved LoRA (default: float)")  # fmt: skip
    parser.add_argument("--clamp_quantile", type=float, default=0.99,
                        help="clamp both factors at this quantile of their absolute values, (0, 1]; 1 clamps "
                        "nothing (default 0.99)")  # fmt: skip
    parser.add_argument("--mem_eff_safe_open", action="store_true",
                        help="accepted for compatibility: the models are always read one tensor at a time")  # fmt: skip
    for name in family.encoders:
        title = ENCODER_TITLES[name]
        parser.add_argument(f"--{name}_org", default=None,
                            help=f"original {title} (default: the one bundled in --model_org, if any)")  # fmt: skip
        parser.add_argument(f"--{name}_tuned", default=None, help=f"tuned {title}, with --{name}_org")
    _add_common_output_args(parser)
    return parser


def _encoder_pairs(family: ToolFamily, args: argparse.Namespace, org: CheckpointFile,
                   tuned: CheckpointFile) -> list[PartPair]:  # fmt: skip
    """Text encoders from --<name>_org/--<name>_tuned, else the ones both models bundle."""
    pairs = []
    for name in family.encoders:
        org_path, tuned_path = getattr(args, f"{name}_org"), getattr(args, f"{name}_tuned")
        if (org_path is None) != (tuned_path is None):
            raise UserError(f"--{name}_org and --{name}_tuned go together; give both or neither")
        if org_path is not None:
            org_file = open_encoder_file(org_path, name, f"--{name}_org")
            tuned_file = open_encoder_file(tuned_path, name, f"--{name}_tuned")
            pairs.append(PartPair(org_file, org_file.parts[name], tuned_file, tuned_file.parts[name]))
        elif name in org.parts and name in tuned.parts:
            pairs.append(PartPair(org, org.parts[name], tuned, tuned.parts[name]))
        elif name in org.parts or name in tuned.parts:
            logger.info(f"{ENCODER_TITLES[name]}: bundled in only one of --model_org and --model_tuned; not extracted "
                        f"(give --{name}_org and --{name}_tuned)")  # fmt: skip
    return pairs


def run_extract(family: ToolFamily, args: argparse.Namespace) -> None:
    save_to = Path(args.save_to)
    check_output_path(save_to, args.overwrite, "--save_to")
    settings = ExtractSettings(
        dim=args.dim, conv_dim=getattr(args, "conv_dim", None), clamp_quantile=args.clamp_quantile,
        device=args.device or "cpu", save_dtype=parse_dtype(args.save_precision, "--save_precision", torch.float32),
    )  # fmt: skip
    org = family.open_model(args.model_org, "--model_org")
    tuned = family.open_model(args.model_tuned, "--model_tuned")
    pairs = [PartPair(org, org.parts[DENOISER], tuned, tuned.parts[DENOISER]), *_encoder_pairs(family, args, org,
                                                                                                 tuned)]  # fmt: skip
    logger.info(f"extracting a rank-{settings.dim} LoRA: {org.path} ({org.describe()}) -> {tuned.path}")
    tensors, ranks = extract_lora(family, pairs, settings)
    sources = {"model_org": org.path, "model_tuned": tuned.path}
    for pair in pairs[1:]:
        if pair.org_file is not org:
            sources[f"{pair.org.name}_org"] = pair.org_file.path
            sources[f"{pair.org.name}_tuned"] = pair.tuned_file.path
    network_args = {"conv_dim": settings.conv_dim, "conv_alpha": settings.conv_dim} if settings.conv_dim else {}
    metadata = extracted_lora_metadata(family, org.parts[DENOISER].params, save_to, sources, [settings.dim],
                                       network_args, settings.clamp_quantile, args.no_metadata)  # fmt: skip
    save_lora(save_to, tensors, metadata)
    logger.info(f"saved {len(ranks)} LoRA modules (ranks {min(ranks)}-{max(ranks)}) to {save_to}")


def extract_main(family: ToolFamily, description: str | None, argv: list[str] | None = None) -> None:
    setup_logging()
    run_extract(family, extract_parser(family, description).parse_args(argv))


# ---- merge ------------------------------------------------------------------------------------------------------


def merge_parser(family: ToolFamily, description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(family.model_option, default=None,
                        help=f"{family.title} model to merge into; without it (and without text encoders) the "
                        "LoRAs are merged into one LoRA")  # fmt: skip
    for name in family.encoders:
        parser.add_argument(f"--{name}", default=None, help=f"{ENCODER_TITLES[name]} to merge into (.safetensors)")
    parser.add_argument("--save_to", default=None, help="output file: the merged model, or the merged LoRA")
    for name in family.encoders:
        parser.add_argument(f"--{name}_save_to", default=None, help=f"output file for --{name}")
    parser.add_argument("--models", nargs="*", default=None, help="LoRA files to merge (.safetensors)")
    parser.add_argument("--ratios", type=float, nargs="*", default=None,
                        help="one ratio per LoRA (default: 1.0 for each)")  # fmt: skip
    parser.add_argument("--precision", default="float",
                        help="dtype the weights are merged in (default float; LoRAs are read in it)")  # fmt: skip
    parser.add_argument("--save_precision", default=None,
                        help="dtype of the saved float tensors: fp32, fp16, bf16, fp8 (default: each tensor's own "
                        "dtype in the checkpoint, or the first LoRA's)")  # fmt: skip
    parser.add_argument("--loading_device", default="cpu", help="device the checkpoint tensors are read to")
    parser.add_argument("--working_device", default="cpu", help="device the merge is computed on, e.g. cuda")
    parser.add_argument("--mem_eff_load_save", action="store_true",
                        help="accepted for compatibility: models are always read, merged and written tensor by "
                        "tensor (RAM: about one tensor, not the checkpoint)")  # fmt: skip
    parser.add_argument("--concat", action="store_true",
                        help="accepted for compatibility: LoRAs merged into one LoRA are always concatenated (rank = "
                        "the sum of ranks), which keeps each LoRA's delta exactly")  # fmt: skip
    parser.add_argument("--shuffle", action="store_true", help="shuffle the rank dimension of a merged LoRA")
    parser.add_argument("--diffusers", action="store_true",
                        help="accepted for compatibility: diffusers/PEFT LoRAs (lora_A/lora_B keys) are recognised "
                        "by their keys")  # fmt: skip
    _add_common_output_args(parser)
    return parser


def _ratios(args: argparse.Namespace) -> list[float]:
    models = args.models or []
    if not models:
        raise UserError("--models: give the LoRA files to merge")
    if args.ratios is None:
        return [1.0] * len(models)
    if len(args.ratios) != len(models):
        raise UserError(f"--models and --ratios: {len(models)} LoRA files but {len(args.ratios)} ratios; give one "
                        "ratio per file")  # fmt: skip
    return list(args.ratios)


@dataclass(frozen=True)
class Output:
    """A model given to merge into (``part``: DENOISER or an encoder name) and where the result goes."""

    part: str
    option: str  # "--flux_model", "--clip_l" ...
    path: str
    save_option: str  # "--save_to", "--clip_l_save_to" ...
    save_to: Path


def _outputs(family: ToolFamily, args: argparse.Namespace) -> list[Output]:
    """The models given, each with its output; an input without output (or the reverse) is a UserError."""
    outputs = []
    for part, option, save_option in [(DENOISER, family.model_option, "--save_to"),
                                      *((n, f"--{n}", f"--{n}_save_to") for n in family.encoders)]:  # fmt: skip
        path, save_to = getattr(args, option[2:]), getattr(args, save_option[2:])
        if path is None and save_to is not None and part != DENOISER:
            raise UserError(f"{save_option} {save_to}: give {option}, the model to merge into")
        if path is not None:
            if save_to is None:
                raise UserError(f"{option} {path}: give {save_option}, where the merged model is written")
            outputs.append(Output(part, option, path, save_option, Path(save_to)))
    if outputs and outputs[0].part != DENOISER and args.save_to is not None:
        raise UserError(f"--save_to {args.save_to}: the output of {family.model_option}, which is not given (the "
                        "text encoders are written to their --<name>_save_to)")  # fmt: skip
    return outputs


def run_merge(family: ToolFamily, args: argparse.Namespace) -> None:
    ratios = _ratios(args)
    merge_dtype = parse_dtype(args.precision, "--precision")
    if merge_dtype not in LORA_DTYPES:
        raise UserError(f"--precision {args.precision}: merge in fp32 (float), fp16 or bf16")
    save_dtype = parse_dtype(args.save_precision, "--save_precision")
    outputs = _outputs(family, args)
    if outputs:
        paths = [o.save_to for o in outputs]
        if len(set(paths)) != len(paths):
            raise UserError(f"the output files must differ: {', '.join(map(str, paths))}")
        for output in outputs:
            check_output_path(output.save_to, args.overwrite, output.save_option)
    elif args.save_to is None:
        raise UserError("--save_to: give the file the merged LoRA is written to")
    else:
        check_output_path(Path(args.save_to), args.overwrite, "--save_to")
    targets = [_open_target(family, output) for output in outputs]
    loras = [read_lora(family, path, ratio, merge_dtype) for path, ratio in zip(args.models, ratios)]
    for lora in loras:
        check_family(family, lora)
    if not targets:
        _merge_loras(family, args, loras, merge_dtype, save_dtype, Path(args.save_to))
        return
    if args.shuffle:
        logger.warning("--shuffle: only for merging LoRAs into one LoRA; no effect when merging into a model")
    plan_merge(family, targets, loras)
    devices = Devices(args.loading_device, args.working_device)
    for target in targets:
        denoiser = target.file.parts.get(DENOISER)
        title = target.file.metadata.get("modelspec.title") or target.file.path.stem
        metadata = merged_checkpoint_metadata(family, target.file.metadata, denoiser.params if denoiser else None,
                                              title, loras, target.save_to, args.no_metadata)  # fmt: skip
        items = merged_items(target, merge_dtype, save_dtype, devices)
        save_checkpoint(target.save_to, items, metadata)
        logger.info(f"saved {target.save_to}: {len(items)} tensors, {len(target.updates)} changed by "
                    f"{target.merged_modules} LoRA modules")  # fmt: skip


def _open_target(family: ToolFamily, output: Output) -> MergeTarget:
    if output.part == DENOISER:
        file = family.open_model(output.path, output.option)
    else:
        file = open_encoder_file(output.path, output.part, output.option)
    logger.info(f"{output.option} {output.path}: {file.describe()}")
    return MergeTarget(file, output.save_to)


def _merge_loras(family: ToolFamily, args: argparse.Namespace, loras: list[LoRAFile], merge_dtype: torch.dtype,
                 save_dtype: torch.dtype | None, save_to: Path) -> None:  # fmt: skip
    dtype = save_dtype or loras[0].stored_dtype
    if dtype not in LORA_DTYPES:
        raise UserError(f"--save_precision {args.save_precision}: a LoRA is saved in fp32, fp16 or bf16")
    tensors, ranks = concat_loras(loras, merge_dtype, args.shuffle)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    metadata = merged_lora_metadata(family, loras, ranks, save_to, args.no_metadata)
    save_lora(save_to, tensors, metadata)
    logger.info(f"saved {save_to}: {len(ranks)} modules from {len(loras)} LoRAs concatenated (ranks "
                f"{min(ranks)}-{max(ranks)}, alpha = rank), {str(dtype).removeprefix('torch.')}")  # fmt: skip


def merge_main(family: ToolFamily, description: str | None, argv: list[str] | None = None) -> None:
    setup_logging()
    run_merge(family, merge_parser(family, description).parse_args(argv))
