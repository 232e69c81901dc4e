"""The layout of the code is the architecture (docs/architecture.md): these tests keep it true.

- every module the document names exists and imports;
- layers import downward only (mora ← experiments ← analysis) and no module imports itself back;
- a task or method name is read in its registry only, never compared against elsewhere;
- a new task registers and runs through the real entry point (the docs' recipe, as a test).
"""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments.tasks import TASKS, TaskFamily, register_task
from experiments.tasks.base import TaskSpec, TokenizerVocabulary, batch_indices
from mora.validation import check_int

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"
LAYERS = ("mora", "experiments", "analysis")  # each may import only the ones before it
REGISTRIES = {"experiments/tasks/__init__.py", "mora/methods.py"}


def repo_modules() -> dict[str, Path]:
    """Dotted name → file of every module in the three layers."""
    modules = {}
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Repository modules ``path`` imports anywhere in its body (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from a.b import c` imports a.b, and a.b.c when c is a submodule
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = repo_modules()
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def test_the_documented_modules_exist_and_import():
    named = set(re.findall(r"`((?:mora|experiments|analysis)(?:/[\w]+)*(?:\.py|/))`", DOC.read_text()))
    assert len(named) > 20, "docs/architecture.md should name the modules of every layer"
    for path in sorted(named):
        assert (REPO / path).exists(), f"docs/architecture.md names {path}, which does not exist"
        if path.endswith(".py") and not path.endswith("__main__.py"):
            importlib.import_module(path.removesuffix(".py").replace("/", ".").removesuffix(".__init__"))


def test_every_module_is_documented_in_its_package_docstring_or_the_doc():
    text = DOC.read_text()
    undocumented = [str(p.relative_to(REPO)) for p in repo_modules().values()
                    if p.name != "__init__.py" and str(p.relative_to(REPO)) not in text]
    assert not undocumented, f"modules missing from docs/architecture.md: {undocumented}"


def test_layers_import_downward_only():
    for module, imports in import_graph().items():
        allowed = LAYERS[:LAYERS.index(module.split(".")[0]) + 1]
        upward = sorted(m for m in imports if m.split(".")[0] not in allowed)
        assert not upward, f"{module} imports {upward} from a higher layer"


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def name_comparisons(path: Path, names: set[str]) -> list[str]:
    """``x == "c4"``, ``x in ("lora", ...)`` and the like in ``path``: registry names tested in code."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            constants = [side] if isinstance(side, ast.Constant) else (
                list(side.elts) if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [])
            for const in constants:
                if isinstance(const, ast.Constant) and const.value in names:
                    hits.append(f"{path.relative_to(REPO)}:{node.lineno} tests {const.value!r}")
    return hits


def registered_method_names() -> set[str]:
    """Method names that are not also layer kinds ("lora", "mora" name both: comparing a layer kind is fine)."""
    from mora.methods import LAYER_KINDS, METHODS
    return set(METHODS) - set(LAYER_KINDS)


def test_task_and_method_names_are_read_in_their_registries_only():
    names = set(TASKS) | registered_method_names()
    hits = [hit for path in repo_modules().values()
            if str(path.relative_to(REPO)) not in REGISTRIES and path.parts[-2] != "analysis"
            for hit in name_comparisons(path, names)]
    assert not hits, "registry names compared outside the registries:\n" + "\n".join(hits)


# ----------------------------------------------------------------------------- add a task (the docs' recipe)

@dataclass(frozen=True)
class CountingTaskSpec(TaskSpec):
    """A toy task: continue the sequence s, s+1, s+2, … (mod ``modulus``) from a random start s."""

    name: str = "counting"
    modulus: int = 16
    length: int = 12
    n_sequences: int = 64

    def __post_init__(self) -> None:
        for field in ("modulus", "length", "n_sequences"):
            check_int(f"task.{field}", getattr(self, field), 2)


class CountingTask(TokenizerVocabulary):
    lm_eval = None

    def __init__(self, spec: CountingTaskSpec, tokenizer, batch_size: int, seed: int):
        self.spec, self.tokenizer, self.batch_size, self.seed = spec, tokenizer, batch_size, seed
        starts = torch.randint(0, spec.modulus, (spec.n_sequences, 1), generator=torch.Generator().manual_seed(seed))
        self.sequences = (starts + torch.arange(spec.length)) % spec.modulus + 3   # (N, T), ids above the specials

    def batch(self, step: int, process_index: int = 0, num_processes: int = 1) -> dict[str, torch.Tensor]:
        rows = batch_indices(len(self.sequences), self.batch_size, step, self.seed)[process_index::num_processes]
        return {"input_ids": self.sequences[rows], "labels": self.sequences[rows]}

    def evaluate(self, model, device) -> dict[str, float]:
        with torch.no_grad():
            logits = model(input_ids=self.sequences.to(device)).logits[:, :-1]
        return {"next_token_accuracy": (logits.argmax(-1).cpu() == self.sequences[:, 1:]).float().mean().item()}

    def describe(self) -> str:
        return f"counting: {len(self.sequences)} sequences of {self.spec.length} tokens mod {self.spec.modulus}"


def build_counting_task(spec, tokenizer, *, batch_size: int, seed: int, data_root) -> CountingTask:
    return CountingTask(spec, tokenizer, batch_size, seed)


@pytest.fixture
def counting_task():
    register_task("counting", TaskFamily(CountingTaskSpec, build_counting_task))
    yield
    del TASKS["counting"]


def test_a_registered_toy_task_runs_through_the_entry_point(counting_task, tmp_path):
    from experiments.run import execute
    from tests.test_configs import compose

    with pytest.raises(ValueError, match="already registered"):
        register_task("counting", TaskFamily(CountingTaskSpec, build_counting_task))
    cfg = compose("task=uuid", "model=stories260k", "method=mora", "rank=256", f"out_dir={tmp_path / 'run'}", "train.max_steps=4",
                  "train.warmup_steps=1", "train.eval_steps=[4]", "train.log_every=2", "train.ckpt_every=4", "lr=1e-2")
    OmegaConf.set_struct(cfg, False)  # the toy task has no conf/task/*.yaml: its section is written here
    cfg.task = {"name": "counting", "modulus": 16, "length": 12, "n_sequences": 64}
    summary = execute(cfg)
    assert summary["status"] == "completed"
    assert 0.0 <= summary["final"]["eval/next_token_accuracy"] <= 1.0
    cfg.task.modulus, cfg.out_dir = 1, str(tmp_path / "refused")
    with pytest.raises(ValueError, match="task.modulus must be an integer >= 2"):
        execute(cfg)
    assert not (tmp_path / "refused").exists()  # refused before anything was written
