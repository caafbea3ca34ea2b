"""Checkpoints: a peer's whole training state in one safetensors file, written so that a crash never costs the last
good one.

    path = save_checkpoint(Path("ckpt"), tensors, meta, keep=2)    # ckpt/ckpt-00000120.safetensors
    found = load_latest(Path("ckpt"))                               # (tensors, meta, path) or None

A save writes the file in `.partial/` inside the directory (safetensors makes its own temporary file next to its
target, so that lands there too), fsyncs it, renames it to its final name (atomic on POSIX, same file system) and
fsyncs the directory, so at every instant each `ckpt-*.safetensors` is either absent or complete: a kill -9 in the
middle of a save leaves only files in `.partial/`, which the next save clears and loading never reads. Only after the
new file is in place are checkpoints beyond the newest `keep` deleted.

The file holds the tensors (model, optimizer state, DiLoCo's shared point and outer momentum; names say which) and,
in the safetensors header, `meta` as JSON: the step, the data position, the accounting of differential privacy, and
what the checkpoint was made for (run id, parameter count), so a resume into another model is refused in one line.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from p2pfed.errors import UserError

__all__ = ["PARTIAL", "check_resume_dir", "list_checkpoints", "load_latest", "save_checkpoint"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{8,})\.safetensors$")
_META_KEY = "p2pfed"
PARTIAL = ".partial"  # where saves are written before they are renamed into place


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `directory`, newest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def save_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, keep: int) -> Path:
    """Write one checkpoint atomically (temp file, fsync, rename, fsync of the directory); keep the newest `keep`."""
    partial = directory / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    for stray in partial.iterdir():  # left by a save that was killed
        stray.unlink(missing_ok=True)
    step = int(meta["step"])
    final = directory / f"ckpt-{step:08d}.safetensors"
    tmp = partial / f"ckpt-{step:08d}.safetensors"
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={_META_KEY: json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(directory)
    for _, old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return final


def load_latest(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path] | None:
    """The newest checkpoint in `directory` that reads back whole, or None when there is none. One that does not
    (a disk that lost it) is skipped with a warning and the one before it is used."""
    for _, path in list_checkpoints(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()[_META_KEY])
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("checkpoint %s is unreadable (%s); trying an older one", path.name, e)
            continue
        return tensors, meta, path
    return None


def check_resume_dir(directory: Path) -> None:
    """UserError unless `directory` holds at least one checkpoint file (checked before a peer starts anything)."""
    if not directory.exists():
        raise UserError(f"--resume {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise UserError(f"--resume {str(directory)!r} is not a directory of checkpoints")
    if not list_checkpoints(directory):
        raise UserError(f"--resume {str(directory)!r} holds no checkpoint (ckpt-*.safetensors)")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
