"""``python -m analysis uuid|pretrain|finetune|regime|calibrate-uuid|uuid-pairs|c4-tokens|c4-diagnosis|c4-calibration|finetune-calibration|best-lr|figures --runs results/runs --out reports/<name>``: the paper's figures and tables.

``uuid``: Fig. 2, Fig. 3 and Table 2 (UUID memorisation). ``pretrain``: Fig. 4, Table 3 and Fig. 5
(C4 pretraining). ``finetune``: Tables 1, 4, 6 and 7 (fine-tuning, lm-eval scores). ``regime``: whether
each `mini` experiment is in the paper's regime (presets, models and run folders). ``calibrate-uuid``: the
UUID calibration rule of docs/calibration.md applied to the FFT and LoRA calibration runs. ``uuid-pairs``: UUID
accuracy and the MoRA − LoRA gap as the number of pairs grows. ``c4-tokens``: C4 perplexity and the MoRA − LoRA
gap as the training tokens per parameter grow. ``c4-diagnosis``: why LoRA ends below FFT in
the first `mini` C4 preset (baselines under a finer lr grid, longer training, frozen embeddings).
``c4-calibration``: the C4 calibration rule (Amendment 5) applied to the FFT and LoRA runs of the current preset.
``finetune-calibration``: the fine-tuning calibration rule (Amendment 6) on the FFT and LoRA runs of the current presets.
``best-lr``: the learning rate Table 2's (Table 3's, Table 1's) rule chooses for each arm given (the pairs sweep,
`make table3` and `make table1-<task>` read it). ``figures``: the README's figures (Fig. 2-5, the Table 1 bars) as PNGs under fixed names, into docs/figures/. Reads run folders
only; exits 1 with a message when no run matches.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import yaml

from analysis.c4_calibration import write_calibration_report as write_c4_calibration_report
from analysis.finetune_calibration import finetune_best_lrs, write_calibration_report as write_finetune_calibration_report
from analysis.c4_diagnosis import preset_train_tokens, write_diagnosis_report
from analysis.calibration import write_calibration_report
from analysis.c4_tokens_sweep import write_sweep_report as write_c4_tokens_report
from analysis.pairs_sweep import write_sweep_report
from analysis.pretrain_figures import (FIG5_THRESHOLD, choose_pretrain_lr, group_pretrain_runs, load_pretrain_runs,
                                      lr_sweep_markdown, write_pretrain_report)
from analysis.finetune_tables import load_finetune_runs, lr_sweep_markdown as finetune_lr_markdown, write_finetune_report
from analysis.readme_figures import write_readme_figures
from analysis.regime import write_report as write_regime_report
from analysis.runs import load_runs, select_learning_rates
from experiments.loop.records import find_runs
from mora.methods import get_method
from analysis.uuid_figures import write_uuid_report


def _filter(text: str) -> tuple[str, object]:
    """``train.max_steps=300`` → ("train.max_steps", 300); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="report", required=True)
    uuid = sub.add_parser("uuid", help="UUID memorisation: fig2.{png,pdf}, fig3.{png,pdf}, table2.md")
    uuid.add_argument("--runs", type=Path, default=Path("results/runs"), help="results root (default: %(default)s)")
    uuid.add_argument("--out", type=Path, default=Path("reports/uuid"), help="output folder (default: %(default)s)")
    uuid.add_argument("--scale", default=None, help="mini | paper (default: the one scale present)")
    uuid.add_argument("--where", type=_filter, action="append", default=[], metavar="KEY=VALUE",
                      help="keep runs whose config has this dotted key's value, e.g. train.max_steps=300")
    pretrain = sub.add_parser("pretrain", help="C4 pretraining: fig4.{png,pdf}, table3.md, fig5.{png,pdf}, fig5.md")
    pretrain.add_argument("--runs", type=Path, default=Path("results/runs"), help="results root (default: %(default)s)")
    pretrain.add_argument("--out", type=Path, default=Path("reports/pretrain"),
                          help="output folder (default: %(default)s)")
    pretrain.add_argument("--threshold", type=float, default=FIG5_THRESHOLD,
                          help="Fig. 5 counts singular values of ΔW above this (default: %(default)s, the paper's)")
    pretrain.add_argument("--smooth", type=int, default=1, metavar="N",
                          help="Fig. 4: average each seed's loss over its last N logged points (default: 1, none)")
    pretrain.add_argument("--where", type=_filter, action="append", default=[], metavar="KEY=VALUE",
                          help="keep runs whose config has this dotted key's value, e.g. scale.name=mini")
    sweep = sub.add_parser("pretrain-lr", help="C4 learning-rate sweep: lr_sweep.md (perplexity per lr)")
    sweep.add_argument("--runs", type=Path, default=Path("results/lr_sweep"), help="sweep root (default: %(default)s)")
    sweep.add_argument("--out", type=Path, default=Path("reports/pretrain"), help="output folder (default: %(default)s)")
    finetune = sub.add_parser("finetune", help="fine-tuning: table1.md, table4.md, table6.md, table7.md (those the runs support)")
    finetune.add_argument("--runs", type=Path, default=Path("results/runs"), help="results root (default: %(default)s)")
    finetune.add_argument("--out", type=Path, default=Path("reports/finetune"),
                          help="output folder (default: %(default)s)")
    finetune.add_argument("--where", type=_filter, action="append", default=[], metavar="KEY=VALUE",
                          help="keep runs whose config has this dotted key's value, e.g. scale.name=mini")
    ft_sweep = sub.add_parser("finetune-lr", help="fine-tuning learning-rate sweep: lr_sweep.md")
    ft_sweep.add_argument("--runs", type=Path, default=Path("results/ft_lr_sweep"),
                          help="sweep root (default: %(default)s)")
    ft_sweep.add_argument("--out", type=Path, default=Path("reports/finetune"),
                          help="output folder (default: %(default)s)")
    regime = sub.add_parser("regime", help="is each mini experiment in the paper's regime: regime.md")
    regime.add_argument("--runs", type=Path, default=Path("results/runs"), help="results root (default: %(default)s)")
    regime.add_argument("--out", type=Path, default=Path("reports/regime"), help="output folder (default: %(default)s)")
    calibrate = sub.add_parser("calibrate-uuid", help="UUID calibration (FFT and LoRA only): calibration_uuid.md")
    calibrate.add_argument("--runs", type=Path, default=Path("results/calibrate_uuid"),
                           help="calibration root (default: %(default)s)")
    calibrate.add_argument("--out", type=Path, default=Path("reports/calibration"),
                           help="output folder (default: %(default)s)")
    sweep_pairs = sub.add_parser("uuid-pairs", help="UUID accuracy and the MoRA - LoRA gap vs the number of pairs: "
                                 "pairs_sweep.{md,png,pdf}")
    sweep_pairs.add_argument("--runs", type=Path, nargs="+", default=[Path("results/runs"), Path("results/pairs_sweep")],
                             help="results roots, read together (default: %(default)s)")
    sweep_pairs.add_argument("--out", type=Path, default=Path("reports/uuid"), help="output folder (default: %(default)s)")
    c4_tokens = sub.add_parser("c4-tokens", help="C4 perplexity and the MoRA - LoRA gap vs training tokens per "
                               "parameter: c4_tokens_sweep.{md,png,pdf}")
    c4_tokens.add_argument("--runs", type=Path, nargs="+", default=[Path("results/runs"), Path("results/c4_tokens_sweep")],
                           help="results roots, read together (default: %(default)s)")
    c4_tokens.add_argument("--out", type=Path, default=Path("reports/pretrain"), help="output folder (default: %(default)s)")
    diagnosis = sub.add_parser("c4-diagnosis", help="why LoRA ends below FFT in mini C4 pretraining: c4_diagnosis.md")
    diagnosis.add_argument("--runs", type=Path, default=Path("results/c4_diagnosis"),
                           help="diagnosis root (default: %(default)s)")
    diagnosis.add_argument("--out", type=Path, default=Path("reports/c4_diagnosis"),
                           help="output folder (default: %(default)s)")
    c4_cal = sub.add_parser("c4-calibration", help="the C4 calibration rule on the FFT and LoRA runs: c4_calibration.md")
    c4_cal.add_argument("--runs", type=Path, default=Path("results/runs"), help="results root (default: %(default)s)")
    c4_cal.add_argument("--out", type=Path, default=Path("reports/calibration_c4"),
                        help="output folder (default: %(default)s)")
    ft_cal = sub.add_parser("finetune-calibration",
                            help="the fine-tuning calibration rule on the FFT and LoRA runs: finetune_calibration.md")
    ft_cal.add_argument("--runs", type=Path, default=Path("results/runs"), help="results root (default: %(default)s)")
    ft_cal.add_argument("--out", type=Path, default=Path("reports/calibration_finetune"),
                        help="output folder (default: %(default)s)")
    best = sub.add_parser("best-lr", help="print the learning rate Table 2's (uuid), Table 3's (c4) or Table 1's "
                          "rule chooses for each arm given (for the Makefile)")
    best.add_argument("--runs", type=Path, default=Path("results/runs"), help="results root (default: %(default)s)")
    best.add_argument("--task", choices=("uuid", "c4", "tulu", "metamath", "biomed"), default="uuid",
                      help="whose rule: Table 2's, Table 3's, or Table 1's on that task at mini (default: %(default)s)")
    best.add_argument("--method", required=True,
                      help="method name, e.g. lora, or several, comma-separated (one rate per line, in this order)")
    best.add_argument("--rank", type=int, default=None,
                      help="paper rank of the adapters (full fine-tuning has none and ignores it)")
    best.add_argument("--where", type=_filter, action="append", default=[], metavar="KEY=VALUE",
                      help="keep runs whose config has this dotted key's value, e.g. task.n_pairs=40")
    figures = sub.add_parser("figures", help="the README's figures: docs/figures/<name>.png (make figures)")
    figures.add_argument("--runs", type=Path, default=Path("tests/fixtures/measured"),
                         help="results root (default: %(default)s, the runs behind the README)")
    figures.add_argument("--out", type=Path, default=Path("docs/figures"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.report == "pretrain" and args.smooth < 1:
        parser.error(f"--smooth must be at least 1, got {args.smooth}")
    return args


def _report_results(written: list[Path], skipped: list[str], n_runs: int, start: float) -> int:
    """Print what was written and skipped; 0 if something was written, else 1."""
    for reason in skipped:
        print(f"skipped {reason}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    print(f"{n_runs} runs in {time.perf_counter() - start:.1f} s")
    return 0 if written else 1


def _no_runs_folder(runs: Path) -> bool:
    if runs.is_dir():
        return False
    print(f"error: no runs: {runs} is not a folder; run experiments/run.py first", file=sys.stderr)
    return True


def uuid_report(args: argparse.Namespace) -> int:
    """Load the runs, write the report, print what was written; 1 if there is nothing to report."""
    start = time.perf_counter()
    if _no_runs_folder(args.runs):
        return 1
    try:
        runs = load_runs(args.runs, task="uuid", scale=args.scale, **dict(args.where))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not runs:
        print(f"error: no UUID run folders found under {args.runs} (scale={args.scale or 'any'}, "
              f"filters={dict(args.where) or 'none'}); run experiments/run.py first", file=sys.stderr)
        return 1
    return _report_results(*write_uuid_report(runs, args.out), len(runs), start)


def pretrain_report(args: argparse.Namespace) -> int:
    """Load the C4 runs, write Fig. 4, Table 3 and Fig. 5, print what was written; 1 if nothing."""
    start = time.perf_counter()
    if _no_runs_folder(args.runs):
        return 1
    try:
        runs = load_pretrain_runs(args.runs, **dict(args.where))
        if not runs:
            print(f"error: no C4 run folders (task.name=c4) found under {args.runs} "
                  f"(filters={dict(args.where) or 'none'}); run experiments/run.py experiment=pretrain_c4 first",
                  file=sys.stderr)
            return 1
        group_pretrain_runs(runs)  # refuses mixed learning rates before anything is drawn
        written, skipped = write_pretrain_report(runs, args.out, args.threshold, args.smooth)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return _report_results(written, skipped, len(runs), start)


def _sweep_report(args: argparse.Namespace, render: Callable[[], tuple[str, int]]) -> int:
    """Write the sweep table ``render()`` returns (with the number of runs it read) to
    ``<out>/lr_sweep.md`` and print it; 1 if there is nothing to report."""
    start = time.perf_counter()
    if _no_runs_folder(args.runs):
        return 1
    try:
        text, n_runs = render()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lr_sweep.md").write_text(text)
    print(text)
    return _report_results([args.out / "lr_sweep.md"], [], n_runs, start)


def pretrain_lr_report(args: argparse.Namespace) -> int:
    """Write the C4 learning-rate sweep table; 1 if there is nothing to report."""
    return _sweep_report(args, lambda: (lr_sweep_markdown(args.runs), len(find_runs(args.runs, **{"task.name": "c4"}))))


def finetune_report(args: argparse.Namespace) -> int:
    """Load the fine-tuning runs, write the tables they support; 1 if nothing was written."""
    start = time.perf_counter()
    if _no_runs_folder(args.runs):
        return 1
    try:
        runs = load_finetune_runs(args.runs, **dict(args.where))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not runs:
        print(f"error: no fine-tuning run folders (task tulu, metamath, biomed, finance) under {args.runs} "
              f"(filters={dict(args.where) or 'none'}); run experiments/run.py experiment=finetune_r8 first",
              file=sys.stderr)
        return 1
    return _report_results(*write_finetune_report(runs, args.out), len(runs), start)


def finetune_lr_report(args: argparse.Namespace) -> int:
    """Write the fine-tuning learning-rate sweep table; 1 if there is nothing to report."""
    def render() -> tuple[str, int]:
        runs = load_finetune_runs(args.runs)
        return finetune_lr_markdown(runs), len(runs)

    return _sweep_report(args, render)


def regime_report(args: argparse.Namespace) -> int:
    """Write the regime tables (presets and models; measured rows from the runs); 1 if no runs folder."""
    start = time.perf_counter()
    if _no_runs_folder(args.runs):
        return 1
    print(f"wrote {write_regime_report(args.runs, args.out)} in {time.perf_counter() - start:.1f} s")
    return 0


def _one_file_report(args: argparse.Namespace, write: Callable[[], Path]) -> int:
    """Run ``write()`` (it writes one report file and returns its path), print the report; 1 if there are no runs."""
    start = time.perf_counter()
    if _no_runs_folder(args.runs):
        return 1
    try:
        path = write()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path.read_text())
    print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return 0


def calibrate_uuid_report(args: argparse.Namespace) -> int:
    """Apply the UUID calibration rule to the runs, write and print the report; 1 if there are no runs."""
    return _one_file_report(args, lambda: write_calibration_report(args.runs, args.out))


def uuid_pairs_report(args: argparse.Namespace) -> int:
    """Write the pairs sweep (table and figure) from every root given; 1 if there are no runs."""
    return _multi_root_report(args, write_sweep_report, "uuid")


def c4_tokens_report(args: argparse.Namespace) -> int:
    """Write the C4 tokens-per-parameter sweep (table and figure) from every root given; 1 if there are no runs."""
    return _multi_root_report(args, write_c4_tokens_report, "c4")


def _multi_root_report(args: argparse.Namespace, write: Callable[[list[Path], Path], list[Path]], task: str) -> int:
    start = time.perf_counter()
    roots = [root for root in args.runs if root.is_dir()]
    if not roots:
        print(f"error: no runs: none of {', '.join(map(str, args.runs))} is a folder", file=sys.stderr)
        return 1
    try:
        written = write(roots, args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(written[0].read_text())
    return _report_results(written, [], sum(len(find_runs(r, **{"task.name": task})) for r in roots), start)


def c4_diagnosis_report(args: argparse.Namespace) -> int:
    """Write the C4 diagnosis table (epochs counted on the preset's training split); 1 if there are no runs."""
    return _one_file_report(args, lambda: write_diagnosis_report(args.runs, args.out, preset_train_tokens()))


def c4_calibration_report(args: argparse.Namespace) -> int:
    """Apply the C4 calibration rule to the seed-0 FFT and LoRA runs of the current preset; 1 if there are none."""
    return _one_file_report(args, lambda: write_c4_calibration_report(args.runs, args.out))


def finetune_calibration_report(args: argparse.Namespace) -> int:
    """Apply the fine-tuning calibration rule to the seed-0 FFT and LoRA runs of the current presets; 1 if none."""
    return _one_file_report(args, lambda: write_finetune_calibration_report(args.runs, args.out))


def best_lr_report(args: argparse.Namespace) -> int:
    """Print the chosen learning rate of each arm, one line per ``--method`` in its order: UUID by
    :data:`analysis.runs.SELECTION_RULE`, C4 by :data:`analysis.pretrain_figures.PRETRAIN_SELECTION_RULE`, fine-tuning
    by :data:`analysis.finetune_tables.FINETUNE_SELECTION_RULE`; 1 if an arm has none or several. ``--rank`` is the
    adapters' rank: a method without an adapter (full fine-tuning) has none. The runs are read once for all arms."""
    if _no_runs_folder(args.runs):
        return 1
    methods = args.method.split(",")
    try:
        arms = [(m, args.rank if get_method(m).layer_kind is not None else None) for m in methods]
        where = dict(args.where)
        chosen: dict[tuple[str, int | None], list[float]] = defaultdict(list)
        if args.task == "uuid":
            for s in select_learning_rates(load_runs(args.runs, task="uuid", **where)):
                if s.chosen:
                    chosen[s.key.method, s.key.rank].append(s.chosen.lr)
        elif args.task != "c4":
            chosen.update(finetune_best_lrs(args.runs, args.task, where))
        else:
            runs = load_pretrain_runs(args.runs, **where)
            for key in {r.key for r in runs if (r.run.method, r.run.rank) in arms}:
                group = [r for r in runs if r.key == key]
                chosen[group[0].run.method, group[0].run.rank].append(choose_pretrain_lr(group))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rates = []
    for method, rank in arms:
        if len(chosen[method, rank]) != 1:
            print(f"error: {len(chosen[method, rank])} arms of method={method} rank={rank} with an eligible learning "
                  f"rate under {args.runs} (filters={dict(args.where) or 'none'}); expected exactly one", file=sys.stderr)
            return 1
        rates.append(f"{chosen[method, rank][0]:g}")
    print("\n".join(rates))
    return 0


def figures_report(args: argparse.Namespace) -> int:
    """Draw the README's figures from the runs; 1 if none could be drawn."""
    start = time.perf_counter()
    if _no_runs_folder(args.runs):
        return 1
    return _report_results(*write_readme_figures(args.runs, args.out), start)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return {"uuid": uuid_report, "pretrain": pretrain_report, "pretrain-lr": pretrain_lr_report,
            "finetune": finetune_report, "finetune-lr": finetune_lr_report, "regime": regime_report,
            "calibrate-uuid": calibrate_uuid_report, "figures": figures_report, "uuid-pairs": uuid_pairs_report,
            "c4-tokens": c4_tokens_report,
            "c4-diagnosis": c4_diagnosis_report, "c4-calibration": c4_calibration_report,
            "finetune-calibration": finetune_calibration_report,
            "best-lr": best_lr_report}[args.report](args)


if __name__ == "__main__":
    raise SystemExit(main())
