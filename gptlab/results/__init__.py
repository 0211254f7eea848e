"""What runs leave behind, read back: every run's ``metrics.json`` (:mod:`~gptlab.results.record`),
the run folders under a sweep or any folder (:mod:`~gptlab.results.folders`), tables of them ranked
best first (:mod:`~gptlab.results.tables`) and plots (:mod:`~gptlab.results.plots`).
``gptlab-compare`` and the sweep summary of ``gptlab-train -m`` are both written from here."""

from gptlab.results.folders import Run, find_runs, load_run
from gptlab.results.plots import plot_curves, plot_vs
from gptlab.results.record import RESULT_FILE, STATUSES, read_result, write_result
from gptlab.results.tables import (check_names, metric_columns, metric_mode, rank_runs, summary_table, table_rows,
                                   to_csv, to_markdown, varying_keys)

__all__ = ["Run", "find_runs", "load_run", "plot_curves", "plot_vs", "RESULT_FILE", "STATUSES", "read_result",
           "write_result", "check_names", "metric_columns", "metric_mode", "rank_runs", "summary_table", "table_rows",
           "to_csv", "to_markdown", "varying_keys"]
