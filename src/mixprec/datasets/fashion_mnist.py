"""Fashion-MNIST: locate, download (with checksum) and load.

Search order for the folder holding the four ``*-ubyte.gz`` (or uncompressed) files:
1. the explicit ``root`` argument;
2. ``$MIXPREC_DATA/fashion-mnist`` (``MIXPREC_DATA`` names a data root);
3. the user cache, ``$XDG_CACHE_HOME/mixprec/fashion-mnist`` (default ``~/.cache``);
4. Debian's ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``);
5. a download into the user cache, verified against the SHA-256 of the decompressed files.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import Progress

from mixprec.datasets.idx import parse_idx, read_idx_bytes
from mixprec.errors import DataError

DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

#: stem -> (SHA-256 of the decompressed file, number of items)
FILES: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 60000),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60000),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 10000),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10000),
}
SPLITS = {"train": "train", "test": "t10k"}


@dataclass(frozen=True)
class Split:
    """Images ``[N, 28, 28]`` and labels ``[N]``, both uint8."""

    images: np.ndarray
    labels: np.ndarray


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mixprec" / "fashion-mnist"


def _file_in(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _complete(folder: Path) -> bool:
    return all(_file_in(folder, stem) for stem in FILES)


def candidate_dirs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders searched, in order (see module docstring)."""
    dirs = []
    if root is not None:
        dirs.append(Path(root))
    if os.environ.get("MIXPREC_DATA"):
        dirs.append(Path(os.environ["MIXPREC_DATA"]) / "fashion-mnist")
    dirs += [cache_dir(), SYSTEM_DIR]
    return dirs


def locate(root: str | os.PathLike[str] | None = None, download: bool = True,
           url: str = DOWNLOAD_URL) -> Path:
    """The folder holding all four files; downloads them into the cache if none does.

    An explicit ``root`` that lacks the files is an error (no silent fallback).
    """
    if root is not None:
        if not _complete(Path(root)):
            missing = [stem for stem in FILES if not _file_in(Path(root), stem)]
            raise DataError(f"{str(root)!r} lacks Fashion-MNIST files {missing} (.gz or uncompressed)")
        return Path(root)
    for folder in candidate_dirs():
        if _complete(folder):
            return folder
    searched = ", ".join(str(d) for d in candidate_dirs())
    if not download:
        raise DataError(f"Fashion-MNIST not found in {searched}; pass --data DIR or set MIXPREC_DATA")
    try:
        return download_to(cache_dir(), url)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(
            f"Fashion-MNIST not found (searched {searched}) and the download from {url} failed ({exc}). "
            "Put the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in one folder and pass it as "
            "--data DIR, or set MIXPREC_DATA to a folder holding fashion-mnist/."
        ) from None


def download_to(folder: Path, url: str = DOWNLOAD_URL) -> Path:
    """Download the four files into ``folder`` with a progress bar, verifying checksums.

    Each file is fetched to a temporary name and renamed only after its decompressed
    content matches the published SHA-256.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with Progress(transient=True) as progress:
        for stem, (digest, _) in FILES.items():
            target = folder / f"{stem}.gz"
            if target.is_file():
                continue
            tmp = folder / f".{stem}.gz.part"
            with urllib.request.urlopen(f"{url}{stem}.gz", timeout=60) as response, tmp.open("wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                task = progress.add_task(f"downloading {stem}.gz", total=total)
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    progress.update(task, advance=len(chunk))
            actual = hashlib.sha256(read_idx_bytes(tmp)).hexdigest()
            if actual != digest:
                tmp.unlink()
                raise DataError(f"{stem}.gz from {url} has SHA-256 {actual} (decompressed), expected {digest}")
            os.replace(tmp, target)
    return folder


def load_split(split: str, root: str | os.PathLike[str] | None = None, download: bool = True) -> Split:
    """Load ``"train"`` (60,000) or ``"test"`` (10,000) images and labels, fully validated."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    folder = locate(root, download=download)
    prefix = SPLITS[split]
    image_stem, label_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    image_path, label_path = _file_in(folder, image_stem), _file_in(folder, label_stem)
    assert image_path is not None and label_path is not None
    images = parse_idx(read_idx_bytes(image_path), image_path.name, ndim=3)
    labels = parse_idx(read_idx_bytes(label_path), label_path.name, ndim=1)
    expected = FILES[image_stem][1]
    if images.shape != (expected, 28, 28):
        raise DataError(f"{image_path.name}: shape {images.shape}, expected ({expected}, 28, 28)")
    if labels.shape != (expected,):
        raise DataError(f"{label_path.name}: {labels.shape[0]} labels, expected {expected}")
    if labels.max() >= len(CLASSES):
        raise DataError(f"{label_path.name}: label {int(labels.max())} out of range 0..9")
    return Split(images=images, labels=labels)
