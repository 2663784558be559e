"""Fixtures shared by the serve tests: SmolLM2's real tokenizer and one random adapter on a tiny model."""

import pytest

from serve_util import save_random_adapters, tiny_lm


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="module")
def adapter_dir(tok, tmp_path_factory) -> str:
    return save_random_adapters(lambda: tiny_lm(tok), ["a0"], tmp_path_factory.mktemp("adapters"))["a0"]
