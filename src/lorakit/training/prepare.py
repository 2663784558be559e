"""Stage 1 of a run: check the input, then build what the loop needs (a ``Run``).

In order: settings and data are checked before any model is loaded; the output folder is checked (and
resumed from, or cleared); the model is loaded with the same seed on every rank and the method applied;
the rows are encoded; optimizer and schedule are built; a checkpoint, if resuming, restores all of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorakit.data import DataError
from lorakit.data.chat_templates import apply_chat_template, read_chat_template
from lorakit.data.sft import chat_eos_note
from lorakit.data.truncation import Truncation
from lorakit.errors import ConfigError
from lorakit.io.outputs import claim_output, mark_output
from lorakit.lora.adapters import parameter_report
from lorakit.lora.kernels import compile_for_training
from lorakit.methods import get_method
from lorakit.tasks import TaskData, TaskSpec, load_task
from lorakit.training import checkpoint as ckpt
from lorakit.training import distributed as dist_util
from lorakit.training import rundir, tracking
from lorakit.training.config import TrainConfig
from lorakit.training.defaults import RECIPE_FIELDS, resolve_task_defaults
from lorakit.training.evaluate import encode, report_truncation, set_class_weights
from lorakit.training.metrics_log import MetricsLog
from lorakit.training.optim import build_optimizer, build_scheduler
from lorakit.training.outputs import (
    EVAL_RESULTS,
    METRICS_LOG,
    RUN_FILES,
    TENSORBOARD_DIR,
    TRAIN_CONFIG,
    TRAINED_FILES,
)
from lorakit.training.precision import base_dtype, keep_trainable_fp32
from lorakit.training.sampler import steps_per_epoch as count_steps

# Fields that may differ when resuming: they do not change what is computed.
RESUME_MAY_CHANGE = {"tensorboard", "report_to", "plot", "eval_batch_size", "keep_checkpoints", "device", "compile",
                     "gradient_checkpointing", "return_freed_memory"}  # memory, not the maths


@dataclass
class RunState:
    """Progress saved in checkpoints (JSON)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of `epoch` already consumed
    log_loss: float = 0.0  # loss sum and target count since the last log line
    log_count: float = 0.0
    # The best validation so far and the patience counter (lorakit.training.selection).
    best_step: int = 0  # 0: no validation yet
    best_value: float | None = None
    bad_evals: int = 0  # validations in a row without an improvement
    stop_reason: str = ""  # why training stopped before total_steps (empty: it did not)
    log_extra: dict[str, float] = field(default_factory=dict)  # a task's own metric sums since then


