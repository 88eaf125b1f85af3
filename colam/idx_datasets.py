"""The MNIST family from its IDX files: MNIST, Fashion-MNIST and Kuzushiji-MNIST (KMNIST).

torchvision's own classes download them (`data.download: true`), name their classes and lay them
out as `root/<Class>/raw/<file>`. A `data.root` may also hold the four original files from another
source, gzipped or not, flat in the folder: Debian's `dataset-fashion-mnist` installs
`/usr/share/datasets/fashion-mnist/*.gz`, recompressed, so their gzip md5 is not torchvision's.
Every file is checked before it is used:

- a `.gz` whose md5 is in torchvision's list is the original download;
- otherwise the uncompressed bytes must have the md5 and size of the original release's file
  (`CONTENT`, this module's own list; the bytes inside the original `.gz`);
- anything else is refused in one line naming the file. KMNIST's uncompressed digests are not
  in the list, so KMNIST is accepted as its original `.gz` files only.

`copy_idx_files` writes the checked, uncompressed files in torchvision's layout: the DVC-versioned
copy of a data set (`colam data get`, data/raw/NAME), the same bytes from whichever source.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets as tvd

from colam.errors import ColamError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# md5 and size of the uncompressed files of the original releases (the content of torchvision's .gz
# files). MNIST's are widely published; Fashion-MNIST's were computed from Debian's package, whose
# IDX content is the original release's.
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
    """One of the family: its torchvision class, normalisation and which flips keep the class."""

    name: str
    cls: type
    mean: float  # of the training images' pixels in [0, 1] (tests/test_idx_datasets.py recomputes it)
    std: float
    flip: bool  # a left-right mirrored garment is the same garment; a mirrored digit or character is not


IDX_SETS = {
    "mnist": IdxSet("mnist", tvd.MNIST, 0.1307, 0.3081, flip=False),
    "fashion_mnist": IdxSet("fashion_mnist", tvd.FashionMNIST, 0.2860, 0.3530, flip=True),
    "kmnist": IdxSet("kmnist", tvd.KMNIST, 0.1918, 0.3483, flip=False),
}


@dataclass
class IdxArrays:
    train_images: torch.Tensor  # N x 1 x 28 x 28 uint8
    train_labels: np.ndarray  # int64
    test_images: torch.Tensor
    test_labels: np.ndarray
    classes: list[str]


def read_idx_set(name: str, root: Path, download: bool) -> IdxArrays:
    """The checked arrays of data set `name` under `root` (downloaded there first when `download`)."""
    spec = IDX_SETS[name]
    if download:
        _download(spec, root)
    content = {file: checked_content(spec, root, file) for file in FILES}
    return IdxArrays(_images(content["train-images-idx3-ubyte"], FILES[0]),
                     _labels(content["train-labels-idx1-ubyte"], FILES[1]),
                     _images(content["t10k-images-idx3-ubyte"], FILES[2]),
                     _labels(content["t10k-labels-idx1-ubyte"], FILES[3]),
                     list(spec.cls.classes))


def copy_idx_files(name: str, source: Path, out: Path, download: bool = False) -> list[Path]:
    """Write data set `name`'s checked files from `source` into `out` in torchvision's layout
    (out/<Class>/raw/<file>), uncompressed where their content digest is known (the same bytes from
    any source), else as the original .gz; with `download`, torchvision downloads them into `out`
    first. Returns the files of the copy."""
    from colam import io as cio

    spec = IDX_SETS[name]
    if download:
        _download(spec, out)
        source = out
    folder = out / spec.cls.__name__ / "raw"
    checked = {file: checked_file(spec, source, file) for file in FILES}  # all checked before any write
    kept = []
    for file, found in checked.items():
        target = folder / (file if found.original_gz is None else f"{file}.gz")
        data = found.content if found.original_gz is None else found.original_gz
        if not (target.is_file() and target.read_bytes() == data):
            cio.atomic_write_bytes(target, data)
        kept.append(target)
    for file in FILES:  # the other form of a kept file (what a download extracted or archived beside it)
        for path in (folder / file, folder / f"{file}.gz"):
            if path.is_file() and path not in kept:
                path.unlink()
    return kept


@dataclass
class CheckedFile:
    path: Path
    content: bytes  # uncompressed
    original_gz: bytes | None  # the .gz itself when it is torchvision's original (KMNIST: how it is checked)


def checked_content(spec: IdxSet, root: Path, file: str) -> bytes:
    """The uncompressed bytes of `file` under `root`, after the integrity check (module docstring)."""
    return checked_file(spec, root, file).content


def checked_file(spec: IdxSet, root: Path, file: str) -> CheckedFile:
    original_md5 = dict(spec.cls.resources)[f"{file}.gz"]
    for folder in (root / spec.cls.__name__ / "raw", root):  # an original .gz is proof enough
        archive = folder / f"{file}.gz"
        if archive.is_file():
            raw = _read(archive)
            if hashlib.md5(raw).hexdigest() == original_md5:
                return CheckedFile(archive, _gunzip(raw, archive), raw)
    path = find_file(spec, root, file)
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
    return CheckedFile(path, content, None)


def find_file(spec: IdxSet, root: Path, file: str) -> Path:
    """`file` in torchvision's layout (root/<Class>/raw) or flat in `root`, uncompressed or .gz."""
    for folder in (root / spec.cls.__name__ / "raw", root):
        for candidate in (folder / file, folder / f"{file}.gz"):
            if candidate.is_file():
                return candidate
    raise ColamError(f"data.root: no {spec.name} data set found under '{root}' ({file}[.gz] is in neither "
                     f"'{root}' nor '{root / spec.cls.__name__ / 'raw'}'; set data.download: true to download it, "
                     f"or check the path)")


def _download(spec: IdxSet, root: Path) -> None:
    """torchvision's download: every file from its mirrors, the .gz md5 checked, then extracted."""
    try:
        spec.cls(str(root), train=True, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; "File not found or corrupted" a RuntimeError
        raise ColamError(f"data.download: could not download {spec.name} into '{root}': {' '.join(str(err).split())}"
                         ) from None


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


def _images(content: bytes, file: str) -> torch.Tensor:
    count, rows, cols = _header(content, file, magic=0x803, dims=3)
    pixels = np.frombuffer(content, dtype=np.uint8, offset=16)
    return torch.from_numpy(pixels.reshape(count, 1, rows, cols).copy())


def _labels(content: bytes, file: str) -> np.ndarray:
    (count,) = _header(content, file, magic=0x801, dims=1)
    return np.frombuffer(content, dtype=np.uint8, offset=8).astype(np.int64)


def _header(content: bytes, file: str, magic: int, dims: int) -> tuple[int, ...]:
    """The sizes in an IDX header (big-endian int32s after the magic number), checked against the
    length: the integrity check already vouches for known files; this keeps the reader honest."""
    head = 4 + 4 * dims
    found = struct.unpack(">I", content[:4])[0] if len(content) >= 4 else None
    sizes = struct.unpack(f">{dims}I", content[4:head]) if len(content) >= head else ()
    if found != magic or len(content) != head + int(np.prod(sizes)):
        raise ColamError(f"data.root: {file} is not an IDX file of unsigned bytes with {dims} dimension(s)")
    return sizes
