"""The one task registry: every task ``lorakit train`` / ``lorakit eval`` / ``lorakit compare`` can run.

A ``Task`` is a name and a loader ``(cfg, roles) -> TaskData``; the loader's ``TaskSpec`` says what the
model is (``kind``, ``model_task``, labels) and which metric set scores it (``spec.metric``, an entry of
``lorakit.metrics.METRICS``). ``register_task`` adds one; ``load_task(cfg)`` is the one place a task name
turns into data. Every data problem is raised by the loader, before a model is loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorakit.data import glue_task_names
from lorakit.errors import ConfigError
from lorakit.tasks.e2e import load_e2e_task
from lorakit.tasks.glue import load_glue_task
from lorakit.tasks.nlg import load_nlg_task
from lorakit.tasks.preference import load_preference_task
from lorakit.tasks.spec import TaskData, TaskSpec, cap_valid, subsample
from lorakit.tasks.text import load_text_task

if TYPE_CHECKING:
    from lorakit.training.config import TrainConfig

__all__ = [
    "TASKS", "Task", "TaskData", "TaskSpec", "get_task", "load_task", "register_task", "subsample", "task_names",
]  # fmt: skip

Loader = Callable[["TrainConfig", Sequence[str]], TaskData]


@dataclass(frozen=True)
class Task:
    """A named task.

    Attributes:
        name: what ``--task`` takes.
        load: ``(cfg, roles) -> TaskData``: the examples of ``roles`` (train / valid / eval).
        summary: one line for listings.
        cap_valid: bound the validation split by ``max_valid_samples`` (GLUE validates on all of dev).
    """

    name: str
    load: Loader
    summary: str = ""
    cap_valid: bool = True


TASKS: dict[str, Task] = {}


def register_task(task: Task, aliases: Sequence[str] = ()) -> Task:
    """Make ``--task task.name`` (and each alias) load with ``task.load``.

    Args:
        task: the task.
        aliases: other names for it.
    """
    for name in (task.name, *aliases):
        if name in TASKS and TASKS[name] is not task:
            raise ConfigError(f"task {name!r} is already registered")
        TASKS[name] = task
    return task


def task_names() -> list[str]:
    """Every registered task name (aliases included), in registration order."""
    return list(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name`` (case-insensitive); an unknown name is an error listing the known ones."""
    key = name.lower()
    if key not in TASKS and key.replace("-", "").replace("_", "") in glue_task_names():
        key = key.replace("-", "").replace("_", "")  # "SST-2" is sst2, as GLUE's folders name it
    task = TASKS.get(key)
    if task is None:
        glue = [n for n in TASKS if n in glue_task_names()]
        other = [f"'{n}'" for n in TASKS if n not in glue and TASKS[n].name == n]
        raise ConfigError(f"unknown task {name!r}; choose a GLUE task ({', '.join(glue)}), {', '.join(other)}")
    return task


def load_task(cfg: TrainConfig, roles: Sequence[str] = ("train", "valid", "eval")) -> TaskData:
    """Load and check the data of ``roles`` for ``cfg.task``.

    Args:
        cfg: the run's settings (``task``, ``data``, files, sample limits, seeds).
        roles: which of train / valid / eval to read (``lorakit eval`` reads eval only).
    """
    task = get_task(cfg.task)
    data = task.load(cfg, roles)
    return cap_valid(data, cfg) if task.cap_valid else data


for _glue in glue_task_names():
    register_task(Task(_glue, functools.partial(load_glue_task, _glue), f"GLUE {_glue}", cap_valid=False))
register_task(Task("text", load_text_task, "classification from CSV/TSV/JSONL files"), aliases=("text-classification",))
register_task(Task("e2e", load_e2e_task, "E2E NLG: MR -> restaurant description"))
register_task(Task("webnlg", load_nlg_task, "WebNLG data-to-text"))
register_task(Task("dart", load_nlg_task, "DART data-to-text"))
register_task(Task("sft", load_nlg_task, "supervised fine-tuning on prompt/completion or chat records"))
register_task(Task("dpo", load_preference_task, "preference tuning (DPO, IPO, hinge) on prompt/chosen/rejected"))
register_task(Task("orpo", load_preference_task, "ORPO (reference-free preference tuning) on prompt/chosen/rejected"))
