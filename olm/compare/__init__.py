"""``olm compare``: runs -> studies and variants -> statistics over seeds -> ladder fits -> report.

Reads run dirs only (no torch): ``runs`` loads them, ``study`` groups them and decides (``stats``, ``ladder``;
``trials`` reads an Optuna sweep's study), ``plots`` draws and ``report`` writes report.md, report.html, CSV and
JSON. docs/experiments.md explains the output.
"""

from olm.compare.report import write_report
from olm.compare.runs import Run, find_run_dirs, load_runs
from olm.compare.study import Options, Study, Variant, analyse

__all__ = ["Options", "Run", "Study", "Variant", "analyse", "find_run_dirs", "load_runs", "write_report"]
