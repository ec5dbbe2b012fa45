"""Where a stacked training step's time goes, and how far stacking could take the study (issue 17).

For each model of the default study, the ghost sweep's members (BatchNorm and Batch Renorm at
ghost batches 2, 4, 8, 16, 32 x ``--seeds`` seeds) in ``--stacks`` stacks as the stacked launcher
splits them (contiguous in the sweep's job order: ghost size, then norm, then seed; with 3 seeds
and 2 stacks the study-speed run's stacks of 15), on random batches of the study's shape,
milliseconds per SGD step of all members (forward, cross-entropy, backward, per-member clip, SGD),
one process, one thread, the variants interleaved, medians:

- ``single runs``: each member's own model and step, as ``normzoo.run.loop.fit`` takes it, summed;
- ``stacked``: the stack as ``normzoo.run.stack`` trains it (the registry's layers, one segment per
  (norm, ghost size));
- ``stacked, torch's fused BatchNorm``: the stack with every norm position replaced by one
  ``nn.BatchNorm`` over all its channels. Not the study's computation (no ghost batches, no Batch
  Renorm, torch's fused kernel): a bound on what any eager normalisation could leave;
- ``stacked, no norm`` / ``single runs, no norm``: the same models built with ``norm=none``: the
  convolutions, matmuls, activations, loss and optimizer alone.

With ``--study-speed`` (the CSV of ``normzoo-study-speed --stacked``) it also states the study's
run time (core-s) if the stacked steps ran at each variant's speed, everything else as measured.
From the checkout's root::

    python -m scripts.stack_floor --out reports/bench/stack_floor.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from normzoo.config import CONF_DIR
from normzoo.config.options import explicit_norm_keys, norm_layer_options
from normzoo.models import build_model
from normzoo.provenance import cpu_model, git_revision, now_utc
from normzoo.registry import get_norm
from normzoo.run.loop import make_optimizer
from normzoo.run.stack import stacked_losses, stacked_update
from normzoo.run.stack_model import Slot, StackedNorm, build_stack
from normzoo.run.stack_plan import _split  # the launcher's own split of a bucket
from normzoo.run.stack_sgd import StackedSGD

MODELS = {"cnn": "cnn16", "mlp": "mlp"}
CONFIGS = [(norm, ghost) for ghost in (2, 4, 8, 16, 32) for norm in ("batchnorm", "batchrenorm")]
VARIANTS = ("single runs", "stacked", "stacked, torch's fused BatchNorm", "stacked, no norm",
            "single runs, no norm")  # fmt: skip


def _members(
    model: str, configs: list[tuple[str, int]], seeds: int
) -> tuple[list[nn.Module], list, object]:
    """The members' models (each built after ``manual_seed(seed)``, as a run builds it), their
    stack segments, and one member's config."""
    models, segments, cfg0 = [], [], None
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for norm, ghost in configs:
            over = ["experiment=digits", f"model={MODELS[model]}", f"norm={norm}"]
            over += [f"norm.ghost_batch_size={ghost}"] if ghost else []
            cfg = compose("config", overrides=over)
            options = norm_layer_options(cfg, explicit_norm_keys(over))
            if segments and segments[-1][:2] == (get_norm(norm).name, options):
                segments[-1] = (*segments[-1][:2], segments[-1][2] + seeds)
            else:
                segments.append((get_norm(norm).name, options, seeds))
            for seed in range(seeds):
                torch.manual_seed(seed)
                models.append(build_model(cfg.model, norm, options, (1, 16, 16), 10))
            cfg0 = cfg
    return models, segments, cfg0


def _fused_batchnorm(stacked: nn.Sequential, slots: list[Slot], k: int) -> list[Slot]:
    """Every norm position of ``stacked`` as one torch ``BatchNorm`` over its channels (in place);
    the slots with those layers in place of the registry's."""
    kept = [s for s in slots if not isinstance(getattr(stacked, s.member_name), StackedNorm)]
    for name, module in list(stacked.named_children()):
        if isinstance(module, StackedNorm):
            width = sum(module.channels)
            fused = nn.BatchNorm2d(width) if "conv" in name else nn.BatchNorm1d(width)
            setattr(stacked, name, fused)
            kept.append(Slot(fused, 0, k, name))
    return kept


