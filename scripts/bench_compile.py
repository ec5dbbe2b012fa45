"""When ``torch.compile`` pays for a training run: the measured rule behind ``train.compile=auto``.

A run's training time is ``T(N) = C + N * t`` for N steps: ``C`` the one-off cost (for a
compiled run its graphs' compilation, cold: a fresh inductor cache; warm: the cache of an earlier
run) and ``t`` the time a step. Each (model, mode) is timed at two budgets through the real CLI
(``normzoo-train``, one process a run, ``train_time_s`` of its record). Eager and warm runs give
``t`` and ``C`` as the line through their two times; a cold run's step is the warm one's (the same
compiled code) and its compile time varies by seconds between runs, so ``C_cold`` is the mean of
``T_cold(N) - N * t_warm``. Compiling pays after ``N* = (C_compiled - C_eager) / (t_eager -
t_warm)`` steps. Writes markdown to ``--out``; from the checkout's root::

    python -m scripts.bench_compile
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from normzoo.files import write_text_atomic
from normzoo.markdown import md_table
from normzoo.provenance import cpu_model, git_dirty, git_revision, now_utc
from normzoo.run.budget import AUTO_COMPILE_STEPS

#: the default study's runs (its SGD batch, ghost batch 8), short budgets that time the step
BASE = ["experiment=digits", "norm=batchnorm", "norm.ghost_batch_size=8", "seed=0",
        "diagnostics.enabled=false", "train.keep_model=false", "train.keep_predictions=false",
        "train.progress=none", "device=cpu"]  # fmt: skip
BUDGETS = (100, 2100)


def timed_run(overrides: list[str], cache_dir: str) -> float:
    """``train_time_s`` of one ``normzoo-train`` run (a fresh process) with these overrides."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
        cmd = [sys.executable, "-m", "normzoo.train", *BASE, *overrides, f"hydra.run.dir={out}"]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        return float(json.loads((Path(out) / "metrics.json").read_text())["train_time_s"])


def fit_line(small: float, large: float) -> tuple[float, float]:
    """(C, t) of T(N) = C + N t through the two budgets' times."""
    t = (large - small) / (BUDGETS[1] - BUDGETS[0])
    return small - BUDGETS[0] * t, t


def measure(model: str) -> dict[str, float]:
    """Eager and compiled (cold and warm cache) C and t of ``model``."""
    row: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as warm:
        timed_run([f"model={model}", "train.compile=true", "train.steps=10"], warm)  # fill it
        for mode, compiled, cache in (("eager", "false", None), ("warm", "true", warm),
                                      ("cold", "true", None)):  # fmt: skip
            times = []
            for steps in BUDGETS:
                with tempfile.TemporaryDirectory() as cold:
                    over = [f"model={model}", f"train.compile={compiled}", f"train.steps={steps}"]
                    times.append(timed_run(over, cache or cold))
            row.update({f"T_{mode}_{n}": t for n, t in zip(BUDGETS, times, strict=True)})
            if mode == "cold":  # the warm step, the compile time's mean over the two runs
                row["t_cold"] = row["t_warm"]
                row["C_cold"] = (
                    sum(t - n * row["t_warm"] for n, t in zip(BUDGETS, times, strict=True)) / 2
                )
            else:
                row[f"C_{mode}"], row[f"t_{mode}"] = fit_line(*times)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn16", "mlp"])
    parser.add_argument("--out", type=Path, default=Path("reports/bench/compile_rule.md"))
    args = parser.parse_args(argv)
    rows, cold = [], []
    for model in args.models:
        r = measure(model)
        gain = r["t_eager"] - r["t_warm"]
        be = {m: (r[f"C_{m}"] - r["C_eager"]) / gain if gain > 0 else float("inf")
              for m in ("cold", "warm")}  # fmt: skip
        rows.append([model, f"{r['t_eager'] * 1e3:.2f}", f"{r['t_warm'] * 1e3:.2f}",
                     f"{r['t_eager'] / r['t_warm']:.2f}",
                     f"{r['C_cold'] - r['C_eager']:.1f}", f"{r['C_warm'] - r['C_eager']:.1f}",
                     f"{be['cold']:.0f}", f"{be['warm']:.0f}"])  # fmt: skip
        cold.append(be["cold"])
        print(model, r, be, flush=True)
    dirty = git_dirty()
    text = "\n".join(
        [
            "# When torch.compile pays for a training run (`train.compile=auto`)",
            "",
            f"{now_utc()}, git {git_revision(short=True)}{' (dirty)' if dirty else ''}, "
            f"{cpu_model()}, `python -m scripts.bench_compile`. Each number from two runs of "
            f"`normzoo-train {' '.join(BASE)}` at `train.steps` {BUDGETS[0]} and {BUDGETS[1]}, one "
            "process a run, one torch thread: T(N) = C + N t through the two `train_time_s` "
            "(eager, warm); cold: a fresh inductor cache, its step the warm one's, its compile "
            "time the mean of the two runs' T - N t; warm: the cache an earlier run of the same "
            "model filled. Compile s: C over the eager run's C; break-even: compile s over the "
            "per-step gain.",
            "",
            f"`train.compile=auto` compiles runs of at least `AUTO_COMPILE_STEPS` = "
            f"{AUTO_COMPILE_STEPS} steps (`normzoo/run/budget.py`): the largest cold break-even "
            f"here ({max(cold):.0f}) rounded up, so a run that compiles on a fresh machine is "
            "faster for it; below that the run stays eager (the default study's 600-step runs "
            "lose 20 s of compile to gain about 1 s).",
            "",
            md_table(
                [
                    "model",
                    "eager ms/step",
                    "compiled ms/step",
                    "step speed-up",
                    "compile s (cold)",
                    "compile s (warm)",
                    "break-even steps (cold)",
                    "break-even steps (warm)",
                ],
                rows,
            ),
            "",
        ]
    )
    write_text_atomic(args.out, text)
    print(text)
    if max(cold) > AUTO_COMPILE_STEPS:
        print(f"AUTO_COMPILE_STEPS={AUTO_COMPILE_STEPS} is below a measured break-even", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
