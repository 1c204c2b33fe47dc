"""Metadata written into trained files, as upstream writes it: ``ss_*`` training keys (train_network.py), the
``modelspec.*`` keys (SAI model spec 1.0.1, library/sai_model_spec.py) and the additional-networks hashes.
Every value is ``str(value)`` as upstream stores it, so an unset option reads "None". Secrets never enter it.
docs/metadata.md lists every key and where it comes from."""

from __future__ import annotations

import argparse
import base64
import datetime
import functools
import hashlib
import io
import json
import logging
import mimetypes
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import toml
import torch

from library.training.family import FamilySpec, ModelFamily

logger = logging.getLogger(__name__)

MODELSPEC_VERSION = "1.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
HASH_CHUNK = 16 * 1024 * 1024
LEGACY_HASH_OFFSET, LEGACY_HASH_SIZE = 0x100000, 0x10000  # webui's old model hash: 64 KiB read at 1 MiB
DEFAULT_MODELSPEC_RESOLUTION = (1024, 1024)  # upstream's modelspec.resolution without --resolution

# upstream options this suite rejects (library/training/args.py UNSUPPORTED), valued as upstream writes them unset
REJECTED_OPTION_KEYS: dict[str, object] = {
    "ss_v2": False, "ss_clip_skip": None, "ss_max_token_length": None, "ss_multires_noise_iterations": None,
    "ss_multires_noise_discount": 0.3, "ss_adaptive_noise_scale": None, "ss_zero_terminal_snr": False,
    "ss_min_snr_gamma": None, "ss_debiased_estimation": False,
}  # fmt: skip


def stringify(metadata: Mapping[str, object]) -> dict[str, str]:
    """safetensors metadata values must be strings: ``str(value)`` as upstream (None -> "None", True -> "True",
    1e-4 -> "0.0001", a tuple -> "(512, 512)"); values that upstream stores as JSON are JSON strings already."""
    return {key: value if isinstance(value, str) else str(value) for key, value in metadata.items()}


def legacy_model_hash(path: str | os.PathLike) -> str:
    """upstream's ``model_hash`` (webui's old hash): sha256 of the 64 KiB at 1 MiB, first 8 hex digits."""
    if Path(path).is_dir():
        return "IsADirectory"
    with open(path, "rb") as f:
        f.seek(LEGACY_HASH_OFFSET)
        return hashlib.sha256(f.read(LEGACY_HASH_SIZE)).hexdigest()[:8]


def file_sha256(path: str | os.PathLike) -> str:
    """upstream's ``calculate_sha256`` (webui's new hash): sha256 of the whole file, read in 16 MiB chunks."""
    path = Path(path)
    if path.is_dir():
        return "IsADirectory"
    size, started = path.stat().st_size, time.monotonic()
    if size > 1 << 30:
        logger.info("hashing %s (%.1f GB) for the metadata (sha256 of the whole file)", path.name, size / 1e9)
    digest, buffer = hashlib.sha256(), bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    if size > 1 << 30:
        logger.info("hashed %s in %.1f s", path.name, time.monotonic() - started)
    return digest.hexdigest()


def model_file_keys(path: str | None, kind: str) -> dict[str, str]:
    """``ss_{kind}_name`` and, for a path that exists, ``ss_{kind}_hash`` / ``ss_new_{kind}_hash`` (upstream's
    ``sd_model`` and ``vae`` keys): the file's name, or the value as given when it is not a path here."""
    if path is None:
        return {}
    if not os.path.exists(path):
        return {f"ss_{kind}_name": path}
    return {f"ss_{kind}_hash": legacy_model_hash(path), f"ss_new_{kind}_hash": file_sha256(path),
            f"ss_{kind}_name": os.path.basename(path)}  # fmt: skip


def additional_network_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-webui-additional-networks computes them over the file
    holding only the ``ss_*`` metadata: sha256 of the tensor data, and sha256 of 64 KiB at 1 MiB (8 chars)."""
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, training_only)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    stream = io.BytesIO(data)
    stream.seek(LEGACY_HASH_OFFSET)
    legacy_hash = hashlib.sha256(stream.read(LEGACY_HASH_SIZE)).hexdigest()[:8]
    return model_hash, legacy_hash


@functools.lru_cache(maxsize=1)
def source_commit() -> str | None:
    """This suite's git commit (``ss_sd_scripts_commit_hash``), or None outside a git checkout of it."""
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != REPO_ROOT:
        return None
    return lines[1]


@functools.lru_cache(maxsize=1)
def project_name() -> str:
    """This suite's name, from pyproject.toml."""
    try:
        return toml.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["name"]
    except (OSError, KeyError, toml.TomlDecodeError):
        return "unknown"