def _stack_steps(model: str, configs: list[tuple[str, int]], seeds: int, batch: int):
    """One SGD step of one stack of ``configs`` x ``seeds`` in each variant, as callables (on
    fixed random batches); ``norm=none`` members for the no-norm variants."""
    fns: dict[str, Callable[[], None]] = {}
    for norm_none in (False, True):
        plain = [("none", 0)] * len(configs) if norm_none else configs
        models, segments, cfg = _members(model, plain, seeds)
        k = len(models)
        suffix = ", no norm" if norm_none else ""
        x = torch.randn(batch, k, 1, 16, 16)  # (B, K, *sample): member i's batch is x[:, i]
        y = torch.randint(0, 10, (batch, k))
        smoothing, clip = float(cfg.train.label_smoothing), float(cfg.train.grad_clip)
        opts = [make_optimizer(cfg.optim, m, 0.01) for m in models]

        def single(models=models, opts=opts, x=x, y=y, smoothing=smoothing, clip=clip) -> None:
            for i, (m, opt) in enumerate(zip(models, opts, strict=True)):
                loss = F.cross_entropy(m(x[:, i]), y[:, i], label_smoothing=smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(m.parameters()), clip, foreach=True)
                opt.step()

        fns["single runs" + suffix] = single
        variants = [("stacked" + suffix, False)] + ([] if norm_none else [(VARIANTS[2], True)])
        for name, fused in variants:
            stacked, slots = build_stack(models, segments)
            stacked.train()
            if fused:
                slots = _fused_batchnorm(stacked, slots, k)
            opt = StackedSGD(slots, cfg.optim, k)
            xb = x.reshape(batch, k, 16, 16)  # as the stack's training loop lays it out
            alive, lr = torch.ones(k, dtype=torch.bool), torch.full((k,), 0.01)

            def stack(
                stacked=stacked, opt=opt, xb=xb, y=y, alive=alive, lr=lr, sm=smoothing, clip=clip
            ) -> None:
                _, losses = stacked_losses(stacked, xb, y, sm)
                stacked_update(opt, losses, alive, clip, lr)

            fns[name] = stack
    return fns


def _steps(model: str, seeds: int, stacks: int, batch: int) -> dict[str, Callable[[], None]]:
    """One SGD step of every member in each variant: the stacks' callables one after another."""
    parts = [
        _stack_steps(model, configs, seeds, batch)
        for configs in [
            [CONFIGS[i] for i in part] for part in _split(list(range(len(CONFIGS))), stacks)
        ]
    ]

    def chain(name: str) -> Callable[[], None]:
        def f() -> None:
            for part in parts:
                part[name]()

        return f

    return {name: chain(name) for name in VARIANTS}


def median_ms(fns: dict[str, Callable[[], None]], repeats: int, steps: int) -> dict[str, float]:
    """Median milliseconds per call of each callable over ``repeats`` rounds of ``steps`` calls,
    the callables interleaved round by round (after one warm-up round)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rnd in range(repeats + 1):
        for name, f in fns.items():
            since = time.perf_counter()
            for _ in range(steps):
                f()
            if rnd:
                times[name].append((time.perf_counter() - since) / steps)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _bound(study_speed: Path, ratios: dict[str, dict[str, float]]) -> list[str]:
    """The study's run time if its stacked steps ran at each variant's per-member speed."""
    df = pd.read_csv(study_speed)
    lines = ["", f"## The study's run time at each speed (`{study_speed}`)", "",
             "Summed over the study-speed runs (core-s): the stacked training steps of each model "
             "scaled by (variant / stacked) per step; everything outside the training steps "
             "(evaluations, diagnostics, panel, files) as measured there.", "",
             "| stacked steps at | run time unstacked | run time stacked | ratio |",
             "|---|---|---|---|"]  # fmt: skip
    unstacked = float(df["wall_time_s_unstacked"].sum())
    outside = float((df["wall_time_s_stacked"] - df["train_time_s_stacked"]).sum())
    for variant in VARIANTS[1:4]:
        train = sum(float(g["train_time_s_stacked"].sum()) * ratios[m][variant]
                    for m, g in df.groupby("model"))  # fmt: skip
        total = train + outside
        lines.append(f"| {variant} | {unstacked:.0f} | {total:.0f} | {unstacked / total:.2f}x |")
    lines.append(f"| training steps free | {unstacked:.0f} | {outside:.0f} | "
                 f"{unstacked / outside:.2f}x |")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--stacks", type=int, default=2, help="stacks a model's members are in")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="steps a variant in each round")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--study-speed", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("reports/bench/stack_floor.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = now_utc()
    rows, ratios = [], {}
    for model in args.models:
        got = median_ms(
            _steps(model, args.seeds, args.stacks, args.batch), args.repeats, args.steps
        )
        ratios[model] = {v: got[v] / got["stacked"] for v in VARIANTS}
        sizes = [args.seeds * len(c) for c in _split(CONFIGS, args.stacks)]
        rows.append(f"| {model} | {' + '.join(map(str, sizes))} | "
                    + " | ".join(f"{got[v]:.1f}" for v in VARIANTS) + " |")  # fmt: skip
    lines = [
        "# A stacked step and its floor (`python -m scripts.stack_floor`)", "",
        f"{started}, revision {git_revision(short=True) or 'unknown'}, {cpu_model()}, torch "
        f"{torch.__version__}, 1 thread; batch {args.batch}, medians of {args.repeats} rounds of "
        f"{args.steps} steps a variant, interleaved. Milliseconds per step of all members.", "",
        "| model | members (stacks) | " + " | ".join(VARIANTS) + " |",
        "|---|---|" + "---|" * len(VARIANTS),
        *rows,
        "",
        *[f"{m}: a stack trains its members {r['single runs']:.2f}x as fast as single runs; the "
          f"normalisation layers take {1 - r['stacked, no norm']:.0%} of its step (torch's fused "
          f"BatchNorm in their place: {1 - r['stacked, no norm'] / r[VARIANTS[2]]:.0%} of that "
          "step)." for m, r in ratios.items()],
    ]  # fmt: skip
    if args.study_speed is not None:
        lines += _bound(args.study_speed, ratios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
