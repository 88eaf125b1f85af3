"""MNIST, Fashion-MNIST and KMNIST from their IDX files, in torchvision's layout or flat, gzipped or not, each checked
first (docs/datasets.md): a .gz with torchvision's md5, or content with the release's md5 and size (`CONTENT`)."""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from colam import io as cio
from colam.errors import ColamError, flat_message

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# md5 and size of the uncompressed files of the original releases (the content of torchvision's .gz files). MNIST's
# are widely published; Fashion-MNIST's were computed from Debian's package, whose IDX content is the original's.
CONTENT = {
    "mnist": {
        "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", 47_040_016),
        "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", 60_008),
        "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", 7_840_016),
        "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", 10_008),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", 47_040_016),
        "train-labels-idx1-ubyte": ("9018921c3c673c538a1fc5bad174d6f9", 60_008),
        "t10k-images-idx3-ubyte": ("8181f5470baa50b63fa0f6fddb340f0a", 7_840_016),
        "t10k-labels-idx1-ubyte": ("15d484375f8d13e6eb1aabb0c3f46965", 10_008),
    },
    "kmnist": {},
}


@dataclass(frozen=True)
class IdxSet:
    """One of the family: its torchvision class (by name: imported only to download or to check an original .gz),
    class names (torchvision's, tests/test_idx_datasets.py), normalisation, and whether flips keep the class."""

    name: str
    class_name: str  # torchvision's class, and the folder of its layout (<root>/<class_name>/raw)
    classes: tuple[str, ...]
    mean: float  # of the training images' pixels in [0, 1] (tests/test_idx_datasets.py recomputes it)
    std: float
    flip: bool  # a left-right mirrored garment is the same garment; a mirrored digit or character is not

    @property
    def cls(self) -> type:
        return torchvision_class(self.class_name)


def torchvision_class(name: str) -> type:
    """torchvision's data set class `name`, imported on use only: its import is a second of every process's start."""
    from torchvision import datasets as tvd

    return getattr(tvd, name)


IDX_SETS = {
    "mnist": IdxSet("mnist", "MNIST", tuple(f"{i} - {n}" for i, n in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))), 0.1307, 0.3081, flip=False),
    "fashion_mnist": IdxSet("fashion_mnist", "FashionMNIST", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                              "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
                            0.2860, 0.3530, flip=True),
    "kmnist": IdxSet("kmnist", "KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"), 0.1918, 0.3483,
                     flip=False),
}


def read_idx_set(name: str, root: Path, download: bool) -> list:
    """The train images, train labels, test images and test labels (uint8 N x 1 x 28 x 28, int64) of `name`."""
    return [_idx_array(content, file) for file, (content, _) in _checked_files(name, root, download).items()]


def copy_idx_files(name: str, source: Path, out: Path, download: bool = False) -> list[Path]:
    """Write `name`'s checked files from `source` (with `download`, torchvision's download into `out`) into `out`
    in torchvision's layout, uncompressed where their content digest is known, else as the original .gz."""
    folder, forms = out / IDX_SETS[name].class_name / "raw", [f"{file}{gz}" for file in FILES for gz in ("", ".gz")]
    if download:  # torchvision downloads into `folder`: what it writes there that was not there is colam's
        cio.make_folder(folder)
        cio.expect(folder, forms)
    checked = _checked_files(name, out if download else source, download)  # all checked before any write
    targets = {(folder / file if gz is None else folder / f"{file}.gz"): (content if gz is None else gz)
               for file, (content, gz) in checked.items()}
    changed = {target: data for target, data in targets.items()
               if not (target.is_file() and target.read_bytes() == data)}
    owned = cio.written_here(folder)
    for target in changed:  # a file of the user's where one goes is refused before any is written
        cio.refuse_overwrite(target, owned)
    for target, data in changed.items():
        cio.atomic_write_bytes(target, data)
    for path in (folder / form for form in forms):
        if path.is_file() and path not in targets:  # the other form of a kept file (what a download left beside it)
            cio.remove(path)
    cio.forget(folder, forms)  # names a download was expected to write and did not (or that were removed)
    return list(targets)


def _checked_files(name: str, root: Path, download: bool) -> dict[str, tuple[bytes, bytes | None]]:
    """Every file of `name` under `root` (downloaded there first when `download`): its uncompressed bytes after the
    integrity check, and the .gz itself when it is torchvision's original (how KMNIST is checked)."""
    spec = IDX_SETS[name]
    if download:
        try:  # torchvision's download: every file from its mirrors, the .gz md5 checked, then extracted
            spec.cls(str(root), train=True, download=True)
        except (OSError, RuntimeError) as err:  # URLError is an OSError; "File not found or corrupted" a RuntimeError
            raise ColamError(f"data.download: could not download {name} into '{root}': {flat_message(err)}") from None
    return {file: _checked_file(spec, root, file) for file in FILES}


def _checked_file(spec: IdxSet, root: Path, file: str) -> tuple[bytes, bytes | None]:
    """`file` from root/<Class>/raw or `root`, .gz or not: an original .gz is proof enough, else the content's."""
    folders = (root / spec.class_name / "raw", root)
    archives = [archive for archive in (folder / f"{file}.gz" for folder in folders) if archive.is_file()]
    original = dict(spec.cls.resources)[f"{file}.gz"] if archives else None
    for archive in archives:
        if hashlib.md5(raw := _read(archive)).hexdigest() == original:
            return _gunzip(raw, archive), raw
    path = next((p for folder in folders for p in (folder / file, folder / f"{file}.gz") if p.is_file()), None)
    if path is None:
        raise ColamError(f"data.root: no {spec.name} data set found under '{root}' ({file}[.gz] is in neither "
                         f"'{root}' nor '{folders[0]}'; set data.download: true to download it, or check the path)")
    content = _gunzip(_read(path), path) if path.suffix == ".gz" else _read(path)
    expected = CONTENT[spec.name].get(file)
    if expected is None:
        raise ColamError(f"data.root: '{path}' is not {spec.name}'s original {file}.gz (its md5 is not "
                         f"torchvision's) and colam knows no digest of the uncompressed file; use the original "
                         f"files (data.download: true)")
    digest = hashlib.md5(content).hexdigest()
    if (digest, len(content)) != expected:
        raise ColamError(f"data.root: '{path}' is not {spec.name}'s original {file} (content md5 {digest}, "
                         f"{len(content):,} bytes; expected {expected[0]}, {expected[1]:,} bytes)")
    return content, None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ColamError(f"data.root: cannot read '{path}' ({err.strerror})") from None


def _gunzip(data: bytes, path: Path) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise ColamError(f"data.root: '{path}' is not a readable gzip file ({err})") from None


def _idx_array(content: bytes, file: str) -> torch.Tensor | np.ndarray:
    """Images (N x 1 x H x W uint8 tensor) or labels (int64) of an IDX file, its header checked against the length:
    the integrity check vouches for known files; this keeps the reader honest."""
    dims = 3 if "idx3" in file else 1
    head = 4 + 4 * dims
    magic, *sizes = struct.unpack_from(f">{1 + dims}I", content) if len(content) >= head else (None,)
    if magic != 0x800 | dims or len(content) != head + int(np.prod(sizes)):
        raise ColamError(f"data.root: {file} is not an IDX file of unsigned bytes with {dims} dimension(s)")
    values = np.frombuffer(content, dtype=np.uint8, offset=head)
    return torch.from_numpy(values.reshape(sizes[0], 1, *sizes[1:]).copy()) if dims == 3 else values.astype(np.int64)
