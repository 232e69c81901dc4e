"""The paper's tasks behind one interface (:class:`~experiments.tasks.base.Task`).

This registry is the only place a task name (``task.name`` in conf/task/*.yaml) is read: it maps
the name to its family — the spec class that validates the ``task`` config and the builder that
turns a spec into the object the training loop uses. To add a task: write its spec and builder
(docs/architecture.md, "Add a task"), register the name here or with :func:`register_task`, and
add conf/task/<name>.yaml.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from experiments.tasks.base import LmEvalSettings, Task, TaskSpec
from experiments.tasks.c4 import C4TaskSpec, build_c4_task
from experiments.tasks.finetune import FinetuneTaskSpec, build_finetune_task
from experiments.tasks.uuid_memory import UUIDTaskSpec, build_uuid_task
from mora.validation import check_choice


@dataclass(frozen=True)
class TaskFamily:
    """How a task is validated (``spec``) and built (``build(spec, tokenizer, *, batch_size, seed, data_root)``).

    ``tokenizer`` is the base model's, or None for a model built from a config, whose vocabulary
    then comes from the task (:attr:`Task.vocab_size`).
    """

    spec: type[TaskSpec]
    build: Callable[..., Task]


_UUID = TaskFamily(UUIDTaskSpec, build_uuid_task)
_C4 = TaskFamily(C4TaskSpec, build_c4_task)
_FINETUNE = TaskFamily(FinetuneTaskSpec, build_finetune_task)

TASKS: dict[str, TaskFamily] = {
    "uuid": _UUID,          # Section 3, Section 5.1: Fig. 2, Fig. 3, Table 2
    "c4": _C4,              # Section 5.3: Fig. 4, Table 3, Fig. 5
    "metamath": _FINETUNE,  # Section 5.2: Table 1, Table 4
    "tulu": _FINETUNE,
    "biomed": _FINETUNE,    # Table 1, Table 6
    "finance": _FINETUNE,   # Table 7
}


def register_task(name: str, family: TaskFamily) -> None:
    """Make ``task.name=<name>`` build with ``family`` (a new task, or a test's toy one)."""
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered")
    TASKS[name] = family


def task_spec(values: dict) -> TaskSpec:
    """The validated spec of a composed ``task`` config section; errors name ``task.<field>``."""
    check_choice("task", values.get("name"), TASKS)
    return TASKS[values["name"]].spec.from_dict(values)


def build_task(spec: TaskSpec, tokenizer, *, batch_size: int, seed: int, data_root: str | Path) -> Task:
    """The task object of ``spec`` (see :class:`TaskFamily` for ``tokenizer``)."""
    return TASKS[spec.name].build(spec, tokenizer, batch_size=batch_size, seed=seed, data_root=data_root)


__all__ = ["LmEvalSettings", "TASKS", "Task", "TaskFamily", "TaskSpec", "build_task", "register_task", "task_spec"]
