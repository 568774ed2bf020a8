"""Loading never reaches for the network: with offline mode unset and the Hub's HTTP client
replaced by one that records every request and answers 404, a missing relative name (what an
unset SETOK_WEIGHTS gives) fails at once naming the setting, and a saved local tokenizer
loads without a request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants
from transformers import AutoTokenizer, LlamaForCausalLM

from setokim.model.config import SeTokIMConfig
from setokim.model.local import load_local, load_text_tokenizer
from setokim.model.setokim import SeTokIM
from setokim.model.text_tokenizer import build_text_tokenizer

MISSING = "weights/vicuna-7b-v1.5"  # relative, shaped like a Hub repo id


@pytest.fixture
def hub_requests(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every URL huggingface_hub tries to fetch; each is answered 404 (a raised connection
    error would be retried with backoff for tens of seconds)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen: list[str] = []

    def refuse(request: httpx2.Request) -> httpx2.Response:
        seen.append(str(request.url))
        return httpx2.Response(404, request=request)

    huggingface_hub.set_client_factory(
        lambda: httpx2.Client(transport=httpx2.MockTransport(refuse))
    )
    try:
        yield seen
    finally:
        huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


def test_the_refusing_client_is_what_an_unguarded_load_would_hit(hub_requests, tmp_path):
    """Control: a plain from_pretrained of the same name does go to the Hub (so the checks
    below would see a request if the loaders made one)."""
    with pytest.raises(Exception):  # noqa: B017 - whichever error the Hub path raises
        AutoTokenizer.from_pretrained(MISSING, cache_dir=str(tmp_path / "hf"))
    assert hub_requests, "the unguarded load made no request: the control is not wired"


def test_missing_text_tokenizer_fails_fast_naming_it(hub_requests):
    with pytest.raises(FileNotFoundError, match="text_tokenizer_path 'weights/vicuna-7b-v1.5'"):
        load_text_tokenizer(MISSING, "text_tokenizer_path")
    cfg = SeTokIMConfig()
    cfg.text_tokenizer_path = MISSING
    with pytest.raises(FileNotFoundError, match="text_tokenizer_path"):
        SeTokIM.from_config(cfg)
    assert hub_requests == []


def test_missing_llm_weights_fail_fast_naming_them(hub_requests):
    cfg = SeTokIMConfig()
    cfg.llm.pretrained_path = MISSING
    with pytest.raises(FileNotFoundError, match="llm.pretrained_path 'weights/vicuna-7b-v1.5'"):
        SeTokIM.from_config(cfg)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_local(LlamaForCausalLM, MISSING, "llm.pretrained_path")
    assert hub_requests == []


def test_local_directories_load_without_a_request(hub_requests, tmp_path: Path):
    saved = tmp_path / "tok"
    build_text_tokenizer().save_pretrained(saved)
    tok = load_text_tokenizer(saved)
    assert tok("a red circle")["input_ids"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError):  # a directory without a checkpoint: local error, no Hub
        load_local(LlamaForCausalLM, empty, "llm.pretrained_path")
    assert hub_requests == []
