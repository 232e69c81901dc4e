"""How every table and figure shows a method: one row per method in :data:`METHODS`.

Adding a method to the analysis means adding its row here; a method without a row still renders,
under its own name, in grey, after the known ones. Which methods a paper table or figure compares
(e.g. Fig. 3: LoRA vs MoRA) is the paper's data and stays with that table or figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol


@dataclass(frozen=True)
class MethodStyle:
    """One method's presentation: its name in legends and table rows, its matplotlib colour where
    colour stands for the method (Fig. 4, Fig. 5), and its line style where lines of several methods
    share a colour (Fig. 3 colours by rank: LoRA dashed, MoRA solid)."""

    label: str
    color: str
    linestyle: str = "-"


# Row order is the order of rows, lines and bars: the paper's Table 3 rows, then full-rank
# training, then the other fine-tuning baselines.
METHODS: dict[str, MethodStyle] = {
    "lora": MethodStyle("LoRA", "C0", linestyle="--"),
    "mora": MethodStyle("MoRA", "C1"),
    "relora": MethodStyle("ReLoRA", "C2"),
    "remora": MethodStyle("ReMoRA", "C3"),
    "fft": MethodStyle("FFT", "black"),
    "asylora": MethodStyle("AsyLoRA", "C6"),
    "dora": MethodStyle("DoRA", "C4"),
    "loraplus": MethodStyle("LoRA+", "C5"),
}
UNKNOWN_COLOR = "C7"  # grey in matplotlib's default cycle, which the rows above leave free


class MethodKey(Protocol):
    """What a table row or a line is keyed by (``analysis.runs.GroupKey``, ``PretrainKey``, ``ArmKey``)."""

    method: str
    operator: str | None


def method_style(method: str) -> MethodStyle:
    """The row of ``method``; a method without one shows under its own name, in grey, solid."""
    return METHODS.get(method, MethodStyle(method, UNKNOWN_COLOR))


def method_order(method: str) -> tuple[int, str]:
    """Sort key: the position of the method's row; methods without one last, by name."""
    return (list(METHODS).index(method) if method in METHODS else len(METHODS)), method


def method_label(key: MethodKey, with_operator: bool = False) -> str:
    """``MoRA``, or ``MoRA (share)`` with ``with_operator`` when the key has an operator."""
    name = method_style(key.method).label
    return f"{name} ({key.operator})" if with_operator and key.operator else name


def operators_vary(groups: Iterable) -> bool:
    """Whether some method appears with several operators among ``groups`` (anything with a
    ``key``): then labels name the operator."""
    seen: dict[str, set] = {}
    for g in groups:
        seen.setdefault(g.key.method, set()).add(g.key.operator)
    return any(len(ops) > 1 for ops in seen.values())
