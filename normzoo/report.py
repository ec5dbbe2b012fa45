"""Old import path of :mod:`normzoo.analysis.report`, kept for users, for ``pyproject.toml``'s
``normzoo-report = "normzoo.report:main"`` and for the configs' ``normzoo.report.ReportCallback``."""

import sys

from normzoo.analysis.callback import ReportCallback
from normzoo.analysis.claims import findings
from normzoo.analysis.report import build_report, default_out_dir, main, write_report
from normzoo.analysis.stats import RULES
from normzoo.analysis.summary import ERROR_COLUMNS, prepare
from normzoo.registry import display_name

__all__ = [
    "ERROR_COLUMNS",
    "RULES",
    "ReportCallback",
    "build_report",
    "default_out_dir",
    "display_name",
    "findings",
    "main",
    "prepare",
    "write_report",
]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
