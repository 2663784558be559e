"""The training loop: load data, build the model, prepare it for a method, train, checkpoint, evaluate.

Read ``train`` top to bottom. The pieces it relies on:

* ``prepare_model(model, cfg)``: the single dispatch point from a method name (``cfg.method``) to the
  function that injects adapters / freezes weights (``METHODS``). Baselines register themselves here.
* ``save_trained`` / ``load_trained``: a LoRA model is saved as a PEFT-layout adapter; any other method's
  trainable parameters are saved by name as ``trainable_state.safetensors`` + ``trainable_state.json``.
* Data order comes from a seeded ``torch.Generator`` per epoch, so the position in the epoch (an integer)
  is all a checkpoint needs to continue the same sequence of batches.
* ``batch_size`` is global: each optimizer step sees the same examples whatever the number of processes
  and micro-batches, and the loss is normalised by the global number of targets, so 1 process, N
  processes and gradient accumulation give the same gradients.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorakit.adapters import configs, inject, parameter_report, saved_module_parameters
from lorakit.arch import POOLER_NAME, TASK_HEAD_NAMES
from lorakit.config import LoraConfig
from lorakit.data import DataError
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.fast import compile_for_training
from lorakit.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_finite,
    load_adapter,
    read_pair,
    read_weights,
    save_adapter,
    write_weights_and_config,
)
from lorakit.training import checkpoint as ckpt
from lorakit.training import distributed as dist_util
from lorakit.training import rundir
from lorakit.training.config import TrainConfig, json_safe, resolve_task_defaults, write_json_atomic
from lorakit.training.evaluate import (
    TaskData,
    TaskSpec,
    collate,
    encode,
    load_task,
    loss_sum,
    score,
    set_class_weights,
    validate,
)
from lorakit.training.sampler import epoch_batches

TRAIN_CONFIG = "train_config.json"
METRICS_LOG = "metrics.jsonl"
EVAL_RESULTS = "eval_results.json"
PLOT = "training.png"
PREDICTIONS = "eval_predictions.jsonl"
TRAINABLE_WEIGHTS = "trainable_state.safetensors"
TRAINABLE_CONFIG = "trainable_state.json"
TRAINABLE_FORMAT = "lorakit-trainable-state"
TENSORBOARD_DIR = "tensorboard"
# Files a run writes into its output directory (removed by --overwrite, nothing else is touched).
RUN_FILES = (
    TRAIN_CONFIG,
    METRICS_LOG,
    EVAL_RESULTS,
    PLOT,
    PREDICTIONS,
    CONFIG_NAME,
    WEIGHTS_NAME,
    TRAINABLE_WEIGHTS,
    TRAINABLE_CONFIG,
)
# The trained state: kept by --overwrite until the new run's final save replaces it.
TRAINED_FILES = (CONFIG_NAME, WEIGHTS_NAME, TRAINABLE_WEIGHTS, TRAINABLE_CONFIG)
# Fields that may differ when resuming: they do not change what is computed.
RESUME_MAY_CHANGE = {"tensorboard", "plot", "eval_batch_size", "keep_checkpoints", "device", "compile"}


# == methods ==============================================================================================
MethodFn = Callable[[nn.Module, TrainConfig], None]


def classifier_head_names(model: nn.Module) -> list[str]:
    """Top-level head modules of a sequence classifier: ``classifier`` (BERT family), ``score`` (Llama …)."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return []
    return [n for n in TASK_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]


def lora_head_names(model: nn.Module) -> list[str]:
    """What LoRA trains in full for a sequence classifier: the new head and, where the head reads a
    pretrained pooler (BERT family), that pooler too. all-MiniLM-L6-v2's pooler (never trained by its
    sentence-embedding objective) outputs |x| ~ 0.05, so a head on it barely moves in a short run:
    SST-2, 64 steps, 57 % frozen vs 74 % trained (docs/training.md)."""
    heads = classifier_head_names(model)
    prefix = getattr(model, "base_model_prefix", "")
    pooler = getattr(getattr(model, prefix, None), POOLER_NAME, None)
    if heads and isinstance(pooler, nn.Module):
        heads.append(f"{prefix}.{POOLER_NAME}")
    return heads


