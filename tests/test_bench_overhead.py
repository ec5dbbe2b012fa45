"""normzoo-bench --overhead: a training step with each layer against no norm, on a tiny shape."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from normzoo.bench import main
from normzoo.bench.overhead import (
    OVERHEAD_MODELS,
    OverheadConfig,
    conf_dir,
    run_overhead,
    shipped_options,
)
from normzoo.bench.overhead_report import overhead_phrase

_TINY = {"mlp": ({"name": "mlp", "widths": [8, 8]}, (1, 4, 4)),
         "cnn": ({"name": "cnn", "channels": [4, 4], "strides": [1, 2], "kernel_size": 3,
                  "head": "flatten", "hidden": []}, (1, 4, 4))}  # fmt: skip


def test_rows_against_none_on_a_tiny_shape() -> None:
    config = OverheadConfig(models=["mlp", "cnn"], batch_sizes=[4], repeats=3, warmup=1,
                            min_time=0.0, model_specs=_TINY,
                            norms=["batchnorm", "instancenorm", "weightnorm", "layernorm_last"])  # fmt: skip
    rows = run_overhead(config, log=lambda _: None)
    got = {(r["model"], r["layer"]): r for r in rows}
    assert set(got) == {(m, n) for m in ("mlp", "cnn") for n in ("batchnorm", "instancenorm",
                                                                 "weightnorm", "layernorm_last")}  # fmt: skip
    bn = got[("mlp", "batchnorm")]
    assert bn["none_ms"] > 0 and bn["layer_ms"] > 0 and bn["error"] == ""
    assert bn["ratio_q1"] <= bn["ratio"] <= bn["ratio_q3"] and bn["threads"] == 1
    # BatchNorm keeps its input and normalised output for backward: more saved than none
    assert bn["saved_bytes_layer"] > bn["saved_bytes_none"] > 0
    assert bn["bytes_ratio"] == pytest.approx(bn["saved_bytes_layer"] / bn["saved_bytes_none"])
    # an 8-wide BatchNorm adds gamma and beta per layer: 2 layers x 2 x 8 parameters
    assert bn["params"] - bn["params_none"] == 2 * 2 * 8
    assert math.isnan(bn["peak_bytes_layer"])  # CPU: no peak counter
    bad = got[("mlp", "instancenorm")]  # needs spatial dims: a row with the reason
    assert "InvalidCombination" in bad["error"] and math.isnan(bad["ratio"])
    assert got[("cnn", "instancenorm")]["error"] == ""
    assert got[("cnn", "weightnorm")]["kind"] == "weight"
    # the shipped weightnorm.yaml's data_init is the training loop's key, not the layer's
    assert got[("cnn", "weightnorm")]["error"] == "" and got[("cnn", "weightnorm")]["layer_ms"] > 0
    # a last-dim layer: a row on dense features, a refusal (not a crash) on conv feature maps
    assert got[("mlp", "layernorm_last")]["error"] == ""
    assert "InvalidCombination" in got[("cnn", "layernorm_last")]["error"]


def test_cli_writes_the_table(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("normzoo.bench.overhead.OVERHEAD_MODELS", _TINY)
    argv = ["--overhead", "--quick", "--models", "mlp", "--batch-sizes", "2",
            "--norms", "layernorm", "native_layernorm", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    df = pd.read_csv(tmp_path / "overhead.csv", keep_default_na=False, na_values=[""])
    assert list(df.layer) == ["layernorm", "native_layernorm"] and set(df.batch_size) == {2}
    md = (tmp_path / "overhead.md").read_text()
    assert "smoke test, not a measurement" in md and "## mlp on 1x4x4 inputs, batch 2 (cpu)" in md
    assert "| none (no norm) |" in md and "| LayerNorm (torch) |" in md and "peak MiB" not in md
    assert main(["--overhead", "--models", "nosuch", "--out", str(tmp_path)]) == 2


def test_overhead_phrase_states_a_change_only_outside_the_spread() -> None:
    assert overhead_phrase(1.31, 1.25, 1.4) == "1.31x (IQR 1.25–1.40): +31%"
    assert overhead_phrase(1.05, 0.97, 1.1).endswith("within the noise")
    assert overhead_phrase(1.31, 1.25, 1.4, smoke=True) == "1.31x (IQR 1.25–1.40)"


def test_layers_get_their_shipped_options() -> None:
    assert shipped_options("groupnorm")["num_groups"] == 8  # divides the cnn's 16 channels
    assert shipped_options("native_groupnorm")["num_groups"] == 8
    assert "name" not in shipped_options("batchnorm")
    assert shipped_options("weightnorm") == {"dim": 0}  # data_init*: run-level keys
    assert shipped_options("no_such_layer") == {}


def test_models_are_the_shipped_configs() -> None:
    assert conf_dir() is not None, "no shipped conf folder"
    folder = conf_dir() / "model"
    for name, (spec, _) in OVERHEAD_MODELS.items():
        shipped = yaml.safe_load((folder / f"{name}.yaml").read_text())
        shipped.pop("defaults", None)
        assert spec == shipped, name
