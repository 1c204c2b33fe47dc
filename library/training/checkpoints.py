"""Where training writes its models and states, upstream's file names, and keeping only the last N saves.

Model files: ``<name>-000003.safetensors`` (epoch 3), ``<name>-step00000100.safetensors`` (step 100),
``<name>.safetensors`` (the end). States: the same names with ``-state``. Every write is atomic: a state is
written into a temporary folder and renamed; a kill never leaves a half-written file or folder.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointNaming:
    output_dir: Path
    output_name: str | None
    extension: str = ".safetensors"

    def epoch_file(self, epoch: int) -> Path:
        return self.output_dir / f"{self.output_name or 'epoch'}-{epoch:06d}{self.extension}"

    def step_file(self, step: int) -> Path:
        return self.output_dir / f"{self.output_name or 'at'}-step{step:08d}{self.extension}"

    def last_file(self) -> Path:
        return self.output_dir / f"{self.output_name or 'last'}{self.extension}"

    def epoch_state(self, epoch: int) -> Path:
        return self.output_dir / f"{self.output_name or 'epoch'}-{epoch:06d}-state"

    def step_state(self, step: int) -> Path:
        return self.output_dir / f"{self.output_name or 'at'}-step{step:08d}-state"

    def last_state(self) -> Path:
        return self.output_dir / f"{self.output_name or 'last'}-state"

    def _numbered(self, kind: str, state: bool) -> dict[int, Path]:
        base = re.escape(self.output_name or ("epoch" if kind == "epoch" else "at"))
        middle = r"(\d{6})" if kind == "epoch" else r"step(\d{8})"
        tail = "-state" if state else re.escape(self.extension)
        pattern = re.compile(rf"^{base}-{middle}{tail}$")
        found = {}
        for path in self.output_dir.glob("*"):
            match = pattern.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def remove_old(self, kind: str, current: int, keep_within: int | None, state: bool = False) -> list[Path]:
        """Delete saves of ``kind`` ("epoch"/"step") numbered at or below ``current - keep_within``."""
        if keep_within is None:
            return []
        removed = []
        for number, path in sorted(self._numbered(kind, state).items()):
            if number <= current - keep_within:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path)
                logger.info("removed old %s %s", "state" if state else "model", path.name)
                if not state:  # fine-tuned text encoders saved beside the model: <stem>_clip_l.safetensors ...
                    for sidecar in self.output_dir.glob(f"{glob.escape(path.stem)}_*{self.extension}"):
                        sidecar.unlink()
                        removed.append(sidecar)
        return removed


def atomic_directory(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` and rename the folder onto ``path`` (replacing an older one only at the end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