def implementation_version() -> str:
    """``modelspec.implementation_version``: ``<project>/<commit>`` (upstream writes ``sd-scripts/<commit>``)."""
    return f"{project_name()}/{source_commit() or 'unknown'}"


def modelspec_metadata(
    *,
    architecture: str,
    implementation: str,
    title: str,
    resolution: tuple[int, int],
    timestamp: float,
    prediction_type: str | None = None,
    timestep_range: tuple[int, int] | None = None,
    optional: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """upstream's ``build_metadata``: the required keys, the date, this suite's implementation version, and the
    optional fields (``author``, ``tags``, ``thumbnail`` ...) that are set."""
    values = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.implementation_version": implementation_version(),
    }
    if prediction_type is not None:
        values["modelspec.prediction_type"] = prediction_type
    if timestep_range is not None:
        values["modelspec.timestep_range"] = f"{timestep_range[0]},{timestep_range[1]}"
    for key, value in (optional or {}).items():
        if key == "thumbnail" and value is not None:
            value = _thumbnail_data_url(value)
        if value is not None:
            values[f"modelspec.{key}"] = str(value)
    return values


def saved_metadata(metadata: Mapping[str, str], *, steps: int, epoch: int, finished_at: float) -> dict[str, str]:
    """The metadata of one save: ``ss_steps``, ``ss_epoch``, ``ss_training_finished_at`` and ``modelspec.date``
    of this save, as upstream's ``save_model`` writes them. Empty metadata (--no_metadata) stays empty."""
    if not metadata:
        return {}
    out = dict(metadata, ss_training_finished_at=str(finished_at), ss_steps=str(steps), ss_epoch=str(epoch))
    if "modelspec.date" in out:
        out["modelspec.date"] = datetime.datetime.fromtimestamp(int(finished_at)).isoformat()
    return out


def network_metadata(args: argparse.Namespace, spec: FamilySpec, family: ModelFamily, group, optimizer_name: str,
                     steps: tuple[int, int], started: float, network, validation=None,
                     num_processes: int = 1) -> dict[str, str]:  # fmt: skip
    """Every ``ss_*`` key upstream's train_network.py writes for these options, then the family's own keys, the
    dataset's, ``ss_network_args``, the base model's name and hashes, and ``modelspec.*``. ``validation`` is the
    held-out group (validation_split) or None. --no_metadata: nothing at all."""
    if args.no_metadata:
        return {}
    meta = {
        **_training_keys(args, optimizer_name, steps, started, network, validation),
        **REJECTED_OPTION_KEYS, **family.metadata(), **spec.metadata(args),
        **_dataset_keys(args, group, num_processes),
    }  # fmt: skip
    if args.network_args:
        meta["ss_network_args"] = json.dumps(_network_kwargs(args))
    meta.update(model_file_keys(args.pretrained_model_name_or_path, "sd_model"))
    meta.update(model_file_keys(getattr(args, "vae", None), "vae"))
    return {**stringify(meta), **_modelspec(args, family, started)}


def _training_keys(args: argparse.Namespace, optimizer_name: str, steps: tuple[int, int], started: float, network,
                   validation) -> dict[str, object]:  # fmt: skip
    dim, alpha = args.network_dim, float(args.network_alpha) if args.network_alpha is not None else None
    if args.dim_from_weights:  # the dims (LoRA ranks, OFT blocks) came from the file: the largest and its alpha
        dim, alpha = network.largest_dim()
    face = args.face_crop_aug_range
    return {
        "ss_session_id": int(started * 1000) % 2**31, "ss_training_started_at": started,
        "ss_output_name": args.output_name, "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": args.text_encoder_lr, "ss_unet_lr": args.unet_lr,
        "ss_num_validation_images": validation.num_train_images if validation is not None else 0,
        "ss_num_epochs": steps[1], "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps, "ss_max_train_steps": steps[0],
        "ss_lr_warmup_steps": args.lr_warmup_steps, "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module, "ss_network_dim": dim, "ss_network_alpha": alpha,
        "ss_network_dropout": args.network_dropout, "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": bool(args.full_fp16), "ss_seed": args.seed, "ss_lowram": args.lowram,
        "ss_noise_offset": args.noise_offset, "ss_training_comment": args.training_comment,
        "ss_sd_scripts_commit_hash": source_commit() or "(unknown)", "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": args.max_grad_norm, "ss_caption_dropout_rate": args.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": args.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": args.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": tuple(float(v) for v in face.split(",")) if face is not None else None,
        "ss_scale_weight_norms": args.scale_weight_norms, "ss_ip_noise_gamma": args.ip_noise_gamma,
        "ss_noise_offset_random_strength": args.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": args.ip_noise_gamma_random_strength, "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule, "ss_huber_scale": args.huber_scale, "ss_huber_c": args.huber_c,
        "ss_fp8_base": bool(args.fp8_base), "ss_fp8_base_unet": bool(args.fp8_base_unet),
        "ss_validation_seed": args.validation_seed, "ss_validation_split": args.validation_split,
        "ss_max_validation_steps": args.max_validation_steps,
        "ss_validate_every_n_epochs": args.validate_every_n_epochs,
        "ss_validate_every_n_steps": args.validate_every_n_steps,
        "ss_resize_interpolation": args.resize_interpolation,
        "ss_weighting_scheme": args.weighting_scheme, "ss_logit_mean": args.logit_mean,
        "ss_logit_std": args.logit_std, "ss_mode_scale": args.mode_scale,
    }  # fmt: skip


