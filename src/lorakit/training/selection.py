"""Which adapter a run publishes: the best validation's (``keep best``) or the last step's, and early stopping.

Each validation is compared with the best so far on one metric (``select_metric``; by default the first one
validation reports). An improvement of at least ``early_stopping_delta`` makes it the best: its trained
tensors go to ``<out>/checkpoints/best/`` (with the method's own files, so ``lorakit eval --adapter`` takes
the folder), whichever adapter ``keep`` publishes in the run folder. ``early_stopping_patience`` validations
in a row without one stop the run. The counters live in the run's state, which checkpoints save, so a resumed
run keeps them. Rank 0 decides and every rank follows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorakit.io.fsutil import file_mode, replace_path
from lorakit.training import checkpoint as ckpt
from lorakit.training import distributed as dist_util
from lorakit.training.outputs import METRICS_LOG, save_trained
from lorakit.training.prepare import Run, say

BEST_DIR = "best"  # under checkpoints/
BEST_TENSORS = "best_state.safetensors"
BEST_JSON = "best.json"
LOWER_IS_BETTER = ("loss", "perplexity")


@dataclass
class Choice:
    """The adapter a run publishes and why."""

    keep: str  # "best" or "last"
    step: int  # the step whose trained tensors are published
    last_step: int
    metric: str
    value: float | None  # the selection metric at ``step``
    stop_reason: str

    def summary(self) -> str:
        """One line: which step, on which metric, and whether the run stopped early."""
        shown = "n/a" if self.value is None else f"{self.value:.4f}"
        why = (f"best valid {self.metric} {shown}" if self.keep == "best"
               else f"last step, valid {self.metric} {shown}" if self.metric
               else "last step; no validation split")  # fmt: skip
        line = f"published the adapter of step {self.step} of {self.last_step} ({why})"
        return line + (f"; {self.stop_reason}" if self.stop_reason else "")


def best_dir(out: Path) -> Path:
    return Path(out) / ckpt.CHECKPOINTS / BEST_DIR


def keep_mode(run: Run) -> str:
    """``keep`` as set, else best when the task validates on examples of its own, else last: a score
    reported on the examples that chose the step would be chosen on itself (GLUE validates on dev)."""
    if run.cfg.keep is not None:
        return run.cfg.keep
    return "best" if run.data.valid and not run.fsdp and not scored_in_eval(run) else "last"


def scored_in_eval(run: Run) -> bool:
    """Whether any validation example is also an eval example (the same list, or equal examples)."""
    valid, scored = run.data.valid, run.data.eval
    if valid is scored:
        return True
    seen = {repr(item) for item in scored}
    return any(repr(item) in seen for item in valid)


def metric_name(run: Run, metrics: dict[str, float]) -> str:
    """The selection metric: ``select_metric``, else the first one validation reports."""
    from lorakit.errors import ConfigError

    name = run.cfg.select_metric or next(iter(metrics))
    if name not in metrics:
        raise ConfigError(f"select_metric {name!r} is not reported by validation; it reports {sorted(metrics)}")
    return name


def gain(metric: str, value: float | None, best: float | None) -> float:
    """How much better ``value`` is than ``best`` (positive: better); a missing or NaN value never gains."""
    if value is None or not math.isfinite(value):
        return -math.inf
    if best is None:
        return math.inf
    return best - value if metric in LOWER_IS_BETTER else value - best


def observe(run: Run, step: int, metrics: dict[str, float], *, may_stop: bool = True) -> None:
    """Update the best-so-far and the patience counter with the validation at ``step``; save a new best;
    set ``run.state.stop_reason`` when patience runs out. Rank 0 decides, every rank gets its decision.

    Args:
        run: the run.
        step: the step just validated.
        metrics: its validation metrics (the same on every rank).
        may_stop: whether this validation may stop the run (not the final one).
    """
    if not metrics:  # no validation split: nothing to select on
        return
    cfg, state = run.cfg, run.state
    name = metric_name(run, metrics)
    decision = None
    if run.info.is_main:
        g = gain(name, metrics.get(name), state.best_value)
        improved = g > 0 and g >= cfg.early_stopping_delta
        decision = (improved, metrics.get(name))
    improved, value = dist_util.broadcast_object(run.info, decision)
    if improved:
        state.best_step, state.best_value, state.bad_evals = step, value, 0
        if not run.fsdp:  # kept with --keep last too, so both can be scored (lorakit eval --adapter)
            save_best(run, step, name, value)
        return
    state.bad_evals += 1
    if may_stop and cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience:
        best = "n/a" if state.best_value is None else f"{state.best_value:.4f}"
        state.stop_reason = (
            f"stopped early at step {step}: {state.bad_evals} validation(s) without an improvement of "
            f"{cfg.early_stopping_delta:g} or more in {name} (best {best} at step {state.best_step})"
        )


def save_best(run: Run, step: int, metric: str, value: float | None) -> None:
    """Rank 0 writes the trained tensors (and the method's files) of ``step`` to ``checkpoints/best``."""
    if run.info.is_main:
        root = best_dir(run.out).parent
        root.mkdir(parents=True, exist_ok=True)
        tmp_parent = Path(tempfile.mkdtemp(prefix=".best.tmp-", dir=root))
        try:
            tmp = tmp_parent / BEST_DIR
            save_trained(run.model, tmp, run.cfg)
            tensors = {n: p.detach().to("cpu").contiguous().clone() for n, p in ckpt.trainable_parameters(run.model)}
            save_file(tensors, tmp / BEST_TENSORS)
            os.chmod(tmp / BEST_TENSORS, file_mode())  # safetensors creates 0600: one mode for all files
            (tmp / BEST_JSON).write_text(json.dumps({"step": step, "metric": metric, "value": value}))
            replace_path(tmp, best_dir(run.out))
        finally:
            shutil.rmtree(tmp_parent, ignore_errors=True)
    dist_util.barrier(run.info)


@torch.no_grad()
def restore_best(run: Run) -> None:
    """Load the best step's trained tensors into the model (every rank), after checking they are its."""
    folder = best_dir(run.out)
    try:
        saved = json.loads((folder / BEST_JSON).read_text())
        tensors = load_file(folder / BEST_TENSORS)
    except (OSError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{folder}: the best step's adapter is missing or unreadable: {exc}") from exc
    if saved.get("step") != run.state.best_step:
        raise ckpt.CheckpointError(
            f"{folder} holds step {saved.get('step')}, the run's best is step {run.state.best_step}"
        )
    for name, p in ckpt.trainable_parameters(run.model):
        p.copy_(tensors[name].to(p.device, p.dtype))


def settle(run: Run, last_metrics: dict[str, float], observed: bool) -> Choice:
    """After training: count the last validation, put the chosen step's tensors in the model, log why.

    Args:
        run: the run, its model holding the last step's tensors.
        last_metrics: the validation at the last step.
        observed: whether ``observe`` has counted that validation already (it stopped the run).
    """
    state, last = run.state, run.state.step
    if not last_metrics:
        choice = Choice("last", last, last, "", None, state.stop_reason)
    else:
        choice = _chosen(run, last_metrics, observed)
    if run.info.is_main:
        run.log.write({"split": "select", "step": choice.step, "keep": choice.keep, "metric": choice.metric or None,
                       "value": choice.value,
                       "last_step": last, "stopped_early": bool(state.stop_reason), "reason": choice.summary()})
    say(run.info, f"lorakit train: {choice.summary()}")
    return choice


def _chosen(run: Run, last_metrics: dict[str, float], observed: bool) -> Choice:
    """The step to publish, its tensors put back in the model when it is not the last."""
    state, last = run.state, run.state.step
    if not observed:
        observe(run, last, last_metrics, may_stop=False)
    keep = keep_mode(run)
    name = metric_name(run, last_metrics)
    step = state.best_step if keep == "best" and state.best_step else last
    if step != last:
        restore_best(run)
    value = state.best_value if step == state.best_step else last_metrics.get(name)
    return Choice(keep, step, last, name, value, state.stop_reason)


def read_choice(out: Path) -> str | None:
    """The ``select`` line of a finished run's metrics.jsonl (its reason), for the command's final line."""
    path = Path(out) / METRICS_LOG
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("split") == "select":
            return record.get("reason")
    return None
