"""Loading Hugging Face models by hub name when the Hub cannot be reached: one short probe, then the local cache
only, and an error that says so (huggingface_hub alone retries for about 23 s)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

pytest.importorskip("transformers")

from mixprec import hf  # noqa: E402
from mixprec.errors import DataError  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_probe():
    hf._hub_unreachable.cache_clear()
    yield
    hf._hub_unreachable.cache_clear()


def test_the_probe_names_the_endpoint_and_why_it_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(request: urllib.request.Request, timeout: float) -> None:
        assert request.get_method() == "HEAD" and timeout == hf.HUB_PROBE_TIMEOUT_S
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", refused)
    assert hf._hub_unreachable() == "https://huggingface.co cannot be reached (Name or service not known)"


def test_any_http_answer_counts_as_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(request: urllib.request.Request, timeout: float) -> None:
        raise urllib.error.HTTPError(request.full_url, 403, "Forbidden", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", forbidden)
    assert hf._hub_unreachable() is None
    assert hf._source("org/model") == ("org/model", {})


def test_an_unreachable_hub_loads_from_the_cache_only_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    monkeypatch.setattr(hf, "_hub_unreachable", lambda: "https://huggingface.co cannot be reached (test)")
    asked: dict = {}

    def from_pretrained(source: str, **kwargs: object) -> None:
        asked.update(kwargs, source=source)
        raise OSError("not in the cache")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(DataError, match=r"'no-such/model': it is not a local folder and not in the Hugging Face "
                                        r"cache, and https://huggingface.co cannot be reached \(test\)"):
        hf.load_pretrained("no-such/model", causal_lm=True)
    assert asked["source"] == "no-such/model" and asked["local_files_only"] is True
