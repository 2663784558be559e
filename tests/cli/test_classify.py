"""`lorakit classify`: rows routed to different adapters in one batch equal each adapter alone, the metrics
agree with `lorakit eval`, the output reads back, and a 100,000-row file runs in bounded memory."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.classify import Settings, classify_file, load_classifier, read_head
from lorakit.cli import main
from serve_util import save_random_adapters, tiny_classifier

WORDS = ["good", "bad", "film", "long", "dull", "great", "plot", "acting", "slow", "fun", "the", "a"]


def _texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * k + k) % len(WORDS)] for k in range(1, 2 + i % 9)) for i in range(n)]


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def setup(minilm_path, tmp_path_factory):
    """A tiny BERT classifier saved as a model folder, and two random LoRA adapters with their own heads."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("classify")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    base = root / "base"
    tiny_classifier(tok).save_pretrained(base)
    tok.save_pretrained(base)
    adapters = save_random_adapters(lambda: tiny_classifier(tok), ["c0", "c1"], root / "adapters",
                                    modules_to_save=("classifier",))
    return root, str(base), adapters


def _run(base: str, adapters: dict[str, str], source: Path, out: Path, **settings):
    heads = {name: read_head(name, path) for name, path in adapters.items()}
    model, tok = load_classifier(base, list(heads.values()), "cpu")
    return classify_file(model, tok, heads, source, out, Settings(**settings))


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_two_adapters_per_row_equal_each_adapter_alone(setup):
    root, base, adapters = setup
    texts = _texts(40)
    routes = ["c0" if i % 3 else "c1" for i in range(40)]
    mixed_in = _write_csv(root / "mixed.csv", ["id", "text", "adapter"],
                          [[i, t, a] for i, (t, a) in enumerate(zip(texts, routes))])
    result = _run(base, adapters, mixed_in, root / "mixed.out.csv", batch_size=7)
    mixed = _read(root / "mixed.out.csv")
    assert result.rows == 40 and [r["id"] for r in mixed] == [str(i) for i in range(40)]
    assert list(mixed[0]) == ["id", "text", "prediction", "prob_0", "prob_1", "prob_2", "adapter"]
    plain = _write_csv(root / "plain.csv", ["id", "text"], [[i, t] for i, t in enumerate(texts)])
    for name in ("c0", "c1"):
        _run(base, {name: adapters[name]}, plain, root / f"{name}.out.csv", batch_size=16)
        alone = _read(root / f"{name}.out.csv")
        for row, single in zip(mixed, alone):
            if row["adapter"] != name:
                continue
            assert single["adapter"] == name and row["prediction"] == single["prediction"]
            for k in ("prob_0", "prob_1", "prob_2"):
                assert float(row[k]) == pytest.approx(float(single[k]), abs=1e-5)
    assert {r["adapter"] for r in mixed} == {"c0", "c1"}
    assert {r["prediction"] for r in mixed} != {""}
    pandas = pytest.importorskip("pandas")  # a user's first reader: the columns and values come back as written
    frame = pandas.read_csv(root / "mixed.out.csv")
    assert list(frame.columns) == list(mixed[0]) and len(frame) == 40
    assert frame["prob_0"].tolist() == pytest.approx([float(r["prob_0"]) for r in mixed], abs=1e-12)


def test_metrics_agree_with_eval_and_jsonl_reads_back(setup, tmp_path):
    from lorakit.training.config import TrainConfig
    from lorakit.training.scoring import evaluate_model

    _root, base, adapters = setup
    texts = _texts(30)
    labelled = _write_csv(tmp_path / "test.csv", ["text", "label"], [[t, str(i % 3)] for i, t in enumerate(texts)])
    result = _run(base, {"c0": adapters["c0"]}, labelled, tmp_path / "out.jsonl", batch_size=8, max_length=16)
    cfg = TrainConfig(model=base, task="text", train_file=str(labelled), eval_file=str(labelled),
                      label_names=["0", "1", "2"], max_length=16, eval_batch_size=8, device="cpu")
    metrics, preds = evaluate_model(cfg, adapters["c0"])
    assert result.metrics["c0"] == pytest.approx(metrics, abs=1e-12)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [str(p) for p in preds]
    assert rows[0]["label"] == "0" and rows[0]["adapter"] == "c0" and abs(sum(
        rows[0][f"prob_{k}"] for k in "012") - 1) < 1e-5
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_json(tmp_path / "out.jsonl", lines=True)
    assert len(frame) == 30 and frame["adapter"].tolist() == ["c0"] * 30


def test_cli_errors_name_the_problem(setup, tmp_path, capsys):
    _root, base, adapters = setup
    src = _write_csv(tmp_path / "in.csv", ["text", "adapter"], [["a film", "nope"]])
    argv = ["classify", str(src), "--model", base, "--adapter", f"c0={adapters['c0']}",
            "--adapter", f"c1={adapters['c1']}"]
    assert main(argv) == 1
    assert "unknown adapter 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "in.predictions.csv").exists()  # nothing half-written is left
    src = _write_csv(tmp_path / "in.csv", ["words"], [["a film"]])
    assert main(["classify", str(src), "--model", base, "--adapter", adapters["c0"]]) == 1
    assert "missing column(s) ['text']" in capsys.readouterr().err
    src = _write_csv(tmp_path / "in.csv", ["text"], [["a film"], ["dull"]])
    assert main(["classify", str(src), "--model", base, "--adapter", adapters["c0"]]) == 0
    assert [r["adapter"] for r in _read(tmp_path / "in.predictions.csv")] == ["default", "default"]


PEAK_RSS = """
import csv, resource, sys
import torch
torch.set_num_threads(1)  # 2 shared cores: intra-op threads only thrash on a model this small
from lorakit.classify import Settings, classify_file, load_classifier, read_head
base, adapter, source, out = sys.argv[1:5]
heads = {"c0": read_head("c0", adapter)}
model, tok = load_classifier(base, list(heads.values()), "cpu")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = classify_file(model, tok, heads, source, out, Settings(batch_size=64, max_length=16))
print(result.rows, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_100k_rows_in_bounded_memory(setup, tmp_path):
    """Peak RSS over the classification of 100,000 rows grows by less than it does to hold them in memory."""
    _root, base, adapters = setup
    texts = _texts(1000)
    rows = [[i, texts[i % 1000] + f" {i}"] for i in range(100_000)]
    source = _write_csv(tmp_path / "big.csv", ["id", "text"], rows)
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, base, adapters["c0"], str(source),
                           str(tmp_path / "big.out.csv")], capture_output=True, text=True, check=True)
    n, before_kib, after_kib = map(int, done.stdout.split())
    grown_mib = (after_kib - before_kib) / 1024
    print(f"100,000 rows: peak RSS {after_kib / 1024:.0f} MiB, grown by {grown_mib:.1f} MiB while classifying")
    assert n == 100_000 and grown_mib < 64
    with open(tmp_path / "big.out.csv", encoding="utf-8", newline="") as fh:
        assert sum(1 for _ in csv.DictReader(fh)) == 100_000
