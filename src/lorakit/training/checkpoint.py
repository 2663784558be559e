"""Resumable checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory ``<out>/checkpoints/step-N/`` holding

* the method's trained state as the method saves it (for LoRA: ``adapter_config.json`` +
  ``adapter_model.safetensors``, so ``lorakit eval --adapter <ckpt>`` works on any checkpoint),
* ``trainer_state.safetensors``: the trainable parameters by name, the optimizer's per-parameter
  tensors and each rank's RNG states,
* ``trainer_state.json``: step, epoch, position in the epoch, scheduler and optimizer hyper-parameters,
  Python/NumPy RNG, pending log accumulators.

The directory is built under a temporary name and renamed into place, so a process killed mid-save leaves
the previous checkpoint intact and no half-written one that looks complete. Base weights are never
written: they are reloaded from the model name.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lorakit.errors import LorakitError, TrainingDivergedError
from lorakit.io.fsutil import debug_kill_point, disk_errors, file_mode, replace_path

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(LorakitError):
    """A checkpoint is missing, incomplete, or does not fit the run being resumed."""


# -- RNG state ---------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's RNG states: torch (CPU and CUDA) as tensors, Python and NumPy as JSON-able values."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )


def _rng_to_flat(rank: int, state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {f"rng/{rank}/torch": state["torch"], f"rng/{rank}/numpy_keys": state["numpy"]["keys"]}
    if "cuda" in state:
        tensors[f"rng/{rank}/cuda"] = state["cuda"]
    meta = {"python": state["python"], "numpy": {k: v for k, v in state["numpy"].items() if k != "keys"}}
    return tensors, meta


def _rng_from_flat(rank: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state = {
        "torch": tensors[f"rng/{rank}/torch"],
        "python": meta["python"],
        "numpy": {**meta["numpy"], "keys": tensors[f"rng/{rank}/numpy_keys"]},
    }
    if f"rng/{rank}/cuda" in tensors:
        state["cuda"] = tensors[f"rng/{rank}/cuda"]
    return state


# -- optimizer state -----------------------------------------------------------------------------------------
def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (safetensors) and the rest (JSON)."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# -- writing -----------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters the optimizer updates, in a stable order (the optimizer's index order)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _state_files(
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    trainable: dict[str, Tensor] | None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The checkpoint's tensors (parameters, optimizer state, RNG) and its JSON (everything else)."""
    if trainable is None:
        trainable = {n: p.detach() for n, p in trainable_parameters(model)}
    tensors = {f"param/{n}": t.detach().to("cpu").contiguous().clone() for n, t in trainable.items()}
    optim_tensors, optim_meta = _optimizer_to_flat(optimizer)
    tensors.update({k: v.detach().to("cpu").contiguous().clone() for k, v in optim_tensors.items()})
    rng_meta = []
    for rank, rng in enumerate(rng_states):
        rng_tensors, meta = _rng_to_flat(rank, rng)
        tensors.update(rng_tensors)
        rng_meta.append(meta)
    sched = scheduler.state_dict()
    sched.pop("lr_lambdas", None)  # functions, rebuilt from the config on resume
    meta_json = {
        "step": step,
        "trainer": state,
        "scheduler": sched,
        "optimizer": optim_meta,
        "rng": rng_meta,
        "parameters": list(trainable),
    }
    return tensors, meta_json


