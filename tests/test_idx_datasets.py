"""MNIST, Fashion-MNIST and KMNIST from IDX files: the integrity check, both layouts, gzipped or not,
the tensor form and augmentation, `colam data get`, and Debian's real Fashion-MNIST where installed."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from colam import idx_datasets
from colam import io as cio
from colam.datasets import build_raw_data, get_data
from colam.errors import ColamError
from colam.idx_datasets import CONTENT, FILES, IDX_SETS, copy_idx_files

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist (CI does)
needs_debian_fashion = pytest.mark.skipif(not DEBIAN_FASHION.is_dir(),
                                          reason="Debian's dataset-fashion-mnist is not installed")


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0800 | ndim, the sizes as big-endian int32, the data."""
    return struct.pack(">I", 0x800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture
def fake_idx(tmp_path, monkeypatch):
    """Small IDX files declared the originals: their content digests are put in CONTENT (MNIST,
    Fashion-MNIST) and their .gz digests in torchvision's list (KMNIST, which has no content digests)."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": (np.arange(30) % 10).astype(np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": np.arange(10).astype(np.uint8)}
    content = {name: idx_bytes(a) for name, a in arrays.items()}
    gz = {name: gzip.compress(data, mtime=0) for name, data in content.items()}
    for name in ("mnist", "fashion_mnist"):
        monkeypatch.setitem(CONTENT, name, {f: (hashlib.md5(d).hexdigest(), len(d)) for f, d in content.items()})
    kmnist = IDX_SETS["kmnist"].cls
    monkeypatch.setattr(kmnist, "resources", [(f"{f}.gz", hashlib.md5(gz[f]).hexdigest()) for f in FILES])
    return {"arrays": arrays, "content": content, "gz": gz, "root": tmp_path}


def write(folder: Path, files: dict[str, bytes], suffix: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / f"{name}{suffix}").write_bytes(data)
    return folder


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("compressed", [False, True])
def test_both_layouts_gzipped_or_not(fake_idx, layout, compressed):
    root = fake_idx["root"]
    folder = root if layout == "flat" else root / "FashionMNIST" / "raw"
    files = {f: gzip.compress(d, mtime=1234) if compressed else d for f, d in fake_idx["content"].items()}
    write(folder, files, ".gz" if compressed else "")  # recompressed: not torchvision's .gz, the content is
    raw = build_raw_data("fashion_mnist", root)
    arrays = fake_idx["arrays"]
    assert raw.classes == IDX_SETS["fashion_mnist"].cls.classes == list(IDX_SETS["fashion_mnist"].classes)
    np.testing.assert_array_equal(raw.train_targets, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(raw.test_targets, arrays["t10k-labels-idx1-ubyte"])
    assert raw.tensors.train.dtype == torch.uint8 and raw.tensors.train.shape == (30, 1, 28, 28)
    assert torch.equal(raw.tensors.test[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    mean, std = IDX_SETS["fashion_mnist"].mean, IDX_SETS["fashion_mnist"].std
    image, label = raw.train_eval[3]
    assert label == 3 and image.shape == (1, 28, 28)
    expected = (arrays["train-images-idx3-ubyte"][3, 5, 7] / 255 - mean) / std
    assert image[0, 5, 7].item() == pytest.approx(expected, abs=1e-5)


def test_augmentation_crops_within_two_pixels_and_flips_only_garments(fake_idx):
    write(fake_idx["root"], fake_idx["content"])
    fashion, digits = build_raw_data("fashion_mnist", fake_idx["root"]), build_raw_data("mnist", fake_idx["root"])
    assert (fashion.tensors.pad, fashion.tensors.flip) == (2, True)
    assert (digits.tensors.pad, digits.tensors.flip) == (2, False)
    plain = digits.train_eval[0][0]
    mirrored = False
    for seed in range(40):
        torch.manual_seed(seed)
        shifted = digits.train[0][0]
        # a crop of the zero-padded image: some shift (dy, dx) in [-2, 2]^2 gives it back exactly
        assert any(torch.allclose(shifted, _shift(plain, dy, dx, digits), atol=1e-6) for dy in range(-2, 3) for dx in range(-2, 3))
        torch.manual_seed(seed)
        garment, unflipped = fashion.train[0][0], fashion.train_eval[0][0]
        mirrored |= not any(torch.allclose(garment, _shift(unflipped, dy, dx, fashion), atol=1e-6)
                            for dy in range(-2, 3) for dx in range(-2, 3))
    assert mirrored  # some draws flip a garment


def _shift(image: torch.Tensor, dy: int, dx: int, raw) -> torch.Tensor:
    """`image` (normalised) moved by (dy, dx) with the background of a zero pixel filling in."""
    background = (0 - raw.tensors.mean[0]) / raw.tensors.std[0]
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2), value=background)
    return padded[:, 2 + dy:30 + dy, 2 + dx:30 + dx]


def test_a_file_with_other_content_is_refused_naming_it(fake_idx):
    content = dict(fake_idx["content"])
    content["t10k-labels-idx1-ubyte"] = content["t10k-labels-idx1-ubyte"][:-1] + b"\x00"  # the last label, 9, made 0
    write(fake_idx["root"], content)
    with pytest.raises(ColamError) as info:
        build_raw_data("mnist", fake_idx["root"])
    message = str(info.value)
    assert message.startswith(f"data.root: '{fake_idx['root'] / 't10k-labels-idx1-ubyte'}' is not mnist's original ")
    assert "content md5" in message and "\n" not in message


def test_a_missing_file_and_a_broken_gzip_are_one_line(fake_idx):
    files = {f: d for f, d in fake_idx["content"].items() if f != "train-labels-idx1-ubyte"}
    write(fake_idx["root"], files)
    with pytest.raises(ColamError, match=r"^data\.root: no mnist data set found under .*train-labels-idx1-ubyte\[\.gz\]"):
        build_raw_data("mnist", fake_idx["root"])
    (fake_idx["root"] / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really")
    with pytest.raises(ColamError, match=r"^data\.root: '.*train-labels-idx1-ubyte\.gz' is not a readable gzip file"):
        build_raw_data("mnist", fake_idx["root"])


def test_kmnist_is_accepted_as_its_original_gz_only(fake_idx):
    root = fake_idx["root"]
    write(root, fake_idx["content"])  # uncompressed: no digest of KMNIST's content is known
    with pytest.raises(ColamError, match="colam knows no digest of the uncompressed file"):
        build_raw_data("kmnist", root)
    write(root / "KMNIST" / "raw", fake_idx["gz"], ".gz")  # the original archives beside them
    raw = build_raw_data("kmnist", root)
    assert len(raw.train) == 30 and raw.classes == IDX_SETS["kmnist"].cls.classes


def test_copy_writes_the_same_bytes_from_any_source(fake_idx, tmp_path_factory):
    """The DVC copy: uncompressed files in torchvision's layout, identical whether the source was
    gzipped, flat or torchvision-shaped, and written again only where they differ."""
    sources = {"gz": write(fake_idx["root"] / "gz", {f: gzip.compress(d) for f, d in fake_idx["content"].items()},
                           ".gz"),
               "plain": write(fake_idx["root"] / "plain" / "FashionMNIST" / "raw", fake_idx["content"]).parents[1]}
    copies = {}
    for kind, source in sources.items():
        out = tmp_path_factory.mktemp(kind)
        kept = copy_idx_files("fashion_mnist", source, out)
        assert sorted(p.relative_to(out).as_posix() for p in kept) == sorted(f"FashionMNIST/raw/{f}" for f in FILES)
        copies[kind] = {p.name: p.read_bytes() for p in kept}
    assert copies["gz"] == copies["plain"] == fake_idx["content"]
    out = tmp_path_factory.mktemp("again")
    copy_idx_files("fashion_mnist", sources["gz"], out)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    copy_idx_files("fashion_mnist", sources["plain"], out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp


def test_copy_checks_every_file_before_writing_any(fake_idx, tmp_path):
    content = dict(fake_idx["content"])
    content["t10k-images-idx3-ubyte"] = content["t10k-images-idx3-ubyte"][:-1]  # truncated
    source = write(fake_idx["root"] / "source", content)
    out = tmp_path / "out"
    with pytest.raises(ColamError, match="t10k-images-idx3-ubyte' is not fashion_mnist's original"):
        copy_idx_files("fashion_mnist", source, out)
    assert not out.exists()


def test_data_get_into_a_shared_root_never_replaces_or_deletes_the_users_files(fake_idx, tmp_path):
    """data.root may hold the user's own files: one where colam would write is refused before any file is
    written, and the other form of a file colam keeps (.gz beside it) is deleted only where colam wrote it."""
    source = write(fake_idx["root"] / "source", fake_idx["content"])
    out = tmp_path / "shared"
    raw = write(out / "FashionMNIST" / "raw", {"train-labels-idx1-ubyte": b"the user's own",
                                               "t10k-labels-idx1-ubyte": fake_idx["content"]["t10k-labels-idx1-ubyte"]})
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"the user's archive")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ColamError, match=r"train-labels-idx1-ubyte' was not written by colam and is not overwritten"):
        get_data("fashion_mnist", str(source), out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".colam-files"} == before
    (raw / "train-labels-idx1-ubyte").unlink()  # moved away: the copy goes ahead beside the user's files
    before.pop(raw / "train-labels-idx1-ubyte")
    get_data("fashion_mnist", str(source), out)
    assert all(path.read_bytes() == data for path, data in before.items())  # the identical file stays as it was


def test_kmnist_copy_keeps_the_original_archives(fake_idx, tmp_path):
    source = write(fake_idx["root"] / "source", fake_idx["gz"], ".gz")
    kept = copy_idx_files("kmnist", source, tmp_path / "out")
    assert sorted(p.name for p in kept) == sorted(f"{f}.gz" for f in FILES)
    assert len(build_raw_data("kmnist", tmp_path / "out").test) == 10


def test_data_get_bundled_digits_writes_its_arrays_and_their_digests(tmp_path, monkeypatch):
    assert get_data("digits", "bundled", tmp_path / "digits") == ["digits.json", "digits.npz"]
    manifest = json.loads((tmp_path / "digits" / "digits.json").read_text())
    assert manifest["name"] == "digits" and set(manifest["md5"]) == {"train_images", "test_images", "train_targets",
                                                                       "test_targets"}
    again = tmp_path / "again"
    get_data("digits", "bundled", again)
    for written in ("digits.json", "digits.npz"):
        assert (again / written).read_bytes() == (tmp_path / "digits" / written).read_bytes()
    # a run reads the saved arrays (no scikit-learn) and gets scikit-learn's data set exactly
    reference = build_raw_data("digits", tmp_path / "elsewhere")
    for module in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it now fails
    saved = build_raw_data("digits", tmp_path / "digits")
    assert torch.equal(saved.tensors.train, reference.tensors.train) and saved.classes == reference.classes
    assert np.array_equal(saved.test_targets, reference.test_targets) and saved.tensors.std == reference.tensors.std
    # arrays that are not the recorded ones are not used: scikit-learn's are read again
    cio.atomic_write_bytes(tmp_path / "digits" / "digits.npz", cio.npz_bytes({"train_images": np.zeros(3)}))
    monkeypatch.undo()
    assert torch.equal(build_raw_data("digits", tmp_path / "digits").tensors.train, reference.tensors.train)


@pytest.mark.parametrize("name,source,message", [
    ("digits", "download", "--from: digits ships with scikit-learn, it has no other source; use --from bundled"),
    ("fashion_mnist", "bundled", "--from: fashion_mnist is not bundled"),
    ("fashion_mnist", "/nonexistent/folder", "--from: '/nonexistent/folder' is not a folder (nor 'download')"),
    ("cifar10", "/tmp", "--from: colam copies cifar10 from its download only; use --from download"),
])
def test_data_get_refuses_a_source_it_cannot_take(tmp_path, name, source, message):
    with pytest.raises(ColamError) as info:
        get_data(name, source, tmp_path / "out")
    assert str(info.value).startswith(message)
    assert not (tmp_path / "out").exists()


def test_data_get_command_line_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "get", "--set", "data.name=mnist",
                             "--from", str(tmp_path), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("colam: error: data.root: no mnist data set found under ")
    assert result.stderr.count("\n") == 1


# ---------------------------------------------------------------------------- the real data (Debian's package)


@needs_debian_fashion
def test_debian_fashion_mnist_passes_the_integrity_check_and_matches_its_statistics(tmp_path):
    """Debian recompressed the archives (their md5 is not torchvision's), the content is the release's."""
    original = dict(IDX_SETS["fashion_mnist"].cls.resources)
    assert all(hashlib.md5(p.read_bytes()).hexdigest() != original[p.name] for p in DEBIAN_FASHION.glob("*.gz"))
    raw = build_raw_data("fashion_mnist", DEBIAN_FASHION)
    assert (len(raw.train), len(raw.test)) == (60_000, 10_000)
    assert np.bincount(raw.train_targets).tolist() == [6000] * 10
    assert np.bincount(raw.test_targets).tolist() == [1000] * 10
    pixels = raw.tensors.train.float() / 255
    spec = IDX_SETS["fashion_mnist"]
    assert pixels.mean().item() == pytest.approx(spec.mean, abs=1e-4)
    assert pixels.std().item() == pytest.approx(spec.std, abs=1e-4)
    kept = copy_idx_files("fashion_mnist", DEBIAN_FASHION, tmp_path)
    assert {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in kept} == {
        f: digest for f, (digest, _) in CONTENT["fashion_mnist"].items()}


@pytest.mark.parametrize("name", sorted(IDX_SETS))
def test_the_class_names_and_folders_are_torchvisions(name):
    spec = IDX_SETS[name]
    assert list(spec.classes) == spec.cls.classes and spec.class_name == spec.cls.__name__


def test_the_integrity_module_names_every_file_of_the_release():
    assert set(IDX_SETS) == set(CONTENT)
    for name, digests in CONTENT.items():
        assert not digests or set(digests) == set(FILES), name
        assert [f"{f}.gz" for f in FILES] == [r for r, _ in IDX_SETS[name].cls.resources]
    assert idx_datasets.FILES == FILES
