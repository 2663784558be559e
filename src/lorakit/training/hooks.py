"""Stage 3 of a run: what happens between steps (validation, checkpoints, the test kill hook), and the
distributed-aware evaluation and saving they share with the final stage."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.training import checkpoint as ckpt
from lorakit.training import distributed as dist_util
from lorakit.training import selection
from lorakit.training.config import json_safe
from lorakit.training.evaluate import score, validate
from lorakit.training.outputs import save_trained
from lorakit.training.prepare import Run, build_model


def after_step(run: Run, epoch_done: bool) -> None:
    """Validate and checkpoint when due (every N steps, or at each epoch's end), then the kill hook."""
    cfg, step = run.cfg, run.state.step
    if step < run.total_steps:
        if (step % cfg.eval_interval == 0) if cfg.eval_interval else epoch_done:
            selection.observe(run, step, run_validation(run, step))
        if (step % cfg.save_interval == 0) if cfg.save_interval else epoch_done:
            save_checkpoint(run)
    if run.kill_after_step is not None and step == run.kill_after_step:
        os.kill(os.getpid(), signal.SIGKILL)


def evaluate(
    run: Run, items: list[Any], *, final: bool, predictions: list | None = None
) -> dict[str, float]:
    """Validation (during training) or the final score, the same on every rank.

    Rank 0 evaluates the unwrapped model while the others wait; under FSDP every rank runs the same
    evaluation in lockstep, because each forward gathers the sharded weights from all of them.

    Args:
        run: the run.
        items: the examples to score.
        final: the final score (generation decodes) rather than validation.
        predictions: filled with the generated texts on the final score of a generation task.
    """
    cfg, info = run.cfg, run.info
    result: dict[str, float] = {}
    # A compiled backbone (--compile) runs eagerly here: generation's growing shapes would recompile it.
    with torch.compiler.set_stance("force_eager") if cfg.compile else nullcontext():
        if run.fsdp or info.is_main:
            inner = dist_util.unwrap(run.wrapped)
            args = (inner, run.tokenizer, run.spec, items, cfg, info.device)
            if final:
                result = score(*args, progress=info.is_main, predictions_out=predictions)
            else:
                result = validate(*args, progress=info.is_main)
    dist_util.barrier(info)
    return dist_util.broadcast_object(info, result)


def run_validation(run: Run, step: int) -> dict[str, float]:
    """Score the validation set, log it (metrics.jsonl, a line above the bar) and return the metrics (none
    when the run has no validation split)."""
    if not run.data.valid:
        return {}
    metrics = evaluate(run, run.data.valid, final=False)
    if run.info.is_main:
        from tqdm.auto import tqdm

        record = {"split": "valid", "step": step, "epoch": round(step / run.steps_per_epoch, 4), **metrics}
        run.log.write(json_safe(record))
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        tqdm.write(f"step {step}: valid {shown}", file=sys.stderr)
    run.last_valid = (step, metrics)
    return metrics


def save_checkpoint(run: Run) -> None:
    """A resumable checkpoint of the run (FSDP: the trained files only), then prune old ones."""
    info, state = run.info, run.state
    rng = dist_util.gather_objects(info, ckpt.capture_rng()) if info.enabled else [ckpt.capture_rng()]
    if run.fsdp:  # adapter-only: resuming FSDP runs is not supported
        save_fsdp(run, run.out / ckpt.CHECKPOINTS / f"step-{state.step}")
    elif info.is_main:
        ckpt.save_checkpoint(
            run.out, state.step, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
            state=asdict(state), rng_states=rng, save_trained=lambda m, p: save_trained(m, p, run.cfg),
        )  # fmt: skip
        ckpt.prune_checkpoints(run.out, run.cfg.keep_checkpoints)
    dist_util.barrier(info)


def cpu_replica(run: Run) -> nn.Module:
    """FSDP only: a CPU copy of the prepared model on rank 0 (built once) to write plain files from."""
    if not run.replica:
        rng = torch.get_rng_state()
        copy, _ = build_model(run.cfg, run.spec, run.model_kwargs)
        torch.set_rng_state(rng)  # building it must not shift rank 0's dropout stream
        run.replica.append(copy)
    return run.replica[0]


def save_fsdp(run: Run, path: Path) -> None:
    """Gather the full state dict onto rank 0 (on CPU), copy the trained tensors into a CPU replica of the
    prepared model, and save the method's plain files from it (so FSDP runs yield ordinary adapters)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(run.wrapped, options=options)
    if run.info.is_main:
        replica = cpu_replica(run)
        with torch.no_grad():
            for name, p in ckpt.trainable_parameters(replica):
                p.copy_(full[name])
        save_trained(replica, path, run.cfg)
    dist_util.barrier(run.info)