@dataclass
class Run:
    """Everything one training run works with; the stages after ``prepare_run`` read and advance it."""

    cfg: TrainConfig
    info: dist_util.DistInfo
    data: TaskData
    model: nn.Module  # the prepared model; ``wrapped`` is it under DDP/FSDP (or itself)
    wrapped: nn.Module
    tokenizer: Any
    model_kwargs: dict[str, Any]  # what load_model got besides the name (to rebuild a replica)
    rows: list[dict[str, Any]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    log: MetricsLog
    total_steps: int
    steps_per_epoch: int
    warmup: int
    state: RunState = field(default_factory=RunState)
    kill_after_step: int | None = None  # a test hook: SIGKILL after this optimizer step
    replica: list[nn.Module] = field(default_factory=list)  # FSDP: rank 0's CPU copy, built once
    truncation: list[Truncation] = field(default_factory=list)  # per split, measured at load (run summary)
    last_valid: tuple[int, dict[str, float]] | None = None  # this session's latest (step, validation)

    @property
    def spec(self) -> TaskSpec:
        return self.data.spec

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def fsdp(self) -> bool:
        return dist_util.is_fsdp(self.wrapped)


def say(info: dist_util.DistInfo, message: str) -> None:
    """Print a lorakit line on rank 0 only."""
    if info.is_main:
        print(message, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_settings(cfg: TrainConfig, info: dist_util.DistInfo, resume: bool) -> None:
    """Settings that cannot work, named before any data or model is loaded."""
    get_method(cfg.method)  # an unknown method fails here
    if cfg.batch_size % (info.world_size * cfg.grad_accum):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
            f"({info.world_size} x {cfg.grad_accum}): it is the global batch per optimizer step"
        )
    tracking.check_installed(tracking.requested(cfg.report_to, cfg.tensorboard))
    if cfg.fsdp and resume:
        raise ConfigError(
            "--resume is not supported with --fsdp yet (FSDP checkpoints hold the adapter only)"
        )


def check_packing(cfg: TrainConfig, spec: TaskSpec) -> None:
    """``--packing`` needs a causal-LM task and a method that leaves attention alone.

    Args:
        cfg: the run's config.
        spec: the loaded task.
    """
    if not cfg.packing:
        return
    if spec.kind != "generation":
        raise ConfigError(f"--packing is for causal-LM tasks (sft, e2e, webnlg, dart), not {spec.name!r}")
    if cfg.length_grouping:
        raise ConfigError("--packing and --length-grouping both shape the batches: choose one")
    if cfg.method.startswith("prefix_"):
        # Prefixes sit in front of the whole row, so every packed record would attend to one copy.
        raise ConfigError(f"--packing cannot be combined with method {cfg.method!r}: its prefix spans the row")


def load_data(cfg: TrainConfig, info: dist_util.DistInfo) -> tuple[TaskData, TrainConfig]:
    """The task's data, and ``cfg`` with the task's and its kind's defaults (lr, head lr, init …) filled in."""
    data = load_task(cfg)
    if cfg.chat_template:  # a bad --chat-template stops the run before the model loads
        read_chat_template(cfg.chat_template)
    spec = data.spec
    cfg = resolve_task_defaults(cfg, spec.kind, spec.recipe)
    set_class_weights(spec, data.train, cfg.class_weights)
    if spec.class_weights is not None:
        shown = ", ".join(f"{n} {w:.2f}" for n, w in zip(spec.label_names, spec.class_weights))
        data.notes.append(f"balanced class weights in the loss ({shown})")
    if spec.name == "text" and cfg.label_names is None:  # saved with the run: eval and classify map labels alike
        cfg = dataclasses.replace(cfg, label_names=list(spec.label_names))
    check_packing(cfg, spec)
    if len(data.train) < info.world_size:
        raise DataError(
            f"{len(data.train)} training example(s) cannot be shared by {info.world_size} processes"
        )
    return data, cfg


def started_settings(out: Path) -> dict[str, Any] | None:
    """The settings the run in ``out`` started with (its ``train_config.json``), or None without one."""
    saved = out / TRAIN_CONFIG
    if not saved.is_file():
        return None
    # A field added since the run started is missing from its file: it ran with the default.
    return {**TrainConfig.field_defaults(), **json.loads(saved.read_text())}


def with_saved_recipe(cfg: TrainConfig, started: dict[str, Any] | None) -> TrainConfig:
    """On resume, the recipe fields (lr, head lr ratio, init, pooler) left unset take the values the run
    started with, so a run begun under other defaults (an older lorakit's) continues as it began."""
    if started is None:
        return cfg
    kept = {n: started[n] for n in RECIPE_FIELDS if getattr(cfg, n) is None and started[n] is not None}
    return dataclasses.replace(cfg, **kept)


def check_output_dir(
    out: Path, cfg: TrainConfig, resume: bool, overwrite: bool, started: dict[str, Any] | None
) -> Path | None:
    """Refuse to mix runs in one folder; on resume, check the settings match ``started`` (the run's saved
    settings) and find the checkpoint."""
    claim_output(out, "train", overwrite=overwrite or resume, own_names=RUN_NAMES, held=_held_results,
                 hint="pass --resume to continue it or --overwrite to start over")
    if resume:
        if started is not None:
            new = cfg.to_dict()
            changed = rundir.changed_settings(started, new, RESUME_MAY_CHANGE)
            if changed:
                details = ", ".join(f"{k}: {started.get(k)!r} -> {new[k]!r}" for k in changed)
                raise ConfigError(f"--resume: {out} was started with different settings ({details})")
        return ckpt.latest_checkpoint(out)
    return None


# Every name a run writes into its folder: a folder holding only these is a run's from before markers.
RUN_NAMES = (*RUN_FILES, ckpt.CHECKPOINTS, TENSORBOARD_DIR)


def _held_results(out: Path) -> str | None:
    return rundir.what_it_holds(out, TRAINED_FILES, (METRICS_LOG, EVAL_RESULTS), (ckpt.CHECKPOINTS,))


def claim_output_dir(out: Path, cfg: TrainConfig, info: dist_util.DistInfo, resume: bool, overwrite: bool) -> None:
    """Rank 0 clears an overwritten run's logs and records this run's settings (once every rank checked)."""
    dist_util.barrier(info)  # every rank has checked the folder before rank 0 changes it
    if info.is_main:
        if overwrite and not resume:
            kept = tuple(n for n in RUN_FILES if n not in TRAINED_FILES)
            rundir.clear_run(out, kept, (ckpt.CHECKPOINTS, TENSORBOARD_DIR))
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / TRAIN_CONFIG)
        mark_output(out, "train")


