"""Stage 4 of a run: the trained files, the final validation and score, predictions and the plot."""

from __future__ import annotations

import json
from typing import Any

from lorakit.training import checkpoint as ckpt
from lorakit.training import distributed as dist_util
from lorakit.training.config import json_safe, write_json_atomic
from lorakit.training.hooks import evaluate, run_validation, save_fsdp
from lorakit.training.metrics_log import plot_history
from lorakit.training.outputs import EVAL_RESULTS, PLOT, PREDICTIONS, RUN_SUMMARY, save_trained
from lorakit.training.prepare import Run


def final_score(run: Run, predictions: list[Any]) -> dict[str, float]:
    """Validate at the last step, then score the eval split (GLUE: the dev set just validated); no metrics
    when the run has neither a validation split nor an eval file."""
    valid_metrics = run_validation(run, run.total_steps)
    if not run.data.eval:
        return {}
    if run.spec.kind != "generation" and run.data.valid is run.data.eval:
        return valid_metrics
    return evaluate(run, run.data.eval, final=True, predictions=predictions)


def write_predictions(run: Run, predictions: list[Any]) -> None:
    """Generation tasks: one JSON line per eval input with the prediction and its references."""
    with open(run.out / PREDICTIONS, "w") as fh:
        for item, hyp in zip(run.data.eval, predictions):
            fh.write(json.dumps({"mr": item.mr, "prediction": hyp, "references": item.references}) + "\n")


def run_summary(run: Run, final: dict[str, float]) -> dict[str, Any]:
    """What the run trained and scored on: split sizes, how the splits were made, what ``max_length`` cut
    (per split) and what the final metrics were measured on."""
    data = run.data
    return json_safe({
        "task": run.spec.name,
        "examples": {"train": len(data.train), "valid": len(data.valid), "eval": len(data.eval)},
        "notes": list(data.notes),
        "validation": "none" if not data.valid else "carved" if any("carved" in n for n in data.notes) else "file",
        "scored_on": data.scored_on or ("nothing (no validation split, no eval file)" if not data.eval
                                        else "the eval file"),
        "truncation": {t.split: t.as_dict() for t in run.truncation},
        "final": final,
    })  # fmt: skip


def finish(run: Run) -> dict[str, float]:
    """Save what was trained, score it, write the results (and plot), and return the final metrics."""
    cfg, info = run.cfg, run.info
    if run.fsdp:
        save_fsdp(run, run.out)
    elif info.is_main:
        save_trained(run.model, run.out, cfg)
    predictions: list[Any] = []
    final = final_score(run, predictions)
    if info.is_main:
        scored_on = {"scored_on": run.data.scored_on} if run.data.scored_on else {}
        run.log.write(json_safe({"split": "eval", "step": run.total_steps, **scored_on, **final}))
        write_json_atomic(run.out / RUN_SUMMARY, run_summary(run, final))
        if run.spec.kind == "generation":
            write_predictions(run, predictions)
        write_json_atomic(run.out / EVAL_RESULTS, json_safe(final))
        if cfg.plot:
            plot_history(run.log.records(), run.out / PLOT, f"{cfg.model} · {run.spec.name} · {cfg.method}")
        run.log.close()
        ckpt.prune_checkpoints(run.out, cfg.keep_checkpoints)
    dist_util.barrier(info)
    return final
