"""Stage 2 of a run: the loop. ``train_step`` is one optimizer step over one global batch; ``run_loop``
walks the epochs, logs, and calls the validation / checkpoint hooks after each step.

``batch_size`` is global: each optimizer step sees the same examples whatever the number of processes and
micro-batches, and the loss is normalised by the global number of targets, so 1 process, N processes and
gradient accumulation give the same gradients.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.training import checkpoint as ckpt
from lorakit.training import distributed as dist_util
from lorakit.training import hooks
from lorakit.training.evaluate import collate, loss_sum
from lorakit.training.optim import lr_factor
from lorakit.training.preference import PreferenceLoss, preference_step
from lorakit.training.prepare import Run
from lorakit.training.sampler import epoch_plan, local_micro_batches


@dataclass
class StepStats:
    """What one optimizer step saw, summed over every process."""

    loss_sum: float
    targets: float  # the loss is a mean over these
    tokens: int  # non-pad positions
    padding: int
    extra: dict[str, float] = field(default_factory=dict)  # a task's own metric sums (preference: rewards)


def _summed_loss(run: Run, inputs: dict[str, torch.Tensor], extra: dict[str, float]) -> torch.Tensor:
    """The micro-batch's summed loss; a preference task also adds its metric sums to ``extra``."""
    if run.spec.kind != "preference":
        return loss_sum(run.spec, run.wrapped, inputs, run.cfg.label_smoothing)
    summed, sums = preference_step(PreferenceLoss.from_config(run.cfg), run.wrapped, inputs)
    for key, value in sums.items():
        extra[key] = extra.get(key, 0.0) + value
    return summed


def train_step(run: Run, batch: list[int], rows: Sequence[dict[str, Any]] | None = None) -> StepStats:
    """Forward, backward (micro-batch by micro-batch), clip, check and step the optimizer on one global batch.

    Args:
        run: the prepared run.
        batch: the global batch, as indices into ``rows``.
        rows: the epoch's rows (``run.rows``, or packed rows under ``--packing``); default ``run.rows``.
    """
    cfg, info, rows = run.cfg, run.info, run.rows if rows is None else rows
    micro = local_micro_batches(batch, info.rank, info.world_size, cfg.grad_accum)
    # The loss is a mean over every target of the global batch, whichever process holds it.
    counts = torch.tensor([float(sum(rows[i]["n_targets"] for mb in micro for i in mb))])
    global_count = float(dist_util.all_reduce_sum(info, counts).item())
    sums = torch.zeros(3)  # loss sum, tokens, padded positions
    extra: dict[str, float] = {}
    for k, mb in enumerate(micro):
        padded = collate(run.spec, [rows[i] for i in mb], run.tokenizer.pad_token_id)
        inputs = {key: v.to(info.device) for key, v in padded.items()}
        # Gradients are averaged over processes once per step, on the last micro-batch.
        with dist_util.no_grad_sync(run.wrapped, info, skip=k < len(micro) - 1):
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                summed = _summed_loss(run, inputs, extra)
            (summed * info.world_size / global_count).backward()
        n_tokens = float(inputs["attention_mask"].sum())
        sums += torch.tensor([summed.item(), n_tokens, inputs["attention_mask"].numel() - n_tokens])
    dist_util.all_reduce_sum(info, sums)
    if extra:
        extra = dict(zip(extra, dist_util.all_reduce_sum(info, torch.tensor(list(extra.values()))).tolist()))
    grad_norm = None
    if cfg.clip_norm is not None:
        trainable = [p for _, p in ckpt.trainable_parameters(run.wrapped)]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_norm)  # global under FSDP too
    ckpt.check_finite_step(run.state.step + 1, float(sums[0]), grad_norm, run.out)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepStats(float(sums[0]), global_count, int(sums[1]), int(sums[2]), extra)


@dataclass
class Progress:
    """The progress bar and the throughput counters of this process's session (not checkpointed)."""

    run: Run
    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    padding: int = 0

    def __post_init__(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=self.run.total_steps, initial=self.run.state.step, desc="train", unit="step",
            disable=not self.run.info.is_main, file=sys.stderr, dynamic_ncols=True,
        )  # fmt: skip

    def update(self, stats: StepStats, lr: float) -> None:
        self.tokens += stats.tokens
        self.padding += stats.padding
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{stats.loss_sum / stats.targets:.4f}", lr=f"{lr:.2e}",
                             tok_s=f"{self.tokens / max(self.elapsed, 1e-9):.0f}")  # fmt: skip

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def _advance(run: Run, n_batches: int, stats: StepStats) -> bool:
    """Count the step in the run's state; True when it finished the epoch."""
    state = run.state
    state.step += 1
    state.batch_in_epoch += 1
    if state.batch_in_epoch == n_batches:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    state.log_loss += stats.loss_sum
    state.log_count += stats.targets
    for key, value in stats.extra.items():
        state.log_extra[key] = state.log_extra.get(key, 0.0) + value
    return state.batch_in_epoch == 0


def _cuda_peak(run: Run) -> dict[str, float]:
    """The peak CUDA memory this process allocated so far, in MiB (nothing on other devices)."""
    if run.info.device.type != "cuda":
        return {}
    return {"cuda_peak_mib": torch.cuda.max_memory_allocated(run.info.device) / 2**20}


def _log_train(run: Run, progress: Progress, lr: float) -> None:
    """A train line in metrics.jsonl every ``log_interval`` steps (and at the last)."""
    state = run.state
    if state.step % run.cfg.log_interval and state.step != run.total_steps:
        return
    run.log.write(
        {
            "split": "train",
            "step": state.step,
            "epoch": round(state.step / run.steps_per_epoch, 4),
            "loss": state.log_loss / max(state.log_count, 1.0),
            "lr": lr,
            "tokens_per_s": progress.tokens / max(progress.elapsed, 1e-9),  # useful (non-pad) tokens
            "pad_share": progress.padding / max(progress.tokens + progress.padding, 1),
            "elapsed_s": progress.elapsed,
            **_cuda_peak(run),
            **{key: value / max(state.log_count, 1.0) for key, value in state.log_extra.items()},
        }
    )
    state.log_loss, state.log_count, state.log_extra = 0.0, 0.0, {}


def run_loop(run: Run) -> None:
    """Train until ``run.total_steps``, from wherever ``run.state`` stands (0, or a resumed checkpoint)."""
    cfg, state = run.cfg, run.state
    run.wrapped.train()
    progress = Progress(run)
    while state.step < run.total_steps and not state.stop_reason:
        rows, batches = epoch_plan(run.rows, cfg, state.epoch, run.info.world_size)  # random, grouped or packed
        while state.batch_in_epoch < len(batches) and state.step < run.total_steps:
            lr = cfg.lr * lr_factor(state.step, run.total_steps, run.warmup, cfg.schedule)  # A's lr, not a head's
            stats = train_step(run, batches[state.batch_in_epoch], rows)
            epoch_done = _advance(run, len(batches), stats)
            progress.update(stats, lr)
            _log_train(run, progress, lr)
            hooks.after_step(run, epoch_done)
            if epoch_done or state.stop_reason:
                break  # the next epoch has its own order
        if state.stop_reason:
            break  # early stopping: every rank got the same decision
    progress.bar.close()
