"""Tables and figures from run folders (see ``experiments/loop/records.py``); nothing here trains.

``analysis.runs`` turns run folders into tidy records, picks each group's learning rate and
aggregates over seeds; ``analysis.methods`` is the one table of how each method is shown (label,
colour, order, line style: add a method there); ``analysis.plotting`` holds the drawing the figures
share. ``analysis.uuid_figures`` draws the paper's Fig. 2, Fig. 3 and Table 2 from the UUID
runs; ``python -m analysis uuid --runs results/runs --out reports/uuid`` writes all three.
``analysis.pretrain_figures`` draws Fig. 4, Table 3 and Fig. 5 from the C4 pretraining runs;
``python -m analysis pretrain --runs results/runs --out reports/pretrain`` writes them.
``analysis.finetune_tables`` renders Tables 1, 4, 6 and 7 from the fine-tuning runs' lm-eval scores
(``python -m analysis finetune``); ``analysis.paper_settings`` checks the paper presets against the
paper; ``analysis.snapshot`` copies the measured runs into the test fixtures.
"""

from analysis.pretrain_figures import (FIG5_THRESHOLD, PAPER_ORDER, PAPER_TABLE3, PAPER_TABLE3_MODELS, PretrainGroup,
                                       PretrainKey, PretrainRun, SpectrumCounts, fig5_markdown, group_pretrain_runs,
                                       load_pretrain_runs, plot_fig4, plot_fig5, ranking_notes, spectrum_counts,
                                       table3_markdown, write_pretrain_report)
from analysis.runs import (SELECTION_RULE, Candidate, Group, GroupKey, Run, Selection, Stat, aggregate_curves,
                           best_groups, common_eval_steps, load_runs, mean_std, run_from_record,
                           select_learning_rates, selection_markdown)
from analysis.uuid_figures import (PAPER_TABLE2, PAPER_TABLE2_STEPS, plot_fig2, plot_fig3, table2_markdown,
                                   write_uuid_report)

__all__ = ["SELECTION_RULE", "Candidate", "Group", "GroupKey", "Run", "Selection", "Stat", "aggregate_curves",
           "best_groups", "common_eval_steps", "load_runs", "mean_std", "run_from_record",
           "select_learning_rates", "selection_markdown", "PAPER_TABLE2", "PAPER_TABLE2_STEPS", "plot_fig2",
           "plot_fig3", "table2_markdown", "write_uuid_report", "FIG5_THRESHOLD", "PAPER_ORDER", "PAPER_TABLE3",
           "PAPER_TABLE3_MODELS", "PretrainGroup", "PretrainKey", "PretrainRun", "SpectrumCounts", "fig5_markdown",
           "group_pretrain_runs", "load_pretrain_runs", "plot_fig4", "plot_fig5", "ranking_notes", "spectrum_counts",
           "table3_markdown", "write_pretrain_report"]
