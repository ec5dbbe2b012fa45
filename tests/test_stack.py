"""Stacked training (issue 17): a stack of mixed norms and seeds equals each member's single run.

Tolerances (float32, CPU): after 20 SGD steps (momentum, weight decay, clipping, per-member lr) a
member's logits are within 1e-5 relative (``max|a - b| / max|b|``) of its own model trained alone
with torch's SGD and ``clip_grad_norm_``; through ``train_stacked`` vs ``run`` (2 epochs) every
final test error is equal and the losses agree within 1e-5 relative. A rerun is bitwise identical;
finished members drop out of a rerun.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from normzoo.config import CONF_DIR
from normzoo.models import build_model
from normzoo.run import runner
from normzoo.run.stack import group_key, train_stacked
from normzoo.run.stack_model import build_stack, stack_refusal, unstack_into
from normzoo.run.stack_sgd import StackedSGD

LOGIT_TOLERANCE = 1e-5
LOSS_TOLERANCE = 1e-5
TINY = [
    "data.train_subset=240",
    "data.test_subset=100",
    "data.batch_size=8",
    "train.epochs=2",
    "train.progress=none",
    "train.grad_clip=1.0",
    "diagnostics.enabled=false",
    "device=cpu",
    "model=cnn",
    "model.channels=[8,8]",
    "model.strides=[1,2]",
]
NORMS = {"batchnorm": [], "groupnorm": ["norm.num_groups=4"], "layernorm": [], "none": []}
TIMING = {
    "wall_time_s",
    "train_time_s",
    "eval_time_s",
    "steps_per_s",
    "started_at",
    "finished_at",
    "stack",
}
CNN = {"name": "cnn", "channels": [8, 8], "strides": [1, 2], "kernel_size": 3,
       "head": "flatten", "hidden": []}  # fmt: skip
MLP = {"name": "mlp", "widths": [16, 16]}


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def group(root: Path) -> tuple[list, list[Path], list[list[str]]]:
    """4 norms x 2 seeds (seed 1 at twice the learning rate) of one (model, batch size)."""
    cfgs, dirs, overrides = [], [], []
    for norm, options in NORMS.items():
        for seed in (0, 1):
            ov = [
                *TINY,
                f"norm={norm}",
                *options,
                f"seed={seed}",
                f"optim.base_lr={0.05 + 0.05 * seed}",
            ]
            cfgs.append(compose("config", overrides=ov))
            dirs.append(root / f"{norm}_{seed}")
            overrides.append(ov)
    return cfgs, dirs, overrides


def record(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def stripped(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in TIMING | {"command"}}


@pytest.mark.parametrize("model_cfg", [CNN, MLP], ids=["cnn", "mlp"])
def test_stack_logits_equal_single_models_after_steps(model_cfg) -> None:
    norms = [("batchnorm", {}), ("batchrenorm", {}), ("groupnorm", {"num_groups": 4}),
             ("layernorm", {}), ("none", {})]  # fmt: skip
    if model_cfg is CNN:
        norms.append(("instancenorm", {}))
    cfg = OmegaConf.create(model_cfg)
    optim = OmegaConf.create({"momentum": 0.9, "nesterov": False, "weight_decay": 5e-4})
    singles, members = [], []
    for seed, (norm, options) in enumerate(norms):
        for copy in (singles, members):
            torch.manual_seed(seed)
            copy.append(build_model(cfg, norm, options, (1, 8, 8), 10))
    stacked, slots = build_stack(members, [(n, o, 1) for n, o in norms])
    k, lrs = len(norms), torch.linspace(0.02, 0.2, len(norms))
    opts = [torch.optim.SGD(m.parameters(), lr=float(lr), momentum=0.9, weight_decay=5e-4)
            for m, lr in zip(singles, lrs, strict=True)]  # fmt: skip
    stack_opt = StackedSGD(slots, optim, k)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        xs = torch.randn(8, k, 1, 8, 8, generator=gen)
        ys = torch.randint(0, 10, (8, k), generator=gen)
        for j, (m, opt) in enumerate(zip(singles, opts, strict=True)):
            opt.zero_grad()
            F.cross_entropy(m(xs[:, j]), ys[:, j]).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
        for p in stack_opt.params:
            p.grad = None
        out = stacked(xs.reshape(8, k, 8, 8)).view(8, k, 10)
        F.cross_entropy(out.permute(0, 2, 1), ys, reduction="none").mean(0).sum().backward()
        stack_opt.clip_(1.0)
        stack_opt.step(lrs)
    unstack_into(members, slots)
    probe = torch.randn(16, 1, 8, 8, generator=gen)
    for (norm, _), single, member in zip(norms, singles, members, strict=True):
        for mode in ("train", "eval"):  # eval: BatchNorm's running statistics too
            single.train(mode == "train"), member.train(mode == "train")
            err = relative(member(probe), single(probe))
            assert err <= LOGIT_TOLERANCE, f"{norm} ({mode}): {err:.2e}"


def test_train_stacked_equals_single_runs(tmp_path, hydra_conf) -> None:
    cfgs, dirs, overrides = group(tmp_path / "stack")
    results = train_stacked(cfgs, dirs, task_overrides=overrides)
    assert [r["status"] for r in results] == ["ok"] * len(cfgs)
    for cfg, d, ov in zip(cfgs, dirs, overrides, strict=True):
        runner.run(cfg, tmp_path / "single" / d.name, task_overrides=ov)
        stacked, single = record(d), record(tmp_path / "single" / d.name)
        assert stacked["trained"] == "stacked" and stacked["stack"]["members"] == len(cfgs)
        assert stacked["test_error"] == single["test_error"], d.name
        for key in ("train_loss", "test_loss"):
            assert abs(stacked[key] - single[key]) <= LOSS_TOLERANCE * abs(single[key]), key
        assert stacked["steps"] == single["steps"] and stacked["lr"] == single["lr"]
        assert stacked["rerun_command"] == single["rerun_command"]


def test_rerun_is_bitwise_identical_and_finished_members_drop_out(tmp_path, hydra_conf) -> None:
    cfgs, dirs, overrides = group(tmp_path / "a")
    train_stacked(cfgs, dirs, task_overrides=overrides)
    cfgs_b, dirs_b, _ = group(tmp_path / "b")
    train_stacked(cfgs_b, dirs_b, task_overrides=overrides)
    for a, b in zip(dirs, dirs_b, strict=True):
        assert stripped(record(a)) == stripped(record(b)), a.name
        assert (a / "predictions.npz").read_bytes() == (b / "predictions.npz").read_bytes()
        wa, wb = (torch.load(d / "model.pt", weights_only=False)["state_dict"] for d in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), a.name
    kept = {d: (d / "metrics.json").read_bytes() for d in dirs[1:]}
    (dirs[0] / "metrics.json").unlink()  # a member killed before its record
    results = train_stacked(cfgs, dirs, task_overrides=overrides)
    assert [r.get("skipped", False) for r in results] == [False] + [True] * (len(dirs) - 1)
    assert all((d / "metrics.json").read_bytes() == raw for d, raw in kept.items())
    again, before = record(dirs[0]), record(dirs_b[0])
    assert again["stack"]["members"] == 1 and again["test_error"] == before["test_error"]
    assert abs(again["train_loss"] - before["train_loss"]) <= LOSS_TOLERANCE * before["train_loss"]


def test_unstackable_runs_train_alone_and_groups_must_match(tmp_path, hydra_conf) -> None:
    assert stack_refusal("cnn", "weightnorm") is not None
    assert stack_refusal("resnet", "batchnorm") is not None
    assert stack_refusal("cnn", "bn", "adamw") is not None
    assert stack_refusal("mlp", "ln") is None
    wn = compose("config", overrides=[*TINY, "norm=weightnorm"])
    bn = compose("config", overrides=[*TINY, "norm=batchnorm"])
    results = train_stacked([wn, bn], [tmp_path / "wn", tmp_path / "bn"])
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert (
        "trained" not in record(tmp_path / "wn") and record(tmp_path / "bn")["trained"] == "stacked"
    )
    other = compose("config", overrides=[*TINY, "norm=batchnorm", "data.batch_size=16"])
    assert group_key(bn) != group_key(other)
    with pytest.raises(ValueError, match="differ outside norm, seed"):
        train_stacked([bn, other], [tmp_path / "x", tmp_path / "y"])


def test_gpu_check_exits_0_with_a_message_without_cuda(tmp_path) -> None:
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: scripts/gpu_check.sh would run the real check")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "gpu")}
    done = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    assert not (tmp_path / "gpu").exists()  # nothing measured, nothing written