def build_model(cfg: TrainConfig, spec: TaskSpec, model_kwargs: dict[str, Any]) -> tuple[nn.Module, Any]:
    """Load the base model and apply ``cfg.method`` (the registry's ``prepare_for_training``)."""
    from lorakit.io.models import load_model

    if cfg.return_freed_memory:  # on with --quantize: memory is the point (lorakit.quant.heap)
        from lorakit.quant.heap import return_freed_memory_promptly

        return_freed_memory_promptly()
    if cfg.quantize and spec.model_task == "causal-lm":  # quantized while loading: no fp32 base in memory
        from lorakit.quant.load import load_quantized

        model, tokenizer, report = load_quantized(cfg.model, cfg.quantize, spec.model_task, **model_kwargs)
        print(f"lorakit: {report.summary()} (layer by layer while loading)", flush=True)
    else:
        dtype = base_dtype(cfg.base_dtype, cfg.device)
        model, tokenizer = load_model(
            cfg.model, spec.model_task, num_labels=spec.num_labels, dtype=dtype, **model_kwargs
        )
    prepare_model(model, cfg)
    keep_trainable_fp32(model)  # a 16-bit base's heads train in fp32, as LoRA's A and B do
    if cfg.chat_template:
        apply_chat_template(tokenizer, read_chat_template(cfg.chat_template))
    return model, tokenizer


def prepare_model(model: nn.Module, cfg: TrainConfig) -> None:
    """Apply ``cfg.method`` to ``model`` in place, with the options ``cfg`` carries: first the base's own
    dropout (``model_dropout``) and quantization (``quantize``) when asked for, then the method.

    Args:
        model: a freshly loaded model.
        cfg: the run's settings (``method`` and the method's fields or ``method_options``).
    """
    if cfg.model_dropout is not None:  # before the method: an adapter's own dropout keeps its setting
        from lorakit.io.models import set_model_dropout

        set_model_dropout(model, cfg.model_dropout)
    if cfg.quantize:  # before the method, so LoRA wraps the quantized layers (resume and FSDP pass here too)
        from lorakit.quant.linear import quantize_base, quantized_layers

        if not quantized_layers(model):  # build_model may have quantized it while loading
            print(f"lorakit: {quantize_base(model, cfg.quantize).summary()}", flush=True)
    if cfg.init_adapter:  # continue a trained adapter (its own r / targets); a frozen copy is the reference
        from lorakit.training.preference import load_init_adapter

        load_init_adapter(model, cfg.init_adapter)
        return
    get_method(cfg.method).prepare_for_training(model, cfg)


def _model_kwargs(spec: TaskSpec) -> dict[str, Any]:
    if spec.kind != "classification":
        return {}
    return {
        "id2label": dict(enumerate(spec.label_names)),
        "label2id": {n: i for i, n in enumerate(spec.label_names)},
    }


def place_model(model: nn.Module, cfg: TrainConfig, info: dist_util.DistInfo) -> nn.Module:
    """Training settings on the model, onto the device, compiled and wrapped (DDP/FSDP) as asked."""
    if cfg.gradient_checkpointing:
        from lorakit.io.models import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no KV cache while training (generation turns it on per call)
    model.to(info.device)
    if cfg.compile:
        compile_for_training(model)
    return dist_util.wrap_model(model, info, fsdp=cfg.fsdp)


