"""Where things live in a checkout: the repository root, its offline data folder and lm-eval task folder."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The offline data (models, tokenizers, corpora for `mini` runs and tests) ships in the repository
# (data/README.md); `data_root=<folder>` points a run at another copy.
DEFAULT_DATA_ROOT = REPO_ROOT / "data"
LM_EVAL_TASKS_DIR = REPO_ROOT / "lm_eval_tasks"
