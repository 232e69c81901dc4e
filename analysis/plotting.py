"""Drawing shared by the figures: an Agg figure, saving it, a loss line with its band, line styles, legends.

Figures are drawn on the Agg canvas without pyplot, so importing this module sets no backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.methods import MethodKey, method_label
from analysis.runs import Group

# One style per operator of a method, in the operators' name order; dashes stay free for LoRA (Fig. 3).
OPERATOR_LINE_STYLES = ("-", "-.", ":", (0, (5, 1)))
PNG_DPI = 150


def new_figure(width: float, height: float) -> Figure:
    """An empty figure (inches) on its own Agg canvas, with constrained layout."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, png: str | Path) -> Path:
    """Write ``fig`` as a PNG at :data:`PNG_DPI` without the "Software" entry (matplotlib's version), so
    the file holds the drawing only: drawing the same runs again gives the same bytes."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=PNG_DPI, metadata={"Software": None})
    return png


def save_figure(fig: Figure, out_path: str | Path) -> tuple[Path, Path]:
    """Write ``fig`` as PNG (:func:`save_png`) and PDF with the stem of ``out_path``; returns both paths."""
    stem = Path(out_path).with_suffix("")
    png, pdf = save_png(fig, stem.with_suffix(".png")), stem.with_suffix(".pdf")
    fig.savefig(pdf)
    return png, pdf


def draw_loss(ax, group: Group, label: str, color, linestyle) -> None:
    """Mean training loss over seeds with a ±1 std band (no band where n = 1)."""
    steps = list(group.loss)
    mean = [group.loss[s].mean for s in steps]
    std = [group.loss[s].std for s in steps]
    ax.plot(steps, mean, color=color, linestyle=linestyle, label=label)
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color=color, alpha=0.2, linewidth=0)


def line_style(key: MethodKey, keys: Sequence[MethodKey], single="-"):
    """``single`` when ``key``'s method has one operator among ``keys``; otherwise one of
    :data:`OPERATOR_LINE_STYLES` per operator, so a method's operators differ while its colour stays."""
    operators = sorted({k.operator or "" for k in keys if k.method == key.method})
    if len(operators) == 1:
        return single
    return OPERATOR_LINE_STYLES[operators.index(key.operator or "") % len(OPERATOR_LINE_STYLES)]


def line_label(group: Group, with_operator: bool = False) -> str:
    """Legend entry: method, paper rank (and this scale's rank if different), chosen lr."""
    name, key, eff = method_label(group.key, with_operator), group.key, group.effective_rank
    if key.rank is None:
        return f"{name}, lr={group.lr:g}"
    scale_rank = f" ({group.runs[0].scale} r={eff})" if eff is not None and eff != key.rank else ""
    return f"{name} r={key.rank}{scale_rank}, lr={group.lr:g}"
