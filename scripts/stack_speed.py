"""Stacked vs unstacked training of one (model, batch size) group of the digits study (issue 17).

Every stackable norm of the study x its 3 seeds, once as single runs (``normzoo.run.run``) and once
as one stack (``normzoo.run.stack.train_stacked``), interleaved ``--repeats`` times in this one
process; writes the medians, their ratio and how far each member's test error moved, as markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from normzoo.config import CONF_DIR
from normzoo.provenance import cpu_model, now_utc
from normzoo.run.runner import run
from normzoo.run.stack import train_stacked

NORMS = ("batchnorm", "batchrenorm", "layernorm", "groupnorm", "instancenorm", "none")


def configs(model: str, batch: int, device: str, steps: int | None = None) -> list:
    base = ["experiment=digits", f"model={model}", f"data.batch_size={batch}", f"device={device}",
            "train.progress=none", "resume=false"]  # fmt: skip
    if steps is not None:  # a shorter budget than the study's (the GPU check's time limit)
        base.append(f"train.steps={steps}")
    norms = [n for n in NORMS if not (model == "mlp" and n == "instancenorm")]
    return [
        compose("config", overrides=[*base, f"norm={n}", f"seed={s}"])
        for n in norms
        for s in (0, 1, 2)
    ]


def errors(root: Path) -> dict[str, float]:
    return {
        d.name: json.loads((d / "metrics.json").read_text())["test_error"] for d in root.iterdir()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="cnn")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps a run (the study's)")
    p.add_argument("--out", default="reports/bench/stacked.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfgs = configs(args.model, args.batch_size, args.device, args.steps)
    names = [f"{c.norm.name}_{c.seed}" for c in cfgs]
    times: dict[str, list[float]] = {"single": [], "stacked": []}
    tmp = Path(tempfile.mkdtemp(prefix="normzoo-stack-speed-"))
    for r in range(args.repeats):
        for way in ("single", "stacked") if r % 2 == 0 else ("stacked", "single"):
            dirs = [tmp / f"{way}{r}" / n for n in names]
            t0 = time.perf_counter()
            if way == "single":
                for cfg, d in zip(cfgs, dirs, strict=True):
                    run(cfg, d)
            else:
                train_stacked(cfgs, dirs)
            times[way].append(time.perf_counter() - t0)
    single, stacked = errors(tmp / "single0"), errors(tmp / "stacked0")
    moved = {n: (single[n], stacked[n]) for n in names if single[n] != stacked[n]}
    med = {w: statistics.median(v) for w, v in times.items()}
    lines = [
        f"# Stacked vs unstacked training: {args.model}, batch {args.batch_size}, digits study",
        "",
        f"{len(cfgs)} runs ({', '.join(sorted({c.norm.name for c in cfgs}))} x seeds 0-2; the "
        f"study's config, diagnostics on), {args.device}, 1 thread, {cpu_model()}, {now_utc()}; "
        f"`python scripts/stack_speed.py --model {args.model} --batch-size {args.batch_size} "
        f"--device {args.device} --repeats {args.repeats}"
        + (f" --steps {args.steps}" if args.steps is not None else "")
        + f"`; {cfgs[0].train.steps} steps a run; interleaved, medians of "
        f"{args.repeats}.",
        "",
        "| way | wall s (each repeat) | median s |",
        "|---|---|---|",
        *(f"| {w} | {', '.join(f'{t:.1f}' for t in v)} | {med[w]:.1f} |" for w, v in times.items()),
        "",
        f"**ratio unstacked / stacked: {med['single'] / med['stacked']:.2f}x** (end to end of "
        f"the group's runs in this process: data, init, training, evaluations, diagnostics, records).",
        "",
        "Final test errors that moved (single -> stacked): "
        + (", ".join(f"{n} {a:.4f} -> {b:.4f}" for n, (a, b) in moved.items()) or "none")
        + f" (of {len(names)}).",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
