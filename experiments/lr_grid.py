"""Print the learning-rate grid a preset sweeps for one method, comma-joined for Hydra multirun:

    python experiments/lr_grid.py task=uuid method=mora            # -> 0.0015,0.005,0.015
    python experiments/run.py -m task=uuid method=mora lr=$(python experiments/lr_grid.py task=uuid method=mora)

The grids are data (``lr_grid_by_method`` in conf/preset/*.yaml), so the Makefile reads them from
there instead of repeating them. A method the preset gives no grid is an error naming the methods it has.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python experiments/<script>.py` from a checkout: the repository root on the path instead of this folder
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from experiments.schema import compose_config  # noqa: E402
from mora.validation import check_float  # noqa: E402


def lr_grid(overrides: list[str]) -> list[float]:
    """The composed config's ``lr_grid_by_method[<method>]``, every value checked."""
    cfg = compose_config(overrides)
    grids, method = cfg.get("lr_grid_by_method") or {}, cfg.method.name
    if method not in grids:
        raise ValueError(f"the preset {cfg.task.name}_{cfg.scale.name} has no lr_grid_by_method entry for "
                         f"method={method!r} (it has: {', '.join(sorted(grids)) or 'none'})")
    return [check_float(f"lr_grid_by_method.{method}", lr, 0.0, low_open=True) for lr in grids[method]]


if __name__ == "__main__":
    try:
        print(",".join(f"{lr:g}" for lr in lr_grid(sys.argv[1:])))
    except ValueError as error:
        sys.exit(f"lr_grid: {error}")