def restore(run: Run, resume_from: Path | None, resume: bool) -> None:
    """Continue from ``resume_from`` (a checkpoint), or seed this rank's dropout stream for a fresh start."""
    info = run.info
    if resume_from is None:
        if resume:
            say(info, f"lorakit train: no checkpoint in {run.out}; starting from scratch")
        seed_everything(run.cfg.seed + info.rank)  # dropout streams differ per process (rank 0's = 1 process's)
        return
    # Parameters are restored into the unwrapped model, whose names the checkpoint uses.
    saved = ckpt.load_checkpoint(
        resume_from, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
        rank=info.rank, world_size=info.world_size,
    )  # fmt: skip
    run.state = RunState(**saved)
    run.log.truncate_after(run.state.step)
    say(info, f"lorakit train: resumed from {resume_from} (step {run.state.step}/{run.total_steps})")


def announce(run: Run) -> None:
    """The run in two lines: model, data, method and parameter share; steps, batches, lr, device."""
    cfg, info, spec, data = run.cfg, run.info, run.spec, run.data
    report = parameter_report(run.model)
    per_rank = cfg.batch_size // info.world_size
    for note in data.notes:
        say(info, f"lorakit train: {note}")
    for cut in run.truncation:
        say(info, f"lorakit train: {cut.line()}")
    if not data.valid:
        say(info, "lorakit train: no validation split: training without validation")
    if data.scored_on:
        say(info, f"lorakit train: no test file: the final metrics are measured on {data.scored_on}")
    say(
        info,
        f"lorakit train: {cfg.model} on {spec.name} ({len(data.train)} train / {len(data.eval)} eval "
        f"examples), method {cfg.method}: {report.trainable:,} of {report.total:,} parameters trainable "
        f"({report.percent:.3f}%)\n"
        f"  {run.total_steps} steps ({run.steps_per_epoch} per epoch), global batch {cfg.batch_size} = "
        f"{info.world_size} process(es) x {per_rank // cfg.grad_accum} x {cfg.grad_accum} micro-batches,"
        f" lr {cfg.lr:g} {cfg.schedule} with {run.warmup} warm-up steps, device {info.device}",
    )


def prepare_run(
    cfg: TrainConfig, info: dist_util.DistInfo, *, resume: bool, overwrite: bool, kill_after_step: int | None
) -> Run | dict[str, float]:
    """Build the ``Run``; a resumed run that already finished returns its final metrics instead."""
    out = Path(cfg.out)
    check_settings(cfg, info, resume)
    started = started_settings(out) if resume else None
    data, cfg = load_data(with_saved_recipe(cfg, started), info)
    resume_from = check_output_dir(out, cfg, resume, overwrite, started)
    if resume and (out / EVAL_RESULTS).is_file():
        say(info, f"lorakit train: {out} already finished; nothing to resume")
        return json.loads((out / EVAL_RESULTS).read_text())
    claim_output_dir(out, cfg, info, resume, overwrite)
    seed_everything(cfg.seed)  # same seed on every rank, so every replica starts identical
    model_kwargs = _model_kwargs(data.spec)
    model, tokenizer = build_model(cfg, data.spec, model_kwargs)
    wrapped = place_model(model, cfg, info)
    if any(getattr(r, "messages", None) is not None for r in data.train):
        data.notes.extend(n for n in [chat_eos_note(tokenizer)] if n)
    rows = encode(data.spec, data.train, tokenizer, cfg.max_length, cfg.truncation)
    steps_per_epoch = count_steps(rows, cfg, info.world_size)
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total)
    optimizer = build_optimizer(wrapped, cfg)
    run = Run(
        cfg, info, data, model, wrapped, tokenizer, model_kwargs, rows, optimizer,
        build_scheduler(optimizer, total, warmup, cfg.schedule),
        MetricsLog(out, info.is_main, tracking.requested(cfg.report_to, cfg.tensorboard), cfg.to_dict()),
        total, steps_per_epoch, warmup, kill_after_step=kill_after_step,
    )  # fmt: skip
    restore(run, resume_from, resume)
    run.truncation = report_truncation(
        data.spec, {"train": data.train, "valid": data.valid, "eval": data.eval}, tokenizer, cfg.max_length
    )
    announce(run)
    return run
