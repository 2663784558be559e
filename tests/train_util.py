"""Helpers for tests that train: a small-budget ``TrainConfig`` and a toy, learnable text-classification set."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.training.config import TrainConfig


def base_cfg(**kw) -> TrainConfig:
    """A TrainConfig for a few steps on a tiny model; ``kw`` overrides (task and data are required).

    Args:
        kw: TrainConfig fields.
    """
    defaults = dict(batch_size=8, max_steps=4, eval_batch_size=16, max_length=32, log_interval=1, plot=False)
    return TrainConfig(**{**defaults, **kw})


def write_sentiment_csv(folder: Path, n_train: int = 48, n_test: int = 16) -> Path:
    """A toy, learnable text-classification set: the label is which word the sentence contains.

    Args:
        folder: where ``train.csv`` and ``test.csv`` go (created).
        n_train: training rows.
        n_test: test rows.
    """
    folder.mkdir(parents=True, exist_ok=True)
    words = ["movie", "film", "plot", "actor", "scene", "story", "ending", "music"]
    for name, n in (("train", n_train), ("test", n_test)):
        lines = ["text,label"]
        for i in range(n):
            label = "pos" if i % 2 == 0 else "neg"
            cue = "wonderful great" if label == "pos" else "awful terrible"
            lines.append(f"the {words[i % len(words)]} was {cue} number {i},{label}")
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return folder


def write_jsonl(path: Path, records: list) -> Path:
    """One line per record: strings as they are, anything else as JSON.

    Args:
        path: the file to write.
        records: dicts or raw lines.
    """
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat(*turns: tuple[str, str]) -> dict:
    """``{"messages": [...]}`` from (role, content) pairs.

    Args:
        turns: the chat's (role, content) pairs.
    """
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def write_chat_folder(folder: Path) -> Path:
    """An SFT folder of 24 one-turn colour chats (train), 4 of them (valid) and two prompt/completion records
    (test: one format a file; files of a run may differ, so the chat-trained model is scored on plain prompts).

    Args:
        folder: the folder to create.
    """
    folder.mkdir()
    colours = ["red", "blue", "green", "black", "white", "pink"]
    rows = [chat(("user", f"Colour {i}?"), ("assistant", colours[i % 6])) for i in range(24)]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "valid.jsonl", rows[:4])
    write_jsonl(folder / "test.jsonl", [{"prompt": "Say yes:", "completion": " yes"},
                                        {"prompt": "Colour 5?", "completion": " pink"}])
    return folder


def run_config(model: Path, data: Path, out: Path) -> TrainConfig:
    """The resume tests' run: 5 steps per epoch; checkpoints at 3 and 6; valid at 4 and 8; a kill after
    step 7 loses step 7's work and its log line, in the second epoch.

    Args:
        model: the base model folder.
        data: the data folder.
        out: the run folder.
    """
    return base_cfg(
        model=str(model), task="text", data=str(data), out=str(out), max_steps=9, save_interval=3,
        eval_interval=4, dropout=0.1, lr=2e-3, log_interval=1, keep_checkpoints=0,
    )  # fmt: skip


def cli_args(cfg: TrainConfig) -> list[str]:
    """``lorakit train`` flags that give ``cfg`` (the fields ``run_config`` sets).

    Args:
        cfg: a ``run_config`` config.
    """
    return [
        "--model", cfg.model, "--task", cfg.task, "--data", cfg.data, "--out", cfg.out,
        "--max-steps", str(cfg.max_steps), "--save-interval", str(cfg.save_interval),
        "--eval-interval", str(cfg.eval_interval), "--dropout", str(cfg.dropout), "--lr", str(cfg.lr),
        "--log-interval", "1", "--keep-checkpoints", "0", "--batch-size", str(cfg.batch_size),
        "--eval-batch-size", str(cfg.eval_batch_size), "--max-length", str(cfg.max_length), "--no-plot",
    ]  # fmt: skip


def train_records(out: Path) -> list[dict]:
    """A run's metrics.jsonl records without timings (what two equal runs share).

    Args:
        out: the run folder.
    """
    keep = ("split", "step", "loss", "lr", "accuracy", "macro_f1")  # not timings
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keep if k in r} for r in records]


def trainable_names(model) -> set[str]:
    """The names of the parameters that train.

    Args:
        model: a prepared model.
    """
    return {n for n, p in model.named_parameters() if p.requires_grad}


def stsb_folder(root, splits=(("train", 16), ("dev", 8))):
    """A GLUE STS-B folder of made-up pairs with the real file layout."""
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    folder = root / "STS-B"
    folder.mkdir()
    for split, n in splits:
        rows = [header] + [
            f"{i}\tmain-news\tf\t2012\t{i}\tnone\tnone\ta man plays {i}\ta man is playing {i}\t{i * 0.7 % 5:.3f}"
            for i in range(n)
        ]
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return folder
