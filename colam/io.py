"""Artifact files written atomically: a reader sees the old file or the new one, never half of one.

Every write goes to a temporary file in the same folder, is flushed and fsynced, then renamed
over the target (rename within a file system is atomic on POSIX and Windows).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colam.errors import ColamError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a write or fsync names no file: name the target
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    fsync_dir(path.parent)


def is_temporary(path: Path) -> bool:
    """A temporary file of atomic_write_bytes (`.NAME.XXXXXXXX.tmp`), or anything named like one."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of writes that a killed process never renamed into place in
    `folder` and its stage folders. Call it only where no other process is writing."""
    for path in [p for pattern in (".*.tmp", "stage_*/.*.tmp") for p in folder.glob(pattern) if p.is_file()]:
        path.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); Windows cannot open folders and needs no such step."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_UMASK = os.umask(0)  # read the process's umask: os.umask only reads it by setting it
os.umask(_UMASK)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_array(path: str | os.PathLike, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def check_file(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> None:
    """Refuse, in one line naming `what`, a path that is missing, not a regular file (a folder, or a
    FIFO or device that would be read forever) or larger than `max_bytes`."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ColamError(f"{what}: '{path}' does not exist") from None
    except OSError as exc:
        raise ColamError(f"{what}: cannot read '{path}' ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ColamError(f"{what}: '{path}' is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise ColamError(f"{what}: '{path}' is not a regular file (a FIFO, socket or device)")
    if max_bytes is not None and info.st_size > max_bytes:
        raise ColamError(f"{what}: '{path}' is {info.st_size:,} bytes, more than the {max_bytes:,} it may be")


def load_torch(path: str | os.PathLike, what: str) -> Any:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers only, never code."""
    check_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ColamError(f"{what}: '{path}' does not exist") from None
    except Exception as exc:  # truncated zip, foreign pickle, ...: one line, no traceback
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ColamError(f"{what}: '{path}' is not a readable checkpoint ({reason[:160]})") from None


def load_weights(model: torch.nn.Module, state: Any, what: str, path: str | os.PathLike,
                 mismatch: str = "holds the weights of another model or class count") -> None:
    """Load a state_dict into `model`, or one line saying why these weights belong to another model
    (`mismatch`, then the missing or unexpected keys, a tensor of another shape)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ColamError(f"{what}: '{path}' is not a model state_dict")
    expected = model.state_dict()
    problems = [f"{len(keys)} {kind} key(s) ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for kind, keys in (("missing", [k for k in expected if k not in state]),
                                   ("unexpected", [k for k in state if k not in expected])) if keys]
    problems += [f"{k} is {tuple(state[k].shape)} there, {tuple(v.shape)} here" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape][:2]
    if problems:
        raise ColamError(f"{what}: '{path}' {mismatch} ({'; '.join(problems)})")
    model.load_state_dict(state)


def sha256_file(path: str | os.PathLike, what: str = "input") -> str:
    """The sha256 of a file's bytes, read in blocks (checkpoints can be large); a FIFO or folder is
    refused (naming `what`), not waited on."""
    check_file(path, what)
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
