"""Golden files: the frozen sweep in ``tests/golden/sweep/`` -> the same frame, report and figures.

The sweep is a real ``normzoo-train -m`` run (``tests/golden/make_sweep.py``: 6 layers x 3 batch
sizes x 3 seeds on a digits subset, with one missing, one corrupt, one never-started job and nine
invalid ones). These tests pin what ``load_sweep`` and ``build_report`` make of it, so that moving
the analysis code cannot change a number, a sentence, a CSV cell or a pixel unnoticed.
``NORMZOO_UPDATE_GOLDEN=1`` rewrites the snapshots in ``tests/golden/report/`` instead of comparing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import matplotlib
import matplotlib.image
import pandas as pd
import pytest

from normzoo.report import build_report
from normzoo.results import load_sweep

GOLDEN = Path(__file__).resolve().parent / "golden"
SWEEP = GOLDEN / "sweep"
SNAPSHOTS = GOLDEN / "report"
UPDATE = os.environ.get("NORMZOO_UPDATE_GOLDEN") == "1"
COMMAND = "normzoo-report tests/golden/sweep"
#: columns that depend on the machine or the checkout, not on what the loader does with the data
VOLATILE = ("run_dir", "hostname", "cpu", "started_at", "finished_at", "wall_time_s", "train_time_s",
            "eval_time_s", "steps_per_s", "diagnostics_seconds")  # fmt: skip
CSVS = ("runs.csv", "summary.csv", "degradation.csv", "mismatch.csv", "layer_gaps.csv",
        "problems.csv")  # fmt: skip
FIGURES = ("fig_degradation.png", "fig_mismatch.png", "fig_gaps.png", "fig_batch_dependence.png")


def _masked(text: str, out: Path) -> str:
    """Paths of this checkout and of the tmp dir, and the report's build line, as placeholders."""
    text = text.replace(str(SWEEP), "<SWEEP>").replace(str(out), "<OUT>")
    return re.sub(r"^- report built with: .*$", "- report built with: <MASKED>", text, flags=re.M)


def _check(name: str, actual: str) -> None:
    path = SNAPSHOTS / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    assert path.is_file(), f"no snapshot {path}: run with NORMZOO_UPDATE_GOLDEN=1"
    expected = path.read_text(encoding="utf-8")
    if actual != expected:  # the first differing line, not a wall of text
        pairs = zip(expected.splitlines(), actual.splitlines(), strict=False)
        first = next(((i, e, a) for i, (e, a) in enumerate(pairs, 1) if e != a), None)
        pytest.fail(f"{name} differs from its golden file (line, expected, actual): {first}")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("golden_report")
    build_report(SWEEP, out, command=COMMAND)
    return out


def test_the_sweep_fixture_covers_every_status() -> None:
    counts = load_sweep(SWEEP)["status"].value_counts().to_dict()
    assert counts == {"ok": 42, "invalid": 9, "missing": 1, "corrupt": 1, "not_started": 1}


def test_load_sweep_frame_is_unchanged() -> None:
    df = load_sweep(SWEEP)
    df = df.drop(columns=[c for c in VOLATILE if c in df])
    dtypes = {c: str(t) for c, t in sorted(df.dtypes.items())}
    df["superseded_by"] = df["superseded_by"].astype(str).str.replace(str(SWEEP), "<SWEEP>")
    _check("frame.csv", df[sorted(df.columns)].to_csv(index=False, lineterminator="\n"))
    _check("frame_dtypes.json", json.dumps(dtypes, indent=1) + "\n")


def test_report_md_is_unchanged(report_dir: Path) -> None:
    _check("report.md", _masked((report_dir / "report.md").read_text(encoding="utf-8"), report_dir))


@pytest.mark.parametrize("name", CSVS)
def test_report_csv_is_unchanged(report_dir: Path, name: str) -> None:
    _check(name, _masked((report_dir / name).read_text(encoding="utf-8"), report_dir))


def test_report_figures_are_unchanged(report_dir: Path) -> None:
    """Pixels (not PNG bytes, which carry metadata), for the matplotlib version that drew them."""
    pixels = {
        name: hashlib.sha256(matplotlib.image.imread(report_dir / name).tobytes()).hexdigest()
        for name in FIGURES
    }
    record = {"matplotlib": matplotlib.__version__, "sha256_of_pixels": pixels}
    path = SNAPSHOTS / "figures.json"
    if UPDATE:
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return
    expected = json.loads(path.read_text(encoding="utf-8"))
    if expected["matplotlib"] != matplotlib.__version__:  # other text rendering, other pixels
        pytest.skip(f"figures drawn with matplotlib {expected['matplotlib']}, this is "
                    f"{matplotlib.__version__}: rerun with NORMZOO_UPDATE_GOLDEN=1 on the old code")  # fmt: skip
    assert pixels == expected["sha256_of_pixels"]


def test_no_snapshot_is_orphaned() -> None:
    """Every file in tests/golden/report/ is one a test above writes (none silently unchecked)."""
    names = {"frame.csv", "frame_dtypes.json", "report.md", "figures.json", *CSVS}
    assert {p.name for p in SNAPSHOTS.iterdir()} == names
    assert pd.read_csv(SNAPSHOTS / "frame.csv").shape[0] == 54
