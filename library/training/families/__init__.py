"""The model families the recipes are given (``library/training/family.py`` ``FamilySpec``)."""

from __future__ import annotations

from library.training.family import FamilySpec


def family_from_argv(argv: list[str]) -> tuple[FamilySpec, list[str]]:
    """For the cache tools, which serve every family: ``--sd3`` picks SD3/SD3.5, ``--flux`` (upstream's flag, the
    default) FLUX.1. Returns the family and the arguments without that flag."""
    if "--sd3" in argv:
        from library.training.families.sd3 import SD3

        return SD3, [a for a in argv if a != "--sd3"]
    from library.training.families.flux import FLUX

    return FLUX, [a for a in argv if a != "--flux"]
