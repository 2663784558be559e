"""An over-fitting run: the last step's adapter against the best validation's, and early stopping.

``--n`` SST-2 training sentences for many epochs on MiniLM-L6, validated each epoch on ``--n`` other training
sentences, scored on SST-2's 872 dev sentences (never seen by training or selection). The first run publishes
the last step (``--keep last``); its ``checkpoints/best`` is scored too. The second stops early (patience
``--patience``, ``--keep best``); it shares the seed, so its trajectory is the first's up to its stop. Prints
one JSON line per adapter and a table; the files are built in a temporary folder from the shared GLUE data.

    python scripts/select_overfit.py --glue ../shared/data/glue [--n 160] [--epochs 12] [--patience 3]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from lorakit.training.config import TrainConfig
from lorakit.training.scoring import evaluate_model
from lorakit.training.trainer import train


def write_split(glue: Path, folder: Path, n: int, seed: int) -> None:
    """train.tsv and valid.tsv (``n`` disjoint SST-2 training sentences each) and test.tsv (SST-2 dev)."""
    lines = (glue / "SST-2" / "train.tsv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    picked = random.Random(seed).sample(rows, 2 * n)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("\n".join([header, *picked[:n]]) + "\n")
    (folder / "valid.tsv").write_text("\n".join([header, *picked[n:]]) + "\n")
    (folder / "test.tsv").write_text((glue / "SST-2" / "dev.tsv").read_text())


def run(data: Path, out: Path, args: argparse.Namespace, **kw) -> dict[str, dict]:
    """One training run; the test score of what it published (and, with ``keep last``, of its best step)."""
    cfg = TrainConfig(
        model="minilm-l6", task="text", data=str(data), out=str(out), text_column="sentence",
        epochs=args.epochs, batch_size=16, seed=args.seed, plot=False, keep_checkpoints=1, **kw,
    )  # fmt: skip
    scores = train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    select = next(r for r in records if r["split"] == "select")
    valid = {r["step"]: r["accuracy"] for r in records if r["split"] == "valid"}
    best = max(valid, key=lambda s: (valid[s], -s))
    name = "early-stop" if select["stopped_early"] else cfg.keep
    found = {name: {"step": select["step"], "last_step": select["last_step"], "valid_accuracy": valid[select["step"]],
                    "test_accuracy": scores["accuracy"]}}  # fmt: skip
    if cfg.keep == "last":
        best_scores, _ = evaluate_model(cfg, str(out / "checkpoints" / "best"))
        found["best"] = {"step": best, "last_step": select["last_step"], "valid_accuracy": valid[best],
                         "test_accuracy": best_scores["accuracy"]}  # fmt: skip
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue", type=Path, default=Path("../shared/data/glue"))
    parser.add_argument("--n", type=int, default=160, help="training (and validation) sentences")
    parser.add_argument("--epochs", type=float, default=12.0)
    parser.add_argument("--patience", type=int, default=3, help="0: no early-stopping run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="select-overfit-") as tmp:
        data = Path(tmp) / "data"
        write_split(args.glue, data, args.n, seed=0)
        results = run(data, Path(tmp) / "last", args, keep="last")
        if args.patience:
            results.update(run(data, Path(tmp) / "stop", args, keep="best", early_stopping_patience=args.patience))
    for name, r in results.items():
        print(json.dumps({"adapter": name, **r}))
    print(f"{'adapter':<11} {'step':>9} {'valid acc':>9} {'test acc':>8}")
    for name, r in results.items():
        print(f"{name:<11} {r['step']:>4}/{r['last_step']:<4} {r['valid_accuracy']:>9.4f} {r['test_accuracy']:>8.4f}")


if __name__ == "__main__":
    main()
