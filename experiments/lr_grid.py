"""Print the learning-rate grid a preset sweeps for one method, comma-joined for Hydra multirun:

    python experiments/lr_grid.py task=uuid method=mora            # -> 0.0015,0.005,0.015
    python experiments/run.py -m task=uuid method=mora lr=$(python experiments/lr_grid.py task=uuid method=mora)

    python experiments/lr_grid.py --by-grid experiment=finetune_r8 task=metamath
    # -> one line per distinct grid: "dora,lora,loraplus 0.01,0.03,0.1" (methods sharing it, then the grid)
    python experiments/lr_grid.py --methods experiment=finetune_r8 task=metamath   # -> "fft lora …"
    python experiments/lr_grid.py --by-grid --only fft,mora experiment=finetune_r8 task=metamath   # those only

The grids are data (``lr_grid_by_method`` in conf/preset/*.yaml), so the Makefile reads them from
there instead of repeating them. A method the preset gives no grid is an error naming the methods it has.
``--by-grid`` lets one Hydra multirun sweep every method of a grid at once (the joblib workers stay busy).
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


def methods_by_grid(overrides: list[str]) -> dict[tuple[float, ...], list[str]]:
    """Every grid of the composed preset's ``lr_grid_by_method`` → the methods that sweep it, sorted."""
    cfg = compose_config(overrides)
    grids = cfg.get("lr_grid_by_method") or {}
    if not grids:
        raise ValueError(f"the preset {cfg.task.name}_{cfg.scale.name} has no lr_grid_by_method")
    by_grid: dict[tuple[float, ...], list[str]] = {}
    for method in sorted(grids):
        grid = tuple(check_float(f"lr_grid_by_method.{method}", lr, 0.0, low_open=True) for lr in grids[method])
        by_grid.setdefault(grid, []).append(method)
    return by_grid


def _fmt(grid) -> str:
    return ",".join(f"{lr:g}" for lr in grid)


if __name__ == "__main__":
    try:
        args = sys.argv[1:]
        # --only m1,m2: keep these methods (the Makefile's FT_ONLY; empty keeps all)
        only = set(args[args.index("--only") + 1].split(",")) - {""} if "--only" in args else set()
        if "--only" in args:
            del args[args.index("--only"):args.index("--only") + 2]
        if args[:1] == ["--methods"]:      # every method with a grid, space-separated (for shell loops)
            methods = [m for group in methods_by_grid(args[1:]).values() for m in group]
            print(" ".join(m for m in methods if not only or m in only))
        elif args[:1] == ["--by-grid"]:
            for grid, methods in methods_by_grid(args[1:]).items():
                kept = [m for m in methods if not only or m in only]
                if kept:
                    print(f"{','.join(kept)} {_fmt(grid)}")
        else:
            print(_fmt(lr_grid(args)))
    except ValueError as error:
        sys.exit(f"lr_grid: {error}")
