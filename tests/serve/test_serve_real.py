"""The real SmolLM2-135M behind `lorakit serve` (packed weights, batched prefill): a request's greedy output is
token-for-token the same alone and alongside 31 requests for 31 other adapters (one continuous batch), driven
by the official client."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from lorakit.lora.packed import pack_linears  # noqa: E402
from lorakit.serve.app import ServeSettings, create_app  # noqa: E402
from lorakit.serve.engine import Engine  # noqa: E402
from lorakit.serve.server import BackgroundServer  # noqa: E402
from serve_util import add_random_adapters  # noqa: E402

NAMES = [f"task{i}" for i in range(32)]
AREAS = ["riverside", "city centre"]
FOODS = ["French", "Italian", "Japanese", "Chinese", "English", "Indian", "fast food", "Fast food"]


def _prompt(i: int) -> str:
    """E2E-style meaning representations of different lengths (so rows are padded differently)."""
    fields = [f"name[The Place {i}]", f"food[{FOODS[i % 8]}]", f"area[{AREAS[i % 2]}]"]
    fields += [f"priceRange[£{20 + i}-25]", "familyFriendly[yes]", "near[Café Rouge]"][: i % 4]
    return ", ".join(fields) + "\nDescription:"


@pytest.mark.slow
def test_smollm2_greedy_alone_equals_alongside_31_other_adapters(smollm2):
    model, tok = smollm2
    add_random_adapters(model, NAMES, std=0.05)
    pack_linears(model)  # as lorakit serve runs it
    engine = Engine(model, tok, max_batch=32, max_queue=64)
    app = create_app(engine, ServeSettings(base_name="smollm2-135m", max_tokens_cap=64, max_model_len=512))
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=1200)

        def complete(i: int) -> str:
            return client.completions.create(model=NAMES[i], prompt=_prompt(i), max_tokens=16,
                                             temperature=0).choices[0].text

        together: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, complete(i))) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(1200)
        assert len(together) == 32
        assert engine.stats["peak_batch"] >= 16, engine.stats  # they really shared decode steps
        assert engine.stats["peak_prefill"] >= 2, engine.stats  # and prefill passes
        for i in (0, 17, 31):
            assert complete(i) == together[i], f"request {i} differs alone vs in the mixed batch"
        assert len({together[i] for i in range(32)}) > 16  # the adapters do change the text
