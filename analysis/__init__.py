"""Tables and figures from run folders (see ``experiments/records.py``); nothing here trains.

``analysis.runs`` turns run folders into tidy records, picks each group's learning rate and
aggregates over seeds; ``analysis.uuid_figures`` draws the paper's Fig. 2, Fig. 3 and Table 2 from
them; ``python -m analysis uuid --runs results/runs --out reports/uuid`` writes all three.
"""

from analysis.runs import (SELECTION_RULE, Candidate, Group, GroupKey, Run, Selection, Stat, aggregate_curves,
                           best_groups, common_eval_steps, load_runs, mean_std, run_from_record,
                           select_learning_rates, selection_markdown)
from analysis.uuid_figures import (PAPER_TABLE2, PAPER_TABLE2_STEPS, plot_fig2, plot_fig3, table2_markdown,
                                   write_uuid_report)

__all__ = ["SELECTION_RULE", "Candidate", "Group", "GroupKey", "Run", "Selection", "Stat", "aggregate_curves",
           "best_groups", "common_eval_steps", "load_runs", "mean_std", "run_from_record",
           "select_learning_rates", "selection_markdown", "PAPER_TABLE2", "PAPER_TABLE2_STEPS", "plot_fig2",
           "plot_fig3", "table2_markdown", "write_uuid_report"]
