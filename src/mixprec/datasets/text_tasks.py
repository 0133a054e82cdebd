"""Sentence tasks for the transformer study: STS Benchmark (test) and SST-2 (GLUE).

Files (see ``../shared/data/README.md``):
- ``stsb/stsb-test.tsv``: tab-separated, no header, first seven columns genre, file, year,
  id, score (0..5), sentence1, sentence2 (some lines carry more columns, ignored);
- ``sst2/dev.tsv`` and ``sst2/train-phrases.tsv``: header ``sentence<TAB>label``, label 0/1.

Search order for each file: the explicit ``root`` (a data folder holding ``stsb/`` and
``sst2/``), then ``$MIXPREC_DATA``, then the user cache ``~/.cache/mixprec``. There is no
download: the error says where to put the files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mixprec.errors import DataError

STSB_TEST = ("stsb", "stsb-test.tsv")
SST2_FILES = {"dev": ("sst2", "dev.tsv"), "train": ("sst2", "train-phrases.tsv")}


@dataclass(frozen=True)
class SentencePairs:
    """STS-B pairs: ``first[i]`` and ``second[i]`` with gold similarity ``scores[i]`` in [0, 5]."""

    first: tuple[str, ...]
    second: tuple[str, ...]
    scores: tuple[float, ...]


@dataclass(frozen=True)
class LabelledSentences:
    """SST-2 sentences with labels 0 (negative) or 1 (positive)."""

    sentences: tuple[str, ...]
    labels: tuple[int, ...]


def data_roots(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Data folders searched, in order (see module docstring)."""
    roots = [Path(root)] if root is not None else []
    if os.environ.get("MIXPREC_DATA"):
        roots.append(Path(os.environ["MIXPREC_DATA"]))
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    roots.append(Path(base) / "mixprec")
    return roots


def locate(parts: tuple[str, str], root: str | os.PathLike[str] | None = None) -> Path:
    """The first existing ``<data root>/<folder>/<file>``; an explicit root must hold it."""
    if root is not None:
        path = Path(root).joinpath(*parts)
        if not path.is_file():
            raise DataError(f"{str(root)!r} has no {'/'.join(parts)}")
        return path
    for folder in data_roots():
        if folder.joinpath(*parts).is_file():
            return folder.joinpath(*parts)
    searched = ", ".join(str(folder) for folder in data_roots())
    raise DataError(f"{'/'.join(parts)} not found under {searched}; pass --data DIR (a folder holding "
                    f"{parts[0]}/) or set MIXPREC_DATA")


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    return [line for line in text.splitlines() if line.strip()]


def load_stsb_test(root: str | os.PathLike[str] | None = None) -> SentencePairs:
    """The 1,379 STS-B test pairs, validated (seven columns at least, scores in [0, 5])."""
    path = locate(STSB_TEST, root)
    first, second, scores = [], [], []
    for number, line in enumerate(_lines(path), start=1):
        columns = line.split("\t")
        if len(columns) < 7:
            raise DataError(f"{path}:{number}: {len(columns)} tab-separated columns, expected at least 7")
        try:
            score = float(columns[4])
        except ValueError:
            raise DataError(f"{path}:{number}: score {columns[4]!r} is not a number") from None
        if not 0.0 <= score <= 5.0:
            raise DataError(f"{path}:{number}: score {score} outside [0, 5]")
        first.append(columns[5].strip())
        second.append(columns[6].strip())
        scores.append(score)
    if not scores:
        raise DataError(f"{path}: no sentence pairs")
    return SentencePairs(tuple(first), tuple(second), tuple(scores))


def load_sst2(split: str, root: str | os.PathLike[str] | None = None) -> LabelledSentences:
    """SST-2 ``"dev"`` (872 sentences) or ``"train"`` (60,614 phrases), validated."""
    if split not in SST2_FILES:
        raise DataError(f"SST-2 split must be one of {sorted(SST2_FILES)}, got {split!r}")
    path = locate(SST2_FILES[split], root)
    lines = _lines(path)
    if not lines or lines[0].split("\t")[:2] != ["sentence", "label"]:
        raise DataError(f"{path}: expected the header 'sentence<TAB>label'")
    sentences, labels = [], []
    for number, line in enumerate(lines[1:], start=2):
        sentence, _, label = line.rpartition("\t")
        if label.strip() not in ("0", "1") or not sentence.strip():
            raise DataError(f"{path}:{number}: expected 'sentence<TAB>0|1', got {line[:60]!r}")
        sentences.append(sentence.strip())
        labels.append(int(label))
    return LabelledSentences(tuple(sentences), tuple(labels))
