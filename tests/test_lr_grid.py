"""experiments/lr_grid.py: the Makefile's sweeps read each preset's learning-rate grid from the config."""

import subprocess
import sys
from pathlib import Path

import pytest

from experiments.lr_grid import lr_grid

REPO = Path(__file__).resolve().parents[1]


def test_paper_grids_are_the_papers():
    assert lr_grid(["task=uuid", "scale=paper", "method=lora"]) == [1e-4, 2e-4, 3e-4]   # Section 3
    assert lr_grid(["task=uuid", "scale=paper", "method=mora"]) == [5e-5, 1e-4, 2e-4]   # Section 5.1


def test_a_method_without_a_grid_is_named():
    with pytest.raises(ValueError, match="method='dora'"):
        lr_grid(["task=uuid", "scale=paper", "method=dora"])


def test_the_script_prints_a_hydra_sweep_value():
    out = subprocess.run([sys.executable, "experiments/lr_grid.py", "task=uuid", "scale=paper", "method=mora"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "5e-05,0.0001,0.0002"


def test_config_value_reads_the_composed_config():
    from experiments.config_value import config_value

    assert config_value("task.n_pairs", ["task=uuid", "scale=paper"]) == 10000
    assert config_value("train.eval_steps", ["task=uuid", "scale=paper"]) == [300, 500, 700, 900]
    with pytest.raises(KeyError, match="task.nope"):
        config_value("task.nope", ["task=uuid"])
