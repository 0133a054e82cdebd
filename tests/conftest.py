"""Shared fixtures: the real data folder beside the project, the examples' modules."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MIXPREC_TEST_DATA", ROOT.parent / "shared" / "data"))
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    folder = SHARED_DATA / "fashion-mnist"
    if not folder.is_dir():
        pytest.fail(f"test data missing: {folder} (tests need ../shared/data beside the project)")
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The data root holding stsb/ and sst2/."""
    if not (SHARED_DATA / "stsb").is_dir() or not (SHARED_DATA / "sst2").is_dir():
        pytest.fail(f"test data missing: {SHARED_DATA}/stsb or /sst2 (tests need ../shared/data beside the project)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def import_example() -> Callable[[str], ModuleType]:
    """Import a module of examples/ (they import each other by plain name) without leaving
    examples/ on ``sys.path``."""
    def load(name: str) -> ModuleType:
        sys.path.insert(0, str(EXAMPLES))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(EXAMPLES))
    return load


@pytest.fixture(scope="session")
def tokenizer(shared_data: Path):  # noqa: ANN201
    """A byte-level BPE tokenizer of 384 tokens trained by the ``tokenizers`` library on STS-B sentences (a
    ``transformers.PreTrainedTokenizerFast``; end token ``<|endoftext|>``)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mixprec.datasets.text_tasks import load_stsb_test

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(load_stsb_test(shared_data).first[:500]), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")
