"""UUID memorisation as the number of pairs grows (issue 12, item 4; beyond the paper).

Table 2 asks how fast each method memorises when every arm has capacity to spare. The answer a
miniature gives depends on how much there is to memorise per trainable parameter, so the same arms are
run at several numbers of pairs, from capacity to spare to capacity-starved, each at its Table 2 learning
rate, and reported per Table 2 evaluation: FFT, LoRA and MoRA accuracy, and the MoRA − LoRA gap at both
paper ranks, paired by seed (seed s of MoRA minus seed s of LoRA: the two see the same batches), so a
reader sees where the paper's claim holds and where it breaks. The protocol is docs/calibration.md's
"Table 2 and the pairs sweep", written before any MoRA run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from analysis.calibration import paper_steps
from analysis.methods import method_style
from analysis.plotting import new_figure, save_figure
from analysis.runs import GroupKey, Group, Stat, best_groups, check_unique, format_stat, mean_std, run_from_record
from experiments.loop.records import find_runs

RANKS = (8, 256)
ADAPTERS = ("lora", "mora")


@dataclass(frozen=True)
class PairsPoint:
    """Every arm's best-of-grid group at one number of pairs."""

    n_pairs: int
    batch_size: int
    groups: dict[GroupKey, Group]

    def group(self, method: str, rank: int | None) -> Group | None:
        found = [g for k, g in self.groups.items() if k.method == method and k.rank == rank]
        if len(found) > 1:
            raise ValueError(f"{len(found)} operators of {method} r={rank} at {self.n_pairs} pairs; the sweep "
                             "compares one operator per method")
        return found[0] if found else None

    @property
    def eval_steps(self) -> tuple[int, ...]:
        return tuple(sorted({s for g in self.groups.values() for s in g.char_accuracy}))


def load_sweep(roots: Sequence[str | Path]) -> list[PairsPoint]:
    """The UUID runs under ``roots`` grouped by their number of pairs (from each run's config), by
    increasing N; within one N every (method, operator, rank) is reduced to its best learning rate."""
    by_pairs: dict[int, list] = defaultdict(list)
    batches: dict[int, set[int]] = defaultdict(set)
    for root in roots:
        for record in find_runs(root, **{"task.name": "uuid"}):
            n_pairs = int(record["config"]["task"]["n_pairs"])
            by_pairs[n_pairs].append(run_from_record(record))
            batches[n_pairs].add(int(record["config"]["train"]["batch_size"]))
    points = []
    for n_pairs in sorted(by_pairs):
        if len(batches[n_pairs]) > 1:
            raise ValueError(f"the runs at {n_pairs} pairs use several batch sizes {sorted(batches[n_pairs])}; "
                             "the sweep keeps batch = 0.3 N")
        check_unique(by_pairs[n_pairs])
        points.append(PairsPoint(n_pairs, batches[n_pairs].pop(), best_groups(by_pairs[n_pairs])))
    return points


def paired_gap(mora: Group, lora: Group, step: int) -> Stat | None:
    """MoRA − LoRA character accuracy at ``step``, seed by seed (seeds both have), mean ± std."""
    lora_by_seed = {run.seed: run.char_accuracy.get(step) for run in lora.runs}
    diffs = [run.char_accuracy[step] - lora_by_seed[run.seed] for run in mora.runs
             if step in run.char_accuracy and lora_by_seed.get(run.seed) is not None]
    return mean_std(diffs) if diffs else None


def _acc(group: Group | None, step: int) -> str:
    return format_stat(group.char_accuracy[step]) if group and step in group.char_accuracy else "–"


def sweep_markdown(points: Sequence[PairsPoint]) -> str:
    """One table per paper rank: per N and evaluation, FFT, LoRA, MoRA and the paired gap."""
    if not points:
        raise ValueError("no UUID runs found for the pairs sweep")
    lines = ["# UUID memorisation as the number of pairs grows", "",
             "Character accuracy (%), mean ± std over seeds; each arm at its best learning rate (Table 2's rule "
             "at each N). Gap: MoRA − LoRA paired by seed. Protocol: docs/calibration.md.", ""]
    for rank in RANKS:
        lines += [f"## Paper rank {rank}", "",
                  "| pairs | batch | step (paper) | FFT | LoRA | MoRA | MoRA − LoRA | seeds (LoRA/MoRA) |",
                  "|---|---|---|---|---|---|---|---|"]
        for point in points:
            fft, lora, mora = point.group("fft", None), point.group("lora", rank), point.group("mora", rank)
            standing = paper_steps(point.eval_steps)
            for step in point.eval_steps:
                gap = paired_gap(mora, lora, step) if lora and mora else None
                gap_text = format_stat(gap) if gap else "–"
                seeds = f"{len(lora.runs) if lora else 0}/{len(mora.runs) if mora else 0}"
                lines.append(f"| {point.n_pairs} | {point.batch_size} | {step} ({standing.get(step, '–')}) | "
                             f"{_acc(fft, step)} | {_acc(lora, step)} | {_acc(mora, step)} | {gap_text} | {seeds} |")
        lines.append("")
    return "\n".join(lines)


def plot_sweep(points: Sequence[PairsPoint], out_path: str | Path | None = None):
    """Accuracy against the number of pairs, one panel per (paper rank, Table 2 evaluation)."""
    if not points:
        raise ValueError("no UUID runs found for the pairs sweep")
    steps = sorted({s for p in points for s in p.eval_steps})
    fig = new_figure(3.0 * max(1, len(steps)), 5.2)
    axes = fig.subplots(len(RANKS), max(1, len(steps)), sharex=True, sharey=True, squeeze=False)
    for row, rank in enumerate(RANKS):
        for col, step in enumerate(steps):
            ax = axes[row][col]
            for method, label_rank in (("fft", None), ("lora", rank), ("mora", rank)):
                xs, ys, es = [], [], []
                for point in points:
                    group = point.group(method, label_rank)
                    if group and step in group.char_accuracy:
                        stat = group.char_accuracy[step]
                        xs.append(point.n_pairs), ys.append(stat.mean), es.append(0 if stat.n < 2 else stat.std)
                if xs:
                    style = method_style(method)
                    ax.errorbar(xs, ys, yerr=es, color=style.color, linestyle=style.linestyle, marker="o",
                                markersize=3, capsize=2, label=style.label)
            standing = paper_steps(steps).get(step)
            ax.set_title(f"r={rank}, step {step}" + (f" (paper {standing})" if standing else ""), fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 102)
            if col == 0:
                ax.set_ylabel("character accuracy (%)")
            if row == len(RANKS) - 1:
                ax.set_xlabel("UUID pairs")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("UUID memorisation vs number of pairs (mini; mean ± std over seeds, best lr per arm)")
    if out_path is not None:
        save_figure(fig, out_path)
    return fig


def write_sweep_report(roots: Sequence[str | Path], out: str | Path) -> list[Path]:
    """``pairs_sweep.md`` and ``pairs_sweep.{png,pdf}`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = load_sweep(roots)
    table = out / "pairs_sweep.md"
    table.write_text(sweep_markdown(points) + "\n", encoding="utf-8")
    return [table, *save_figure(plot_sweep(points), out / "pairs_sweep")]