def _prepare_lora(model: nn.Module, cfg: TrainConfig) -> None:
    """LoRA on ``cfg.targets``; a (new) classifier head is trained in full and saved with the adapter."""
    saved = cfg.modules_to_save if cfg.modules_to_save is not None else lora_head_names(model)
    config = LoraConfig(
        r=cfg.r,
        alpha=cfg.alpha,
        targets=tuple(cfg.targets),
        dropout=cfg.dropout,
        init=cfg.init,  # type: ignore[arg-type]
        use_rslora=cfg.use_rslora,
        modules_to_save=tuple(saved),
    )
    inject(model, config)


def _prepare_full(model: nn.Module, cfg: TrainConfig) -> None:
    """Full fine-tuning: every weight is trained."""
    for p in model.parameters():
        p.requires_grad_(True)


def _prepare_head(model: nn.Module, cfg: TrainConfig) -> None:
    """Only the classifier head is trained (the frozen-features baseline)."""
    heads = cfg.modules_to_save or classifier_head_names(model)
    if not heads:
        raise ConfigError(f"method 'head' trains a classifier head, but {type(model).__name__} has none")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in heads:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


METHODS: dict[str, MethodFn] = {"lora": _prepare_lora, "full": _prepare_full, "head": _prepare_head}


def register_method(name: str, fn: MethodFn) -> None:
    """Make ``--method name`` call ``fn(model, cfg)``: it must leave exactly the parameters to train with
    ``requires_grad=True`` (adding modules if the method needs them; ``cfg`` carries its settings)."""
    if name in METHODS and METHODS[name] is not fn:
        raise ConfigError(f"method {name!r} is already registered")
    METHODS[name] = fn


def method_function(name: str) -> MethodFn:
    """The function behind ``--method name``. Baselines from ``lorakit.methods`` are registered on first
    use, so a saved run of any method can be rebuilt (by ``lorakit eval``) without extra set-up."""
    if name not in METHODS:
        try:
            from lorakit.methods import TRAINER_METHODS
        except ImportError:  # the baselines package is optional for the trainer
            TRAINER_METHODS = {}
        if name in TRAINER_METHODS:
            register_method(name, TRAINER_METHODS[name])
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(known_methods()))}")
    return METHODS[name]


def known_methods() -> list[str]:
    try:
        from lorakit.methods import TRAINER_METHODS
    except ImportError:
        TRAINER_METHODS = {}
    return sorted({*METHODS, *TRAINER_METHODS})


def prepare_model(model: nn.Module, cfg: TrainConfig) -> None:
    """Apply ``cfg.method`` to ``model`` in place: the one place a method name turns into code."""
    method_function(cfg.method)(model, cfg)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"method {cfg.method!r} left no trainable parameters")


# == saving the trained state ============================================================================
def save_trainable_state(model: nn.Module, path: str | Path, cfg: TrainConfig) -> Path:
    """Any method's trainable parameters, by name, as safetensors + JSON (with the config to rebuild it).

    Written per file beside whatever else ``path`` holds (a run's logs), like an adapter."""
    tensors = {
        n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad
    }

    def config_with(sha256: str) -> dict[str, Any]:
        return {
            "format": TRAINABLE_FORMAT,
            "method": cfg.method,
            "base_model": cfg.model,
            "parameters": {n: list(t.shape) for n, t in tensors.items()},
            "sha256": sha256,
            "train_config": cfg.to_dict(),
        }

    return write_weights_and_config(path, tensors, TRAINABLE_WEIGHTS, config_with, TRAINABLE_CONFIG)


