"""Evaluation: opening runs, per-condition bits/dim, classification, OOD scores, samples, codes.

``open_run(RUN)`` loads a run's verified checkpoint; ``evaluate(model, store, EvalOptions())``
computes every figure of ``tzk eval``; ``write_results`` records them in the run directory.
See ``docs/commands.md``.
"""

from tzkcli.evaluation.evaluate import EvalOptions, evaluate
from tzkcli.evaluation.report import results_path, write_results
from tzkcli.evaluation.runs import OpenRun, open_run, read_run_record

__all__ = ["EvalOptions", "OpenRun", "evaluate", "open_run", "read_run_record", "results_path",
           "write_results"]
