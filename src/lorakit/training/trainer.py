"""A training run, in four stages a reader can follow one module at a time:

1. ``prepare.prepare_run``: check settings, data and the output folder; load the model and apply the method
   (``lorakit.methods``, the one method registry); encode rows; build optimizer, schedule
   (``optim``) and, when resuming, restore a checkpoint. Everything lands in one ``Run``.
2. ``loop.run_loop``: one ``train_step`` per global batch, epoch by epoch, logging as it goes.
3. ``hooks.after_step``: validation and checkpoints when due (and a test hook that kills the process).
4. ``finish.finish``: the trained files (``outputs``), final validation and score, results and plot.

Data order comes from a seeded ``torch.Generator`` per epoch (``sampler``), so the position in the epoch
(an integer) is all a checkpoint needs to continue the same sequence of batches.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from lorakit.io.outputs import LOCK_NAME, output_lock
from lorakit.training import distributed as dist_util
from lorakit.training.config import TrainConfig
from lorakit.training.finish import finish
from lorakit.training.loop import run_loop
from lorakit.training.prepare import prepare_run


def train(
    cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, kill_after_step: int | None = None
) -> dict[str, float]:
    """Run one training job (this process's part of it under torchrun) and return the final metrics.

    Args:
        cfg: the run's settings.
        resume: continue the run in ``cfg.out`` from its last checkpoint (or start it).
        overwrite: start over in a folder that holds an earlier run (its trained files are kept until
            this run's final save replaces them).
        kill_after_step: SIGKILL the process after that optimizer step (and its checkpoint, if one is
            due): a test hook that simulates a crash.
    """
    info = dist_util.setup(cfg.device)
    out = Path(cfg.out)
    # One writer per run folder: rank 0 holds the lock for every rank, from the folder check to the results.
    lock = output_lock(out / LOCK_NAME, out) if info.is_main else contextlib.nullcontext()
    try:
        with lock:
            run = prepare_run(cfg, info, resume=resume, overwrite=overwrite, kill_after_step=kill_after_step)
            if isinstance(run, dict):
                return run  # a resumed run that had already finished
            run_loop(run)
            return finish(run)
    finally:
        dist_util.teardown(info)
