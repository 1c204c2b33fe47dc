from __future__ import annotations

import argparse

import pytest
import toml

from library.errors import UserError
from library.training import args as training_args


def _parser() -> argparse.ArgumentParser:
    from library.training.families.flux import FLUX
    from library.training.network_training import build_network_parser

    return build_network_parser(FLUX, "test")


def test_config_file_values_and_command_line_wins(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        toml.dumps(
            {
                "model": {"pretrained_model_name_or_path": "flux.safetensors", "apply_t5_attn_mask": True},
                "train": {
                    "learning_rate": 1e-4,
                    "network_args": ["img_attn_dim=4", "verbose=True"],
                    "max_train_steps": 50,
                },
                "timestep_sampling": "shift",
            }
        )
    )
    args = training_args.parse_args_with_config(_parser(), ["--config_file", str(config), "--learning_rate", "3e-4"])
    assert args.pretrained_model_name_or_path == "flux.safetensors"
    assert args.apply_t5_attn_mask is True
    assert args.learning_rate == 3e-4  # command line wins
    assert args.max_train_steps == 50 and args.timestep_sampling == "shift"
    assert args.network_args == ["img_attn_dim=4", "verbose=True"]
    assert args.loss_type == "l2"  # untouched default


@pytest.mark.parametrize(
    "content,message",
    [
        ({"learning_rat": 1e-4}, "unknown option 'learning_rat'"),
        ({"timestep_sampling": "cubic"}, "invalid choice"),
        ({"gradient_checkpointing": "yes"}, "'gradient_checkpointing' must be true or false"),
        ({"v2": True}, "'v2' is for SD 2.x models"),
    ],
)
def test_config_file_mistakes(tmp_path, content, message, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(toml.dumps(content))
    with pytest.raises((UserError, SystemExit)) as error:
        training_args.parse_args_with_config(_parser(), ["--config_file", str(config)])
    text = str(error.value) if error.type is UserError else capsys.readouterr().err
    assert message in text


def test_output_config_writes_non_defaults_without_secrets(tmp_path):
    config = tmp_path / "out.toml"
    argv = ["--config_file", str(config), "--output_config", "--learning_rate", "1e-4", "--wandb_api_key", "SECRET"]
    with pytest.raises(SystemExit) as done:
        training_args.parse_args_with_config(_parser(), argv)
    assert done.value.code == 0
    written = toml.loads(config.read_text())
    assert written == {"learning_rate": 1e-4}
    with pytest.raises(UserError, match="already exists"):
        training_args.parse_args_with_config(_parser(), argv)


def test_unsupported_upstream_flag_is_an_error():
    with pytest.raises(UserError, match="--xformers is not used: attention runs through PyTorch SDPA"):
        _parser().parse_args(["--xformers"])


@pytest.mark.parametrize("text,value", [("100", 100), ("0.1", 0.1), ("10%", 0.1)])
def test_int_or_float(text, value):
    assert training_args.int_or_float(text) == pytest.approx(value)


def test_every_upstream_option_is_accepted_or_rejected_with_a_reason():
    """The inventory of upstream's flux_train_network.py options: each one parses here or is an explicit error."""
    from pathlib import Path

    inventory = Path(__file__).resolve().parents[2] / "docs" / "reference" / "upstream_flux_train_network_options.txt"
    upstream = {line.split()[0][2:] for line in inventory.read_text().splitlines() if line.startswith("--")}
    parser = _parser()
    ours = {action.dest for action in parser._actions}
    missing = sorted(upstream - ours)
    assert not missing, f"upstream options neither supported nor rejected: {missing}"
    rejected = training_args.rejected_options(parser)
    assert "vae" in rejected and "v2" in rejected  # the family's and the shared tables
    for name in sorted(upstream & set(rejected)):
        with pytest.raises(UserError, match=f"--{name} "):
            parser.parse_args([f"--{name}"])


@pytest.mark.parametrize(
    "inventory,family,recipe",
    [
        ("upstream_sd3_train_network_options.txt", "sd3", "network"),
        ("upstream_flux_train_options.txt", "flux", "full"),
        ("upstream_sd3_train_options.txt", "sd3", "full"),
    ],
)
def test_every_upstream_option_of_each_script_is_accepted_or_rejected(inventory, family, recipe):
    """The same inventory check for sd3_train_network.py, flux_train.py and sd3_train.py."""
    from pathlib import Path

    from library.training.families.flux import FLUX
    from library.training.families.sd3 import SD3
    from library.training.full_training import build_full_parser
    from library.training.network_training import build_network_parser

    spec = {"flux": FLUX, "sd3": SD3}[family]
    parser = (build_network_parser if recipe == "network" else build_full_parser)(spec, "test")
    path = Path(__file__).resolve().parents[2] / "docs" / "reference" / inventory
    upstream = {line.split()[0][2:] for line in path.read_text().splitlines() if line.startswith("--")}
    ours = {action.dest for action in parser._actions} | {
        s[2:] for action in parser._actions for s in action.option_strings if s.startswith("--")
    }
    assert not sorted(upstream - ours), f"upstream options neither supported nor rejected: {sorted(upstream - ours)}"
    rejected = training_args.rejected_options(parser)
    for name in sorted(upstream & set(rejected)):
        with pytest.raises(UserError, match=f"--{name} "):
            parser.parse_args([f"--{name}"])
