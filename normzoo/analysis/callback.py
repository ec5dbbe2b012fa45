"""The Hydra callback that builds a multirun's report at its end (``conf/experiment/*.yaml``
name it by its old path, ``normzoo.report.ReportCallback``, which re-exports it)."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from normzoo.analysis.report import build_report

__all__ = ["ReportCallback"]

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    """Hydra callback: at the end of a multirun, build the report of ``hydra.sweep.dir`` into
    ``report.out`` (relative to the directory the command was started in); nothing when
    ``report.out`` is unset. A failing report is logged, not raised: the runs are on disk and
    ``normzoo-report <sweep dir>`` rebuilds it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        out = OmegaConf.select(config, "report.out", default=None)
        if not out:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        cwd = OmegaConf.select(config, "hydra.runtime.cwd", default=None)
        out_path = Path(str(out))
        if not out_path.is_absolute() and cwd:
            out_path = Path(str(cwd)) / out_path
        if not sweep_dir.is_absolute() and cwd:
            sweep_dir = Path(str(cwd)) / sweep_dir
        try:
            path = build_report(
                sweep_dir, out_path, command="ReportCallback after: " + shlex.join(sys.argv)
            )
        except Exception:
            log.exception(
                "report for %s failed; rebuild it with: normzoo-report %s --out %s",
                sweep_dir,
                sweep_dir,
                out_path,
            )
            return
        log.info("report: %s", path)