def _dataset_keys(args: argparse.Namespace, group, num_processes: int) -> dict[str, object]:
    """The group's keys (image counts, ``ss_datasets`` ... with a dataset config; the flat folder-style keys
    otherwise, where upstream adds ``ss_total_batch_size``)."""
    keys = group.metadata()
    if "ss_batch_size_per_device" in keys:
        keys["ss_total_batch_size"] = args.train_batch_size * num_processes * args.gradient_accumulation_steps
    return keys


def _network_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """upstream's ``net_kwargs`` as it dumps them: ``key=value`` split once, and ``dropout`` (--network_dropout)
    added unless given or the ranks come from --dim_from_weights."""
    kwargs: dict[str, object] = {k: v for k, _, v in (entry.partition("=") for entry in args.network_args)}
    if not args.dim_from_weights and "dropout" not in kwargs:
        kwargs["dropout"] = args.network_dropout
    return kwargs


def full_model_metadata(args: argparse.Namespace, family: ModelFamily, group, started: float) -> dict[str, str]:
    """A fine-tuned checkpoint's metadata as upstream's fine-tuning scripts write it: modelspec only (none with
    --no_metadata)."""
    if args.no_metadata:
        return {}
    return _modelspec(args, family, started, adapter=None)


def controlnet_metadata(args: argparse.Namespace, family: ModelFamily, started: float) -> dict[str, str]:
    """A ControlNet's metadata: modelspec with the ``controlnet`` suffix (upstream mislabels it as the base model);
    none with --no_metadata."""
    if args.no_metadata:
        return {}
    return _modelspec(args, family, started, adapter="controlnet")


def _modelspec(args: argparse.Namespace, family: ModelFamily, started: float, adapter: str | None = "lora") -> dict[str, str]:
    architecture = family.modelspec_architecture(adapter)
    title = args.metadata_title if args.metadata_title is not None else args.output_name
    timesteps = None
    if args.min_timestep is not None or args.max_timestep is not None:
        timesteps = (args.min_timestep if args.min_timestep is not None else 0,
                     args.max_timestep if args.max_timestep is not None else 1000)  # fmt: skip
    optional = {key: getattr(args, f"metadata_{key}") for key in ("author", "description", "license", "tags",
                "usage_hint", "thumbnail", "merged_from", "trigger_phrase", "preprocessor")}  # fmt: skip
    optional["is_negative_embedding"] = "True" if args.metadata_is_negative_embedding else None
    return modelspec_metadata(
        architecture=architecture, implementation=family.modelspec_implementation(adapter),
        title=title if title is not None else f"{adapter or 'Checkpoint'}@{started}", resolution=_modelspec_resolution(args.resolution),
        timestamp=started, prediction_type=family.modelspec_prediction_type(),
        timestep_range=timesteps, optional=optional,
    )  # fmt: skip


def _modelspec_resolution(resolution: str | None) -> tuple[int, int]:
    """--resolution ("512" or "512,768") as upstream records it; without it, the family's default 1024x1024."""
    if resolution is None:
        return DEFAULT_MODELSPEC_RESOLUTION
    sides = [int(v) for v in str(resolution).split(",")]
    return (sides[0], sides[-1])


def _thumbnail_data_url(value: str) -> str | None:
    """--metadata_thumbnail as upstream stores it: a data URL as given, or a file read into one (missing: left out)."""
    if value.startswith("data:"):
        return value
    path = Path(value)
    if not path.is_file():
        logger.warning("--metadata_thumbnail %s: file not found; modelspec.thumbnail is left out", value)
        return None
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
