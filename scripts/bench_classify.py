"""`lorakit classify` rows/s next to a plain transformers ``pipeline("text-classification")`` loop over the same
rows on the merged model, interleaved in one process (the same threads, the same machine load).

    python scripts/bench_classify.py --model minilm-l6 --adapter runs/debates/debates-lorakit-s1 \
        --input runs/debates/data/test.csv --rows 1000 --repeats 3

Both sides truncate at the adapter's max_length and use batches of --batch-size; the pipeline returns every
class's score (``top_k=None``), as classify writes every probability. Prints rows/s per side and the ratio.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorakit.classify import Settings, classify_file, load_classifier, read_head
from lorakit.io.files import load_adapter
from lorakit.io.models import load_model, quiet_third_party_notices
from lorakit.lora.adapters import merge_and_unload


def _rows(source: Path, n: int, folder: Path) -> tuple[Path, list[str]]:
    """The first ``n`` rows of ``source`` (cycled when it has fewer), without labels, as a CSV."""
    with open(source, encoding="utf-8", newline="") as fh:
        texts = [r["text"] for r in csv.DictReader(fh)]
    texts = list(itertools.islice(itertools.cycle(texts), n))
    path = folder / "rows.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text"])
        writer.writerows([t] for t in texts)
    return path, texts


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--adapter", required=True)
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    quiet_third_party_notices()
    from transformers import pipeline

    head = read_head("a", args.adapter)
    settings = Settings(max_length=int(head.settings.get("max_length", 128)), batch_size=args.batch_size)
    model, tok = load_classifier(args.model, [head], "cpu")
    merged, mtok = load_model(args.model, "seq-cls", num_labels=head.spec.num_labels)
    load_adapter(merged, args.adapter)
    merged = merge_and_unload(merged).eval()
    pipe = pipeline("text-classification", model=merged, tokenizer=mtok, device=-1)
    with tempfile.TemporaryDirectory() as tmp:
        source, texts = _rows(args.input, args.rows, Path(tmp))
        times: dict[str, list[float]] = {"lorakit classify": [], "transformers pipeline": []}
        for _ in range(args.repeats):
            started = time.perf_counter()
            classify_file(model, tok, {"a": head}, source, Path(tmp) / "out.csv", settings)
            times["lorakit classify"].append(time.perf_counter() - started)
            started = time.perf_counter()
            with torch.no_grad():
                out = list(pipe(texts, batch_size=args.batch_size, truncation=True, max_length=settings.max_length,
                                top_k=None))
            times["transformers pipeline"].append(time.perf_counter() - started)
            assert len(out) == len(texts)
            print("repeat: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    rate = {k: args.rows / statistics.median(v) for k, v in times.items()}
    for k, v in rate.items():
        print(f"{k}: {v:.1f} rows/s (median of {args.repeats}, {args.rows} rows, batch {args.batch_size}, "
              f"{torch.get_num_threads()} threads)")
    print(f"ratio classify / pipeline: {rate['lorakit classify'] / rate['transformers pipeline']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
