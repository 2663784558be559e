"""Shared fixtures. Real models are converted once (cached on disk) and loaded fresh per test, since
LoRA injection mutates a model; loading the converted safetensors takes well under a second. Tiny saved
models (``tiny_bert``, ``tiny_llama``: folders, from ``tiny.make_tiny_*``) are built once per test module.

Test helpers are imported bare (``from tiny import ...``): pytest puts this folder on ``sys.path``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No network here or in CI: never let transformers/PEFT try a hub lookup.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from lorakit.io.models import model_path

    return model_path("smollm2-135m")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from lorakit.io.models import model_path

    return model_path("minilm-l6")


@pytest.fixture
def smollm2(smollm2_path):
    """(model, tokenizer): a fresh SmolLM2-135M in fp32, eval mode."""
    from lorakit.io.models import load_model

    model, tok = load_model("smollm2-135m")
    return model.eval(), tok


@pytest.fixture
def minilm_cls(minilm_path):
    """(model, tokenizer): a fresh MiniLM-L6 sequence classifier (2 labels, head seeded)."""
    from lorakit.io.models import load_model

    torch.manual_seed(0)
    model, tok = load_model("minilm-l6", task="seq-cls", num_labels=2)
    return model.eval(), tok


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BERT folder with the MiniLM tokenizer (``tiny.make_tiny_bert``)."""
    from tiny import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama folder with the SmolLM2 tokenizer (``tiny.make_tiny_llama``)."""
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def one_thread():
    """2 shared cores: one intra-op thread per process avoids oversubscription stalls (and varies less)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a model is loaded (bad input must be refused first)."""
    import lorakit.io.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the input is invalid")

    monkeypatch.setattr(lorakit.io.models, "load_model", refuse)