def save_trained(model: nn.Module, path: str | Path, cfg: TrainConfig) -> Path:
    """Write what training produced into directory ``path``: a LoRA adapter, or the trainable state.
    Other files in ``path`` are kept, so a run's final files go straight into its output folder."""
    if configs(model):
        saved, other = save_adapter(model, path), (TRAINABLE_CONFIG, TRAINABLE_WEIGHTS)
    else:
        saved, other = save_trainable_state(model, path, cfg), (CONFIG_NAME, WEIGHTS_NAME)
    for name in other:  # a folder holds one trained state: the other kind is an overwritten run's (config first)
        (Path(path) / name).unlink(missing_ok=True)
    return saved


def read_trainable_state(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of a saved trainable state, checked for integrity before any model is touched."""
    meta, weights = read_pair(path, TRAINABLE_CONFIG, TRAINABLE_WEIGHTS, "trained state")
    if meta.get("format") != TRAINABLE_FORMAT or "train_config" not in meta:
        raise AdapterFileError(f"{Path(path) / TRAINABLE_CONFIG} is not a lorakit trained state")
    if not meta.get("sha256"):  # always written: its absence means the pair was not saved whole
        raise AdapterFileError(f"{Path(path) / TRAINABLE_CONFIG} records no checksum of its weights")
    tensors = read_weights(weights, meta["sha256"], TRAINABLE_CONFIG)
    check_finite(tensors, weights)
    return meta, tensors


def load_trained(model: nn.Module, path: str | Path) -> None:
    """Load a LoRA adapter directory, or a method's trainable state, into a freshly loaded base ``model``."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        load_adapter(model, path)
        return
    if not (path / TRAINABLE_CONFIG).is_file():
        raise AdapterFileError(
            f"{path} holds neither a LoRA adapter ({CONFIG_NAME}) nor a trained state ({TRAINABLE_CONFIG})"
        )
    meta, tensors = read_trainable_state(path)
    # Rebuild the method's structure (it may add modules), then fill in the trained values.
    cfg = TrainConfig.from_dict(meta["train_config"])
    prepare_model(model, cfg)
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in params:
            raise AdapterFileError(f"{path}: trained tensor {name!r} does not exist in this model")
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise AdapterFileError(
                f"{path}: {name} is {tuple(tensor.shape)}, the model has {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    for p in model.parameters():
        p.requires_grad_(False)


# == schedule, optimizer, data order =====================================================================
def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    if step < warmup:
        return (step + 1) / (warmup + 1)  # never a wasted step at lr = 0
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; no weight decay on biases and norm weights; task heads
    trained with an adapter (``modules_to_save``) at ``head_lr_ratio`` times the lr."""
    if cfg.lr is None or cfg.head_lr_ratio is None:
        raise ConfigError("no learning rate: call resolve_task_defaults(cfg, kind) first (or set lr)")
    heads = {id(p) for p in saved_module_parameters(model)}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for _, p in ckpt.trainable_parameters(model):
        groups.setdefault((p.ndim >= 2, id(p) in heads), []).append(p)
    param_groups = [
        {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
         "lr": cfg.lr * (cfg.head_lr_ratio if head else 1.0)}
        for (decay, head), params in sorted(groups.items())
    ]  # fmt: skip
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def global_batches(order: list[int], batch_size: int, world_size: int) -> list[list[int]]:
    """Consecutive global batches; a last batch smaller than the number of processes is dropped."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if batches and len(batches[-1]) < world_size:
        batches.pop()
    return batches


def local_micro_batches(batch: list[int], rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
    """This process's share of a global batch as micro-batches (all non-empty, same count on every rank)."""
    share = [int(i) for i in np.array_split(np.asarray(batch), world_size)[rank]]
    n_micro = max(1, min(grad_accum, len(batch) // world_size))
    return [[int(i) for i in part] for part in np.array_split(np.asarray(share), n_micro)]


# == run bookkeeping =====================================================================================
@dataclass
class RunState:
    """Progress saved in checkpoints (JSON)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of `epoch` already consumed
    log_loss: float = 0.0  # loss sum and target count since the last log line
    log_count: float = 0.0


class MetricsLog:
    """metrics.jsonl (one JSON object per line) plus optional TensorBoard, written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = out / METRICS_LOG
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / TENSORBOARD_DIR))
            except ImportError:
                print(
                    "lorakit train: tensorboard is not installed; skipping event files "
                    "(pip install tensorboard)",
                    file=sys.stderr,
                )

    def truncate_after(self, step: int) -> None:
        """Drop records newer than a checkpoint being resumed (and a line cut short by a kill)."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")  # strict JSON: null, never NaN
        if self.writer is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_history(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss and the validation metrics against the step, as a PNG (no display needed)."""
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_metric = fig.subplots(1, 2)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], marker=".", label="train loss")
    if valid and "loss" in valid[0]:
        ax_loss.plot([r["step"] for r in valid], [r["loss"] for r in valid], marker="o", label="valid loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    names = sorted(
        {k for r in valid for k, v in r.items() if isinstance(v, float) and k not in ("loss", "epoch")}
    )
    for name in names:
        pts = [(r["step"], r[name]) for r in valid if isinstance(r.get(name), float)]
        ax_metric.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel("validation metric")
    if names:
        ax_metric.legend()
    fig.suptitle(title)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def _check_output_dir(out: Path, cfg: TrainConfig, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to mix runs in one folder; on resume, check the settings match and find the checkpoint."""
    saved_cfg = out / TRAIN_CONFIG
    if resume:
        if saved_cfg.is_file():
            old = json.loads(saved_cfg.read_text())
            new = cfg.to_dict()
            changed = rundir.changed_settings(old, new, RESUME_MAY_CHANGE)
            if changed:
                details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
                raise ConfigError(f"--resume: {out} was started with different settings ({details})")
        return ckpt.latest_checkpoint(out)
    held = rundir.what_it_holds(out, TRAINED_FILES, (METRICS_LOG, EVAL_RESULTS), (ckpt.CHECKPOINTS,))
    if held and not overwrite:
        raise ConfigError(f"{out} already holds {held}: pass --resume to continue it or --overwrite to start over")
    return None


def _clear_run(out: Path) -> None:
    rundir.clear_run(out, tuple(n for n in RUN_FILES if n not in TRAINED_FILES), (ckpt.CHECKPOINTS, TENSORBOARD_DIR))


def _say(info: dist_util.DistInfo, message: str) -> None:
    if info.is_main:
        print(message, file=sys.stderr, flush=True)


# == the loop ============================================================================================
def train(
    cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, kill_after_step: int | None = None
) -> dict[str, float]:
    """Run one training job (this process's part of it under torchrun) and return the final metrics.

    ``kill_after_step`` SIGKILLs the process after that optimizer step (and its checkpoint, if one is due):
    a test hook that simulates a crash.
    """
    info = dist_util.setup(cfg.device)
    try:
        return _train(cfg, info, resume=resume, overwrite=overwrite, kill_after_step=kill_after_step)
    finally:
        dist_util.teardown(info)


def _train(
    cfg: TrainConfig, info: dist_util.DistInfo, *, resume: bool, overwrite: bool, kill_after_step: int | None
) -> dict[str, float]:
    from tqdm.auto import tqdm

    from lorakit.models import load_model

    out = Path(cfg.out)
    # -- 1. everything that can be wrong with the input, before any model is loaded ----------------------
    method_function(cfg.method)  # an unknown method fails here, before any data or model is loaded
    if cfg.batch_size % (info.world_size * cfg.grad_accum):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
            f"({info.world_size} x {cfg.grad_accum}): it is the global batch per optimizer step"
        )
    if cfg.fsdp and resume:
        raise ConfigError(
            "--resume is not supported with --fsdp yet (FSDP checkpoints hold the adapter only)"
        )
    data: TaskData = load_task(cfg)
    spec: TaskSpec = data.spec
    cfg = resolve_task_defaults(cfg, spec.kind)
    set_class_weights(spec, data.train, cfg.class_weights)
    if spec.class_weights is not None:
        shown = ", ".join(f"{n} {w:.2f}" for n, w in zip(spec.label_names, spec.class_weights))
        data.notes.append(f"balanced class weights in the loss ({shown})")
    if len(data.train) < info.world_size:
        raise DataError(
            f"{len(data.train)} training example(s) cannot be shared by {info.world_size} processes"
        )
    resume_from = _check_output_dir(out, cfg, resume, overwrite)
    if resume and (out / EVAL_RESULTS).is_file():
        _say(info, f"lorakit train: {out} already finished; nothing to resume")
        return json.loads((out / EVAL_RESULTS).read_text())
    dist_util.barrier(info)  # every rank has checked the folder before rank 0 changes it
    if info.is_main:
        if overwrite and not resume:
            _clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / TRAIN_CONFIG)

    # -- 2. model: same seed on every rank, so every replica starts identical ---------------------------
    seed_everything(cfg.seed)
    extra: dict[str, Any] = {}
    if spec.kind == "classification":
        extra = {
            "id2label": dict(enumerate(spec.label_names)),
            "label2id": {n: i for i, n in enumerate(spec.label_names)},
        }
    model, tokenizer = load_model(cfg.model, spec.model_task, num_labels=spec.num_labels, **extra)
    prepare_model(model, cfg)
    report = parameter_report(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no KV cache while training (generation turns it on per call)
    model.to(info.device)
    if cfg.compile:
        compile_for_training(model)
    wrapped = dist_util.wrap_model(model, info, fsdp=cfg.fsdp)
    fsdp = dist_util.is_fsdp(wrapped)

    # -- 3. data, schedule, optimizer -------------------------------------------------------------------
    rows = encode(spec, data.train, tokenizer, cfg.max_length, cfg.truncation)
    steps_per_epoch = len(global_batches(list(range(len(rows))), cfg.batch_size, info.world_size))
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
    optimizer = build_optimizer(wrapped, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.schedule)
    )
    state = RunState()
    log = MetricsLog(out, info.is_main, cfg.tensorboard)
    if resume_from is not None:
        # Parameters are restored into the unwrapped model, whose names the checkpoint uses.
        state = RunState(
            **ckpt.load_checkpoint(
                resume_from,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                rank=info.rank,
                world_size=info.world_size,
            )
        )
        log.truncate_after(state.step)
        _say(info, f"lorakit train: resumed from {resume_from} (step {state.step}/{total_steps})")
    else:
        if resume:
            _say(info, f"lorakit train: no checkpoint in {out}; starting from scratch")
        # Dropout streams differ per process (rank 0's equals a single process's).
        seed_everything(cfg.seed + info.rank)

    per_rank = cfg.batch_size // info.world_size
    for note in data.notes:
        _say(info, f"lorakit train: {note}")
    _say(
        info,
        (
            f"lorakit train: {cfg.model} on {spec.name} ({len(data.train)} train / {len(data.eval)} eval "
            f"examples), method {cfg.method}: {report.trainable:,} of {report.total:,} parameters trainable "
            f"({report.percent:.3f}%)\n"
            f"  {total_steps} steps ({steps_per_epoch} per epoch), global batch {cfg.batch_size} = "
            f"{info.world_size} process(es) x {per_rank // cfg.grad_accum} x {cfg.grad_accum} micro-batches,"
            f" lr {cfg.lr:g} {cfg.schedule} with {warmup} warm-up steps, device {info.device}"
        ),
    )

    def run_validation(step: int) -> dict[str, float]:
        metrics = _evaluate(wrapped, tokenizer, spec, data.valid, cfg, info, fsdp, final=False)
        if info.is_main:
            record = {"split": "valid", "step": step, "epoch": round(step / steps_per_epoch, 4), **metrics}
            log.write(json_safe(record))
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            tqdm.write(f"step {step}: valid {shown}", file=sys.stderr)
        return metrics

    replica: list[nn.Module] = []

    def build_cpu_copy() -> nn.Module:
        # FSDP only: a CPU replica on rank 0 (built once) receives gathered weights to write plain files.
        if not replica:
            rng = torch.get_rng_state()
            copy, _ = load_model(cfg.model, spec.model_task, num_labels=spec.num_labels, **extra)
            prepare_model(copy, cfg)
            torch.set_rng_state(rng)  # building it must not shift rank 0's dropout stream
            replica.append(copy)
        return replica[0]

    def save_checkpoint() -> None:
        rng = dist_util.gather_objects(info, ckpt.capture_rng()) if info.enabled else [ckpt.capture_rng()]
        if fsdp:  # adapter-only: resuming FSDP runs is not supported
            _save_fsdp(wrapped, build_cpu_copy, out / ckpt.CHECKPOINTS / f"step-{state.step}", cfg, info)
        elif info.is_main:
            ckpt.save_checkpoint(
                out,
                state.step,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                state=asdict(state),
                rng_states=rng,
                save_trained=lambda m, p: save_trained(m, p, cfg),
            )
            ckpt.prune_checkpoints(out, cfg.keep_checkpoints)
        dist_util.barrier(info)

    # -- 4. the loop ------------------------------------------------------------------------------------
    wrapped.train()
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc="train",
        unit="step",
        disable=not info.is_main,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    started, tokens_seen, padding_seen = time.perf_counter(), 0, 0
    while state.step < total_steps:
        batches = epoch_batches(rows, cfg, state.epoch, info.world_size)  # random or length-grouped
        while state.batch_in_epoch < len(batches) and state.step < total_steps:
            micro = local_micro_batches(
                batches[state.batch_in_epoch], info.rank, info.world_size, cfg.grad_accum
            )
            # The loss is a mean over every target of the global batch, whichever process holds it.
            counts = torch.tensor([float(sum(rows[i]["n_targets"] for mb in micro for i in mb))])
            global_count = float(dist_util.all_reduce_sum(info, counts).item())
            step_stats = torch.zeros(3)  # loss sum, tokens, padded positions
            for k, mb in enumerate(micro):
                batch = {
                    key: v.to(info.device)
                    for key, v in collate(spec, [rows[i] for i in mb], tokenizer.pad_token_id).items()
                }
                # Gradients are averaged over processes once per step, on the last micro-batch.
                with dist_util.no_grad_sync(wrapped, info, skip=k < len(micro) - 1):
                    with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                        summed = loss_sum(spec, wrapped, batch, cfg.label_smoothing)
                    (summed * info.world_size / global_count).backward()
                n_tokens = float(batch["attention_mask"].sum())
                step_stats += torch.tensor([summed.item(), n_tokens, batch["attention_mask"].numel() - n_tokens])
            dist_util.all_reduce_sum(info, step_stats)
            grad_norm = None
            if cfg.clip_norm is not None:
                trainable = [p for _, p in ckpt.trainable_parameters(wrapped)]
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_norm)  # global under FSDP too
            ckpt.check_finite_step(state.step + 1, float(step_stats[0]), grad_norm, out)
            lr = cfg.lr * lr_factor(state.step, total_steps, warmup, cfg.schedule)  # the adapter lr, not a head's
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            state.batch_in_epoch += 1
            if state.batch_in_epoch == len(batches):
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            epoch_done = state.batch_in_epoch == 0
            state.log_loss += float(step_stats[0])
            state.log_count += global_count
            tokens_seen += int(step_stats[1])
            padding_seen += int(step_stats[2])
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(
                loss=f"{float(step_stats[0]) / global_count:.4f}",
                lr=f"{lr:.2e}",
                tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}",
            )
            if state.step % cfg.log_interval == 0 or state.step == total_steps:
                log.write(
                    {
                        "split": "train",
                        "step": state.step,
                        "epoch": round(state.step / steps_per_epoch, 4),
                        "loss": state.log_loss / max(state.log_count, 1.0),
                        "lr": lr,
                        "tokens_per_s": tokens_seen / max(elapsed, 1e-9),  # useful (non-pad) tokens
                        "pad_share": padding_seen / max(tokens_seen + padding_seen, 1),
                        "elapsed_s": elapsed,
                    }
                )
                state.log_loss, state.log_count = 0.0, 0.0
            if state.step < total_steps:
                if (state.step % cfg.eval_interval == 0) if cfg.eval_interval else epoch_done:
                    run_validation(state.step)
                if (state.step % cfg.save_interval == 0) if cfg.save_interval else epoch_done:
                    save_checkpoint()
            if kill_after_step is not None and state.step == kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if epoch_done:
                break  # the next epoch has its own order
    bar.close()

    # -- 5. final adapter, final evaluation, plot -------------------------------------------------------
    if fsdp:
        _save_fsdp(wrapped, build_cpu_copy, out, cfg, info)
    elif info.is_main:
        save_trained(model, out, cfg)
    valid_metrics = run_validation(total_steps)
    predictions: list[Any] = []
    if spec.kind != "generation" and data.valid is data.eval:
        final = valid_metrics  # GLUE: the dev set was just scored
    else:
        final = _evaluate(
            wrapped, tokenizer, spec, data.eval, cfg, info, fsdp, final=True, predictions=predictions
        )
    if info.is_main:
        log.write(json_safe({"split": "eval", "step": total_steps, **final}))
        if spec.kind == "generation":
            with open(out / PREDICTIONS, "w") as fh:
                for item, hyp in zip(data.eval, predictions):
                    fh.write(
                        json.dumps({"mr": item.mr, "prediction": hyp, "references": item.references}) + "\n"
                    )
        write_json_atomic(out / EVAL_RESULTS, json_safe(final))
        if cfg.plot:
            plot_history(log.records(), out / PLOT, f"{cfg.model} · {spec.name} · {cfg.method}")
        log.close()
        ckpt.prune_checkpoints(out, cfg.keep_checkpoints)
    dist_util.barrier(info)
    return final


def _evaluate(
    model: nn.Module,
    tokenizer: Any,
    spec: TaskSpec,
    items: list[Any],
    cfg: TrainConfig,
    info: dist_util.DistInfo,
    fsdp: bool,
    *,
    final: bool,
    predictions: list | None = None,
) -> dict[str, float]:
    """Validation (during training) or the final score. Rank 0 evaluates the unwrapped model while the
    others wait; under FSDP every rank runs the same evaluation in lockstep, because each forward gathers
    the sharded weights from all of them."""
    result: dict[str, float] = {}
    # A compiled backbone (--compile) runs eagerly here: generation's growing shapes would recompile it.
    with torch.compiler.set_stance("force_eager") if cfg.compile else nullcontext():
        if fsdp or info.is_main:
            inner = dist_util.unwrap(model)
            if final:
                result = score(inner, tokenizer, spec, items, cfg, info.device, progress=info.is_main,
                               predictions_out=predictions)  # fmt: skip
            else:
                result = validate(inner, tokenizer, spec, items, cfg, info.device, progress=info.is_main)
    dist_util.barrier(info)
    return dist_util.broadcast_object(info, result)


def _save_fsdp(
    model: nn.Module,
    build_cpu_copy: Callable[[], nn.Module],
    path: Path,
    cfg: TrainConfig,
    info: dist_util.DistInfo,
) -> None:
    """Gather the full state dict onto rank 0 (on CPU), copy the trained tensors into a CPU replica of the
    prepared model, and save the method's plain files from it (so FSDP runs yield ordinary adapters)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        replica = build_cpu_copy()
        with torch.no_grad():
            for name, p in ckpt.trainable_parameters(replica):
                p.copy_(full[name])
        save_trained(replica, path, cfg)
    dist_util.barrier(info)
