"""The Fashion-MNIST loader on the real files, and on damaged copies of them."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from mixprec import DataError
from mixprec.datasets import fashion_mnist
from mixprec.datasets.idx import read_idx, read_idx_bytes


def test_loads_the_real_files(fashion_dir: Path) -> None:
    train = fashion_mnist.load_split("train", fashion_dir)
    test = fashion_mnist.load_split("test", fashion_dir)
    assert train.images.shape == (60000, 28, 28) and test.labels.shape == (10000,)
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_real_files_match_the_published_checksums(fashion_dir: Path) -> None:
    for stem, (digest, _) in fashion_mnist.FILES.items():
        assert hashlib.sha256(read_idx_bytes(fashion_dir / f"{stem}.gz")).hexdigest() == digest


def test_search_order_uses_mixprec_data(fashion_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MIXPREC_DATA", str(fashion_dir.parent))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fashion_mnist.locate(download=False) == fashion_dir


def test_missing_data_says_where_to_put_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MIXPREC_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "none")
    with pytest.raises(DataError, match="download from .* failed.*--data DIR"):
        fashion_mnist.locate(url=(tmp_path / "no-server").as_uri() + "/")
    with pytest.raises(DataError, match="lacks Fashion-MNIST files"):
        fashion_mnist.locate(tmp_path)


def test_download_verifies_checksums(fashion_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for stem in fashion_mnist.FILES:
        (mirror / f"{stem}.gz").write_bytes((fashion_dir / f"{stem}.gz").read_bytes())
    target = tmp_path / "cache"
    assert fashion_mnist.download_to(target, mirror.as_uri() + "/") == target
    assert fashion_mnist.load_split("test", target).images.shape == (10000, 28, 28)
    wrong = gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00")
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(wrong)
    (target / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="SHA-256"):
        fashion_mnist.download_to(target, mirror.as_uri() + "/")
    assert not (target / "t10k-labels-idx1-ubyte.gz").exists()


def write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> Path:
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload)
    return path


def test_wrong_magic_truncation_and_counts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="magic number 0x00000801, expected 0x00000803"):
        read_idx(write_idx(tmp_path / "a", 0x801, (4,), bytes(4)), ndim=3)
    with pytest.raises(DataError, match="truncated or padded"):
        read_idx(write_idx(tmp_path / "b", 0x803, (2, 2, 2), bytes(7)), ndim=3)
    gz = tmp_path / "c.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + bytes(5))[:-6])
    with pytest.raises(DataError, match="damaged or truncated gzip"):
        read_idx(gz, ndim=1)
    folder = tmp_path / "wrong-counts"
    folder.mkdir()
    write_idx(folder / "t10k-images-idx3-ubyte", 0x803, (10, 28, 28), bytes(7840))
    write_idx(folder / "t10k-labels-idx1-ubyte", 0x801, (10,), bytes(10))
    write_idx(folder / "train-images-idx3-ubyte", 0x803, (1, 28, 28), bytes(784))
    write_idx(folder / "train-labels-idx1-ubyte", 0x801, (1,), bytes(1))
    with pytest.raises(DataError, match=r"shape \(10, 28, 28\), expected \(10000, 28, 28\)"):
        fashion_mnist.load_split("test", folder)
    with pytest.raises(DataError, match="split must be one of"):
        fashion_mnist.load_split("validation", folder)
