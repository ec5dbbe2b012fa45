"""``normzoo-eval <sweep or run dir> [--precise-samples N] [--out file.csv]``: re-evaluate kept models.

Every ``model.pt`` under the dir (an ok run keeps one, ``train.keep_model``) is rebuilt from the
config stored in it, its test error re-measured exactly as the run measured its own ``test_error``
(eval mode, :func:`normzoo.run.loop.evaluate`) and the mismatch diagnostics re-run
(:func:`normzoo.diagnostics.run_diagnostics`, e.g. PreciseBN with another sample count), without
retraining. One row per model: the run dir, the recorded and the re-measured test error, the
diagnostics' errors; printed, and written as CSV with ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from normzoo.data import DataBundle, load_data
from normzoo.diagnostics import run_diagnostics
from normzoo.models import build_model
from normzoo.registry import get_norm
from normzoo.run.checkpoint import MODEL_FILE, load_model_file
from normzoo.run.device import configure_torch, resolve_device
from normzoo.run.loop import batch_stats_in_eval, evaluate
from normzoo.run.record import read_record

__all__ = ["kept_models", "load_kept_model", "main", "reevaluate"]

#: the columns of a row, in order
COLUMNS = (
    "run_dir", "norm", "model", "data", "batch_size", "seed", "recorded_test_error", "test_error",
    "test_error_ema", "test_error_batch_stats", "test_error_precise", "precise_samples",
)  # fmt: skip


def kept_models(root: str | Path) -> list[Path]:
    """The run dirs under ``root`` (itself included) that hold a kept ``model.pt``, sorted."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob(MODEL_FILE))


def load_kept_model(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, Any, DataBundle]:
    """(the trained model in eval mode, the run's config, its data) rebuilt from ``model.pt``."""
    saved = load_model_file(Path(run_dir) / MODEL_FILE)
    cfg, build = OmegaConf.create(saved["config"]), saved["build"]
    torch_device = resolve_device(device)
    configure_torch(cfg, torch_device)  # the run's threads: the same float reductions
    data = load_data(cfg.data, torch_device)
    model = build_model(
        cfg.model, build["norm"], build["layer_options"], build["input_shape"], build["num_classes"]
    )
    model.load_state_dict(saved["state_dict"])
    return model.to(torch_device).eval(), cfg, data


def reevaluate(run_dir: str | Path, precise_samples: int | None = None) -> dict[str, Any]:
    """One row of :data:`COLUMNS` for the kept model in ``run_dir``."""
    model, cfg, data = load_kept_model(run_dir)
    batch_size = int(cfg.data.batch_size)
    spec = get_norm(str(cfg.norm.name))
    _, test_error = evaluate(
        model, data.test_x, data.test_y, int(cfg.data.eval_batch_size), batch_size,
        batch_stats=batch_stats_in_eval(model, spec),
    )  # fmt: skip
    diag = run_diagnostics(
        model,
        data,
        batch_size=batch_size,
        precise_samples=int(precise_samples or cfg.diagnostics.precise_samples),
        seed=int(cfg.seed),
        eval_batch_size=int(cfg.data.eval_batch_size),
    )
    record = read_record(Path(run_dir)) or {}
    row = {"run_dir": str(run_dir), "norm": spec.name, "model": str(cfg.model.name),
           "data": str(cfg.data.name), "batch_size": batch_size, "seed": int(cfg.seed),
           "recorded_test_error": record.get("test_error"), "test_error": test_error}  # fmt: skip
    row.update({key: diag.get(key) for key in COLUMNS if key not in row})
    return row


def main(argv: list[str] | None = None) -> int:
    """The ``normzoo-eval`` command; exit status 0, or 1 when no kept model was found."""
    parser = argparse.ArgumentParser(prog="normzoo-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="a sweep dir or one run dir")
    parser.add_argument("--precise-samples", type=int, default=None,
                        help="PreciseBN sample count (default: the run's)")  # fmt: skip
    parser.add_argument("--out", default=None, help="write the rows to this CSV file")
    args = parser.parse_args(argv)
    dirs = kept_models(args.dir)
    if not dirs:
        print(f"normzoo-eval: no {MODEL_FILE} under {args.dir}", file=sys.stderr)
        return 1
    rows = [reevaluate(d, args.precise_samples) for d in dirs]
    writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as f:
            out = csv.DictWriter(f, fieldnames=COLUMNS)
            out.writeheader()
            out.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
