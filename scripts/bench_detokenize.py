"""The engine's text per generated token: re-decoding everything against ``lorakit.serve.detokenize.TextStream``.

For a decode batch of 32 rows, the time one step spends turning each row's newest token into its text so
far, at several lengths of generated text (SmolLM2-135M's tokenizer, real E2E references as the
"generated" tokens), the two sides alternated in one process; the texts are checked equal.

    python scripts/bench_detokenize.py [--lengths 64,256,1024,2048] [--rows 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lorakit.io.models import load_tokenizer, model_path
from lorakit.serve.detokenize import TextStream


def _ids(tokenizer, path: Path, length: int) -> list[int]:
    text = " ".join(line.split("||")[-1].strip() for line in path.read_text().splitlines()[:2000])
    return tokenizer(text, add_special_tokens=False).input_ids[:length]


def _step_ms(tokenizer, ids: list[int], rows: int, incremental: bool) -> float:
    """Milliseconds the last ``min(64, len)`` tokens took per step, for ``rows`` identical rows."""
    decode = lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True)  # noqa: E731
    grown: list[int] = []
    streams = [TextStream(decode, grown) for _ in range(rows)]
    timed = min(64, len(ids))
    start = 0.0
    for n, token in enumerate(ids, 1):
        if n == len(ids) - timed + 1:
            start = time.perf_counter()
        grown.append(token)
        for stream in streams:
            text = stream.text() if incremental else decode(ids[:n])
    assert text == decode(ids)
    return (time.perf_counter() - start) / timed * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64,256,1024,2048")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/e2e/valid.txt"))
    args = parser.parse_args()
    tokenizer = load_tokenizer(model_path("smollm2-135m"))
    print(f"{'generated tokens':>16} | {'re-decode ms/step':>17} | {'TextStream ms/step':>18} | ratio")
    for length in (int(n) for n in args.lengths.split(",")):
        ids = _ids(tokenizer, args.data, length)
        full, stream = [], []
        for _ in range(3):  # alternate, so drift in the machine hits both sides alike
            full.append(_step_ms(tokenizer, ids, args.rows, incremental=False))
            stream.append(_step_ms(tokenizer, ids, args.rows, incremental=True))
        print(f"{len(ids):>16} | {min(full):>17.2f} | {min(stream):>18.2f} | {min(full) / min(stream):.1f} ×")


if __name__ == "__main__":
    main()
