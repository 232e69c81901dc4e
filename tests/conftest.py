"""Fixtures and helpers shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny matmuls gain nothing from more, and on a busy shared machine
    spinning OpenMP workers make them many times slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def execute_notebook(path: Path, runs: Path, timeout: int) -> list[dict]:
    """Run the notebook at ``path`` on the run folders under ``runs`` (its "parameters" cell is
    rewritten to ``RUNS = runs``, ``OUT = None``); returns the outputs of its code cells."""
    import nbclient  # test dependencies (pyproject [test]): a missing one fails, never skips
    import nbformat

    nb = nbformat.read(path, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = f"RUNS = {str(runs)!r}\nOUT = None"
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
