"""Artifact files written atomically, and only where colam may write them.

Every write goes to a temporary file in the same folder (`.NAME.colam-XXXXXXXX.tmp`, named from its target), is
flushed and fsynced, then renamed over the target (rename within a file system is atomic on POSIX and Windows).

An output folder of colam holds a manifest, `.colam-files`: the name of every file and folder colam wrote there,
recorded before the file is made, so a kill leaves at worst a name without its file. What it does not name is someone
else's: colam never overwrites or deletes it, and refuses, before writing, an output folder holding it (`take_folder`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colam.errors import ColamError, first_line


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    make_folder(path.parent)
    _record(path)
    _replace(path, data)


def _replace(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_TEMPORARY}", suffix=".tmp")
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


MANIFEST = ".colam-files"
_MANIFEST_HEAD = "# colam wrote these files and folders here; it never overwrites or deletes anything else\n"
_MANIFEST_BYTES = 1 << 20


def _read_manifest(folder: Path) -> tuple[str | None, set[str]] | None:
    """The kind of output `folder` is and the names colam wrote there (NAME/: a folder that is colam's whole),
    from its manifest; None where it has none: not an output folder of colam."""
    path = Path(folder) / MANIFEST
    if not os.path.lexists(path):
        return None
    check_file(path, "manifest", _MANIFEST_BYTES)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ColamError(f"manifest: cannot read '{path}' ({getattr(exc, 'strerror', None) or 'not text'})") from None
    kinds = [line.removeprefix("# kind: ") for line in lines if line.startswith("# kind: ")]
    return (kinds[0] if kinds else None), {line for line in lines if line and not line.startswith("#")}


def written_here(folder: Path) -> set[str] | None:
    """The names colam wrote in `folder`, or None where it has no manifest."""
    found = _read_manifest(folder)
    return None if found is None else found[1]


def _write_manifest(folder: Path, names: set[str], kind: str | None) -> None:
    head = _MANIFEST_HEAD + (f"# kind: {kind}\n" if kind else "")
    _replace(folder / MANIFEST, (head + "".join(f"{name}\n" for name in sorted(names))).encode())


def expect(folder: Path, names: list[str]) -> None:
    """Name in `folder`'s manifest what colam (or a library) is about to write there; what exists stays another's."""
    found = _read_manifest(folder)
    new = {name for name in names if not os.path.lexists(folder / name)} - (found[1] if found else set())
    if found is not None and new:
        _write_manifest(folder, found[1] | new, found[0])


def wrote(path: Path) -> bool:
    """Whether `path` is a regular file (not a link, which colam never makes) that its folder's manifest names."""
    return path.is_file() and not path.is_symlink() and path.name in (written_here(path.parent) or set())


def _named(name: str, owned: set[str]) -> bool:
    """Whether the manifest names `name`: as a file or folder, or (NAME/) as a folder that is colam's whole."""
    return name.rstrip("/") in owned or f"{name.rstrip('/')}/" in owned


def refuse_overwrite(path: Path, owned: set[str] | None) -> None:
    if os.path.lexists(path) and not _named(path.name, owned or set()):
        raise ColamError(f"output: '{path}' was not written by colam and is not overwritten; move it or choose "
                         f"another output folder")


def _record(path: Path, name: str | None = None) -> None:
    """Name `path` in its folder's manifest before it is made; refuse a path colam did not write there."""
    found, name = _read_manifest(path.parent), name or path.name
    if found is None or _named(name, found[1]):
        return
    kind, owned = found
    refuse_overwrite(path, owned)
    # not printable: line breaks, control characters and the surrogate escapes of file name bytes that are not UTF-8
    if name.startswith("#") or not name.isprintable():
        raise ColamError(f"output: '{path}' has a name colam does not write (a leading #, a line break, a "
                         f"control character or bytes that are not UTF-8); choose another name")
    _write_manifest(path.parent, owned | {name}, kind)


def forget(folder: Path, names: list[str]) -> None:
    """Drop from the manifest of `folder` those of `names` that were expected but not made there."""
    found = _read_manifest(folder)
    gone = {name for name in names if not os.path.lexists(folder / name)} & (found[1] if found else set())
    if gone:
        _write_manifest(folder, found[1] - gone, found[0])


def make_folder(folder: Path, manifest: bool = True) -> None:
    """Create `folder` and its missing parents; one made inside an output folder of colam is named in its parent's
    manifest and gets a manifest of its own (`manifest=False`: none, and it is colam's whole, such as a download)."""
    if folder.is_dir():
        return
    make_folder(folder.parent)
    _record(folder, folder.name + ("" if manifest else "/"))
    folder.mkdir(exist_ok=True)
    if manifest and written_here(folder.parent) is not None:
        _write_manifest(folder, set(), None)


_TEMPORARY = "colam-"  # .NAME.colam-XXXXXXXX.tmp: mkstemp's 8 characters, a name no backup of the user's takes
_TEMPORARY_NAME = re.compile(rf"\.(.+)\.{_TEMPORARY}[a-z0-9_]{{8}}\.tmp")


def _temporary_of(name: str) -> str | None:
    """The target a temporary file of atomic_write_bytes is written for, else None."""
    found = _TEMPORARY_NAME.fullmatch(name)
    return found.group(1) if found else None


def _ours(name: str, owned: set[str]) -> bool:
    return _named(name, owned) or name == MANIFEST or _temporary_of(name) in owned | {MANIFEST}


def foreign_entries(folder: Path) -> list[str]:
    """What colam did not write under `folder` (paths relative to it), looking into the folders it made but for
    those that are its whole (NAME/ in the manifest): a folder it made that lost its manifest is someone else's."""
    owned, found = written_here(folder) or set(), []
    for entry in sorted(folder.iterdir()):
        if not _ours(entry.name, owned):
            found.append(entry.name + ("/" if entry.is_dir() else ""))
        elif entry.is_dir() and not entry.is_symlink() and f"{entry.name}/" not in owned:
            found += [f"{entry.name}/{name}" for name in foreign_entries(entry)]
    return found


def refuse_foreign(folder: Path, what: str) -> None:
    foreign = foreign_entries(folder) if folder.is_dir() else []
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ColamError(f"{what}: '{folder}' holds what colam did not write ({listed}); nothing there is "
                         f"touched: move it or choose another {what}")


def check_folder_path(folder: Path, what: str = "--out") -> None:
    """Refuse an output folder's path that is a file, or a symbolic link to nothing or to itself."""
    if os.path.lexists(folder) and not folder.is_dir():
        found = "is not a folder" if os.path.exists(folder) else "is a symbolic link to nothing (or a loop)"
        raise ColamError(f"{what}: '{folder}' exists and {found}")


def check_folder(folder: Path, kind: str, what: str = "--out", shared: bool = False) -> None:
    """Refuse, in one line, an output folder's path that is no folder, or a folder holding another kind of colam's
    outputs (a split as a run's --out) or (unless `shared`, as data.root is) files colam did not write."""
    check_folder_path(folder, what)
    held = (_read_manifest(folder) or (None,))[0]
    if held not in (None, kind):
        raise ColamError(f"{what}: '{folder}' holds another kind of colam output ({held}, not {kind}); choose "
                         f"another {what}")
    if not shared:
        refuse_foreign(folder, what)


def take_folder(folder: Path, kind: str, what: str = "--out", shared: bool = False) -> None:
    """Make `folder` (created if missing) an output folder of colam holding `kind`, once `check_folder` passed."""
    check_folder(folder, kind, what, shared)
    make_folder(folder)
    found = _read_manifest(folder)
    if found is None or found[0] != kind:
        _write_manifest(folder, found[1] if found else set(), kind)


def remove(path: Path) -> None:
    """Delete `path` where colam wrote it (its folder's manifest names it); anything else stays."""
    if path.name in (written_here(path.parent) or set()):
        path.unlink(missing_ok=True)


def empty_folder(folder: Path, what: str) -> None:
    """Delete what colam wrote in `folder`, refusing first a folder holding anything else."""
    refuse_foreign(folder, what)
    for entry in folder.iterdir():
        if entry.name != MANIFEST:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    _write_manifest(folder, set(), (_read_manifest(folder) or (None,))[0])


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files a killed process left in `folder` and the folders colam made in it (only those of a
    target colam wrote there); call it only where no other process is writing."""
    owned = written_here(folder)
    if owned is None:
        return
    for entry in list(folder.iterdir()):
        if entry.is_file() and _temporary_of(entry.name) in owned | {MANIFEST}:
            entry.unlink(missing_ok=True)
        elif entry.is_dir() and entry.name in owned:
            remove_stale_temporaries(entry)


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
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_array(path: str | os.PathLike, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz of `arrays` with a fixed time stamp, unlike np.savez: the same arrays give the same bytes for DVC."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.save(member, array, allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buffer.getvalue()


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def check_file(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> None:
    """Refuse, in one line naming `what`, a path that is missing, not a regular file (a folder, or a FIFO or device
    that would be read forever) or larger than `max_bytes`."""
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
        raise ColamError(f"{what}: '{path}' is not a readable checkpoint ({first_line(exc)[:160]})") from None


def load_weights(model: torch.nn.Module, state: Any, what: str, path: str | os.PathLike,
                 mismatch: str = "holds the weights of another model or class count") -> None:
    """Load a state_dict into `model`, or one line saying why it is another model's (keys missing, extra, reshaped)."""
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
    """The sha256 of a file's bytes, read in blocks (checkpoints are large); a FIFO or folder is refused, not read."""
    check_file(path, what)
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
