"""The per-sample findings of the generic report (variants, sequence, dropout) on known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from normzoo.analysis.sample_claims import DEPENDENCE_MARGIN, sample_findings
from normzoo.analysis.sample_report import normalisation_axis
from normzoo.run.predictions import save_predictions

N_TEST = 2000


def _run(root: Path, name: str, seed: int, wrong: np.ndarray, **record) -> dict:
    """A run dir with predictions (``wrong`` marks the misclassified samples) and metrics.json."""
    d = root / f"{name}-{seed}"
    d.mkdir(parents=True)
    y = np.arange(N_TEST) % 10
    pred = np.where(wrong, (y + 1) % 10, y)
    save_predictions(d, {"test_y": y, "test_pred": pred, "test_pred_precise": pred})
    (d / "metrics.json").write_text(json.dumps({"inference_panel": record.pop("panel", [])}))
    return {"status": "ok", "seed": seed, "run_dir": str(d), **record}


def _wrong(rate: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(N_TEST) < rate


def _frame(tmp_path: Path) -> pd.DataFrame:
    rows = []
    for seed in range(3):
        base = _wrong(0.05, seed)
        worse = base | _wrong(0.06, 100 + seed)  # +~5.7 points on the same samples
        adabn = [
            {"statistics": "ema_shifted", "test_error": 0.2},
            {"statistics": "adabn_shifted", "test_error": 0.1, "ema_wrong_only": 200,
             "adabn_wrong_only": 0},
        ]  # fmt: skip
        common = {"batch_stats": True, "batch_size": 32, "batch_dependence": 0.2}
        rows.append(_run(tmp_path, "bn4", seed, worse, norm="batchnorm", norm_batch=4.0,
                         panel=adabn, **common))  # fmt: skip
        rows.append(_run(tmp_path, "bn32", seed, base, norm="batchnorm", norm_batch=32.0, **common))
        rows.append(_run(tmp_path, "gn", seed, base, norm="groupnorm", norm_batch=np.nan,
                         batch_stats=False, batch_size=32, batch_dependence=0.0))  # fmt: skip
    return pd.DataFrame(rows)


def _find(tests, family: str, a: str, b: str = "") -> object:
    (t,) = [t for t in tests if t.family == family and t.a.startswith(a) and t.b.startswith(b)]
    return t


def test_a_constant_shift_is_higher_and_identical_runs_are_equivalent(tmp_path: Path) -> None:
    tests = sample_findings(_frame(tmp_path))
    small = _find(tests, "normalisation batch", "BatchNorm (norm. batch 4)")
    assert small.verdict == "higher" and 4 < small.estimate < 7
    same = _find(tests, "vs BatchNorm", "GroupNorm", "BatchNorm (norm. batch 32)")
    assert same.estimate == 0 and same.verdict == "equivalent"
    lower = _find(tests, "vs BatchNorm", "GroupNorm", "BatchNorm (norm. batch 4)")
    assert lower.verdict == "lower"
    precise = _find(tests, "PreciseBN", "BatchNorm (norm. batch 4)")
    assert precise.verdict == "equivalent"  # the same predictions
    assert all(0 <= t.p <= t.p_holm <= 1 for t in tests)  # Holm never lowers a p-value


def test_batch_dependence_is_zero_only_through_the_margin(tmp_path: Path) -> None:
    tests = sample_findings(_frame(tmp_path))
    assert _find(tests, "batch dependence", "GroupNorm").verdict == "below the margin"
    bn = _find(tests, "batch dependence", "BatchNorm (norm. batch 32)")
    assert bn.estimate > DEPENDENCE_MARGIN and bn.verdict == "not shown below the margin"


def test_adabn_is_mcnemar_on_the_panels_discordant_counts(tmp_path: Path) -> None:
    tests = sample_findings(_frame(tmp_path))
    t = _find(tests, "AdaBN", "BatchNorm (norm. batch 4) with AdaBN on the shifted")
    assert t.kind == "mcnemar" and t.verdict == "lower"
    assert abs(t.estimate + 10.0) < 1e-9 and "600 only EMA" in t.n


def test_normalisation_axis_puts_the_ghost_batch_on_the_batch_axis() -> None:
    df = pd.DataFrame(
        {
            "batch_size": [32, 32, 32],
            "norm_batch": [4.0, 32.0, np.nan],
            "variant": ["ghost_batch_size=4", "ghost_batch_size=32, dropout=0.2", ""],
        }
    )
    out = normalisation_axis(df)
    assert out["batch_size"].tolist() == [4.0, 32.0, 32.0]
    assert out["variant"].tolist() == ["", "dropout=0.2", ""]


def test_the_dropout_family_tests_position_rate_and_the_variance_shift(tmp_path: Path) -> None:
    rows = []
    for seed in range(3):
        clean = _wrong(0.05, seed)
        for p in (0.0, 0.5):
            for where in ("before_norm", "after_norm"):
                hurt = p > 0 and where == "before_norm"
                wrong = clean | _wrong(0.08, 200 + seed) if hurt else clean
                shift = 1.0 + (1.0 if hurt else 0.0) + 0.001 * seed
                rows.append(_run(tmp_path, f"bn-{p}-{where}", seed, wrong, norm="batchnorm",
                                 norm_batch=32.0, variance_shift_mean=shift,
                                 **{"model.dropout": p, "model.dropout_position": where}))  # fmt: skip
    tests = sample_findings(pd.DataFrame(rows))
    assert {t.family for t in tests} == {
        "dropout position",
        "dropout rate",
        "PreciseBN",
        "variance shift",
    }
    position = _find(tests, "dropout position", "BatchNorm (norm. batch 32) · dropout 0.5 before")
    assert position.verdict == "higher"
    after = _find(tests, "dropout rate", "BatchNorm (norm. batch 32) · dropout 0.5 after")
    assert after.verdict == "equivalent"  # the same predictions as no dropout
    before = _find(tests, "variance shift", "BatchNorm (norm. batch 32) · dropout 0.5 before")
    assert before.verdict == "higher" and abs(before.estimate - 2.0) < 0.01  # / the p = 0 shift
    after_shift = _find(tests, "variance shift", "BatchNorm (norm. batch 32) · dropout 0.5 after")
    assert after_shift.verdict == "equivalent"  # the same shift as without dropout: ratio 1
