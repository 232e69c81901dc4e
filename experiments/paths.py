"""Where things live in a checkout: the repository root and the offline data folder beside it."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The offline data (models, tokenizers, corpora for `mini` runs and tests) sits beside the repository.
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
LM_EVAL_TASKS_DIR = REPO_ROOT / "lm_eval_tasks"
