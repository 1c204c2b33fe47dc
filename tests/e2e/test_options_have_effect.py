"""No accepted option without an effect: every option the training parsers accept is read by the code that runs,
unless it is rejected with a reason, accepted because it is what the suite always does (ALWAYS_ON), or has only
one possible value (FIXED_CHOICE). A real run records which options the code reads; options read only on a
branch this run does not take (another tracker, another family's model files) must appear as ``args.<name>``."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from library.training import args as training_args
from library.training.families.flux import FLUX
from library.training.families.sd3 import SD3
from library.training.network_training import build_network_parser, run_network_training
from tests.e2e.test_flux_train_network import model_args, tiny_dataset
from tests.helpers import REPO

SOURCES = [p for folder in ("library", "networks") for p in (REPO / folder).rglob("*.py")] + list(REPO.glob("*.py"))


class RecordingNamespace(argparse.Namespace):
    """A namespace that remembers every option read from it."""

    def __getattribute__(self, name: str):
        if not name.startswith("_"):
            object.__getattribute__(self, "__dict__").setdefault("_read", set()).add(name)
        return object.__getattribute__(self, name)


def _not_checked(parser: argparse.ArgumentParser) -> set[str]:
    return {"help", *training_args.rejected_options(parser), *training_args.ALWAYS_ON, *training_args.FIXED_CHOICE}


def _read_in_code(option: str) -> bool:
    pattern = re.compile(rf"\bargs\.{option}\b")
    return any(pattern.search(path.read_text(encoding="utf-8")) for path in SOURCES)


def test_every_flux_option_is_read(tiny_models, tmp_path):
    parser = build_network_parser(FLUX, "")
    config = tiny_dataset(tmp_path)
    argv = [*model_args(tiny_models), "--dataset_config", str(config), "--output_dir", str(tmp_path / "out"),
            "--network_module", "networks.lora_flux", "--max_train_steps", "2", "--t5xxl_max_token_length", "16",
            "--validation_split", "0.25", "--log_with", "tensorboard", "--logging_dir", str(tmp_path / "logs"),
            "--sample_prompts", str(REPO / "examples" / "tiny_prompts.txt"), "--sample_every_n_steps", "2",
            "--save_every_n_steps", "1", "--cache_latents", "--network_train_unet_only"]  # fmt: skip
    args = RecordingNamespace()
    parser.parse_args(argv, namespace=args)
    args.__dict__["_read"] = set()
    run_network_training(args, FLUX)
    read = args.__dict__["_read"]
    unread = sorted(a.dest for a in parser._actions if a.dest not in read and a.dest not in _not_checked(parser))
    never = [option for option in unread if not _read_in_code(option)]
    assert not never, f"accepted but never read: {never}"


@pytest.mark.parametrize("spec", [FLUX, SD3], ids=["flux", "sd3"])
def test_every_option_appears_where_it_is_read(spec):
    """The static half, for every family: options the run above cannot reach (the other family's files, wandb)."""
    parser = build_network_parser(spec, "")
    dataset_keys = set(_dataset_fallback_options())
    checked = [a.dest for a in parser._actions if a.dest not in _not_checked(parser) | dataset_keys]
    never = [option for option in checked if not _read_in_code(option) and not option.startswith("metadata_")]
    assert not never, f"accepted but never read: {never}"


def _dataset_fallback_options() -> list[str]:
    """Dataset options are read by name as fallbacks for dataset-config keys (library/data/dataset.py)."""
    from library.data.config import command_line_fallback_keys
    from library.data.dataset import _OPTION_TO_KEY

    keys = set(command_line_fallback_keys())
    return [option for option, key in _OPTION_TO_KEY.items() if key in keys] + sorted(keys)


def test_the_static_check_catches_an_unread_option():
    assert _read_in_code("wandb_run_name") and not _read_in_code("an_option_nothing_reads")
    assert Path(SOURCES[0]).is_file()
