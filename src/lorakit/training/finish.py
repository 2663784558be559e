"""Stage 4 of a run: the last validation, the choice of the adapter to publish (``selection``), the trained
files (``outputs``), the final score, results and plot."""

from __future__ import annotations

import json
from typing import Any

from lorakit.training import checkpoint as ckpt
from lorakit.training import distributed as dist_util
from lorakit.training import selection
from lorakit.training.config import json_safe, write_json_atomic
from lorakit.training.hooks import evaluate, run_validation, save_fsdp
from lorakit.training.metrics_log import plot_history
from lorakit.training.outputs import EVAL_RESULTS, PLOT, PREDICTIONS, RUN_SUMMARY, TRAINED_FILES, save_trained
from lorakit.training.prepare import Run


def last_validation(run: Run) -> tuple[dict[str, float], bool]:
    """The validation at the last step, and whether early stopping counted it already (the loop ran it)."""
    step = run.state.step
    if run.last_valid is not None and run.last_valid[0] == step:
        return run.last_valid[1], True
    return run_validation(run, step), False


def final_score(
    run: Run, choice: selection.Choice, valid: dict[str, float], predictions: list[Any]
) -> dict[str, float]:
    """Score the eval split with the published tensors (GLUE: the dev set, validated already at that step); no
    metrics when the run has neither a validation split nor an eval file."""
    if not run.data.eval:
        return {}
    if run.spec.kind != "generation" and run.data.valid is run.data.eval and choice.step == choice.last_step:
        return valid
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
    """Choose what to publish, save it, score it, write the results (and plot), and return the final metrics."""
    cfg, info = run.cfg, run.info
    valid, observed = last_validation(run)
    choice = selection.settle(run, valid, observed)
    if run.fsdp:
        save_fsdp(run, run.out)
    elif info.is_main:
        save_trained(run.model, run.out, cfg)
    predictions: list[Any] = []
    final = final_score(run, choice, valid, predictions)
    if info.is_main:
        scored_on = {"scored_on": run.data.scored_on} if run.data.scored_on else {}
        run.log.write(json_safe({"split": "eval", "step": choice.step, **scored_on, **final}))
        write_json_atomic(run.out / RUN_SUMMARY, run_summary(run, final))
        if run.spec.kind == "generation":
            write_predictions(run, predictions)
        write_json_atomic(run.out / EVAL_RESULTS, json_safe(final))
        if cfg.plot:
            plot_history(run.log.records(), run.out / PLOT, f"{cfg.model} · {run.spec.name} · {cfg.method}")
        published = [run.out / name for name in TRAINED_FILES if (run.out / name).is_file()]
        run.log.log_final(final, published, run.out / PLOT if cfg.plot else None)
        run.log.close()
        ckpt.prune_checkpoints(run.out, cfg.keep_checkpoints)
    dist_util.barrier(info)
    return final