def save_checkpoint(
    out_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    save_trained: Callable[[nn.Module, Path], None],
    trainable: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``<out_dir>/checkpoints/step-<step>`` atomically and return its path.

    ``state`` is the trainer's JSON-able progress (epoch, position, accumulators …); ``rng_states`` has one
    entry per rank; ``save_trained(model, path)`` writes the method's files into a new directory ``path``.
    ``trainable`` overrides the parameter values read from ``model`` (FSDP gathers them itself).
    """
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp_parent = Path(tempfile.mkdtemp(prefix=f".step-{step}.tmp-", dir=root))
    tmp = tmp_parent / "ckpt"
    try:
        save_trained(model, tmp)  # creates tmp (the method's own files, e.g. the LoRA adapter)
        tmp.mkdir(exist_ok=True)
        tensors, meta_json = _state_files(step, model, optimizer, scheduler, state, rng_states, trainable)
        with disk_errors(final):
            save_file(tensors, tmp / STATE_TENSORS, metadata={"format": "pt"})
        os.chmod(tmp / STATE_TENSORS, file_mode())  # safetensors creates 0600: one mode for all files
        (tmp / STATE_JSON).write_text(json.dumps(meta_json, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            if f.is_file():
                _fsync_file(f)
        debug_kill_point("checkpoint:built")
        # A rerun of the same step swaps the two folders in one step: never delete the good copy first.
        replace_path(tmp, final)
        debug_kill_point("checkpoint:renamed")
    finally:
        shutil.rmtree(tmp_parent, ignore_errors=True)
    return final


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with trainer state), oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_JSON).is_file() and (child / STATE_TENSORS).is_file():
            found.append((int(match[1]), child))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (0: keep all) and leftovers of interrupted saves."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for leftover in root.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep > 0:
        for _, path in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def check_finite_step(step: int, loss_sum: float, grad_norm: Tensor | float | None, out_dir: Path) -> None:
    """Stop a diverged run before its optimizer step: a NaN/inf loss or gradient norm would poison the
    weights, and every later checkpoint with them. The checkpoints already written stay as they are.

    Args:
        step: the optimizer step about to be taken (1-based).
        loss_sum: the step's summed loss (the same on every process).
        grad_norm: the total gradient norm, when clipping computed it.
        out_dir: the run folder, to name the last good checkpoint.

    Raises:
        TrainingDivergedError: naming the step, the value and the checkpoint to resume from.
    """
    if hasattr(grad_norm, "full_tensor"):  # FSDP returns the norm as a DTensor
        grad_norm = grad_norm.full_tensor()
    norm = None if grad_norm is None else float(grad_norm)
    if math.isfinite(loss_sum) and (norm is None or math.isfinite(norm)):
        return
    what = f"loss is {loss_sum}" if not math.isfinite(loss_sum) else f"gradient norm is {norm}"
    last = latest_checkpoint(out_dir)
    kept = f"the last good checkpoint is {last}" if last is not None else "no checkpoint had been written yet"
    raise TrainingDivergedError(
        f"step {step}: the training {what}: training diverged (try a lower --lr, or --clip-norm); "
        f"stopped before the update, no adapter was written, {kept}"
    )


# -- reading -----------------------------------------------------------------------------------------------
def _check_fits(path: Path, meta: dict[str, Any], names: list[str], world_size: int) -> None:
    """The checkpoint trains the parameters ``names`` and was written by ``world_size`` processes."""
    if meta["parameters"] != names:
        missing = sorted(set(meta["parameters"]) ^ set(names))[:5]
        raise CheckpointError(
            f"{path}: checkpoint trains different parameters than this run (e.g. {missing}); "
            "was the method, targets or model changed?"
        )
    saved_world = len(meta["rng"])
    if saved_world != world_size:
        raise CheckpointError(
            f"{path}: written by {saved_world} process(es), resumed with {world_size}; resume with the same "
            "number of processes (the data split and RNG streams depend on it)"
        )


@torch.no_grad()
def _restore_parameters(path: Path, model: nn.Module, params: dict[str, Tensor]) -> None:
    """Every trainable parameter's value from the checkpoint (all shapes checked first)."""
    for name, p in trainable_parameters(model):
        if tuple(p.shape) != tuple(params[name].shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(params[name].shape)}, model {tuple(p.shape)}")
    for name, p in trainable_parameters(model):
        p.copy_(params[name].to(p.device, p.dtype))


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
    world_size: int = 1,
    load_trainable: Callable[[dict[str, Tensor]], None] | None = None,
) -> dict[str, Any]:
    """Restore parameters, optimizer, scheduler and this rank's RNG; return the trainer's JSON state.

    Every check happens before anything is modified, so a mismatched checkpoint leaves the run untouched.
    """
    path = Path(path)
    try:
        meta = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(path / STATE_TENSORS)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint: {exc}") from exc
    names = [n for n, _ in trainable_parameters(model)] if load_trainable is None else meta["parameters"]
    _check_fits(path, meta, names, world_size)
    params = {n: tensors[f"param/{n}"] for n in meta["parameters"]}
    if load_trainable is not None:
        load_trainable(params)
    else:
        _restore_parameters(path, model, params)
    optim_sd = _optimizer_from_flat(tensors, meta["optimizer"])
    optimizer.load_state_dict(optim_sd)
    sched = dict(meta["scheduler"])
    sched["lr_lambdas"] = [None] * len(optimizer.param_groups)
    scheduler.load_state_dict(sched)
    restore_rng(_rng_from_flat(rank, tensors, meta["rng"][rank]))
    return dict(meta["trainer"])
