"""The model family is a declared plug: the recipes and the loop name no family, every family provides every
member of the protocols, and the per-family training scripts differ only in the family they pass."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from library.training import family as family_protocols
from library.training.families.flux import FLUX, FluxFamily
from library.training.families.sd3 import SD3, SD3Family

REPO = Path(__file__).resolve().parents[2]
# upstream's option value ``--timestep_sampling flux_shift`` is a user-facing name, not a family dependency
ALLOWED = {"flux_shift"}
FAMILY_WORD = re.compile(r"(?i)\b(flux|sd3)\w*|Flux[A-Z]\w*|SD3[A-Z]\w*|\bFLUX\.1\b")


def test_nothing_outside_families_names_a_family():
    offenders = []
    for path in sorted((REPO / "library" / "training").rglob("*.py")):
        if "families" in path.relative_to(REPO / "library" / "training").parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in FAMILY_WORD.finditer(line):
                if match.group(0) not in ALLOWED:
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)}")
    assert not offenders, "\n".join(offenders)


def test_the_grep_would_catch_a_family_import():
    assert FAMILY_WORD.search("from library.models.flux.loading import load_flux_model")
    assert FAMILY_WORD.search("family: FluxFamily") and FAMILY_WORD.search("training SD3.5 Large")
    assert not FAMILY_WORD.search("the model family") and FAMILY_WORD.search('"flux_shift"').group(0) in ALLOWED


def _members(protocol: type) -> set[str]:
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return names


@pytest.mark.parametrize("spec", [FLUX, SD3], ids=["flux", "sd3"])
def test_every_spec_provides_the_protocol(spec):
    missing = [n for n in _members(family_protocols.FamilySpec) if not hasattr(spec, n)]
    assert not missing


@pytest.mark.parametrize("cls", [FluxFamily, SD3Family], ids=["flux", "sd3"])
def test_every_family_provides_the_protocol(cls):
    init = inspect.getsource(cls.__init__)
    missing = [n for n in _members(family_protocols.ModelFamily) if not hasattr(cls, n) and f"self.{n} =" not in init]
    assert not missing


def _normalized(script: str) -> str:
    text = (REPO / script).read_text(encoding="utf-8")
    text = text.split('"""', 2)[2]  # the module docstring names the family
    return re.sub(r"families\.(flux|sd3) import (FLUX|SD3)|\b(FLUX|SD3)\b", "FAMILY", text)


def test_the_training_scripts_differ_only_in_their_family():
    assert _normalized("flux_train_network.py") == _normalized("sd3_train_network.py")
    assert len((REPO / "sd3_train_network.py").read_text().splitlines()) < 25
