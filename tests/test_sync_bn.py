"""Synchronised BatchNorm (issue 15, item 3): 2 gloo processes on CPU, each with half of a batch,
equal one process on the whole batch -- outputs, input grads, weight grads (summed over the
processes, as DDP's all-reduce does before averaging), running statistics."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normzoo

C, WORLD = 3, 2


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, C, 4, 5, generator=gen, dtype=torch.float64) * 2 + 3
    return x, torch.randn(x.shape, generator=gen, dtype=torch.float64)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(normzoo.build_norm("bn", C), nn.BatchNorm2d(C)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        model[0].bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return model


def _step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(dy)
    out = {"y": y.detach(), "dx": x.grad}
    out.update({f"grad.{n}": p.grad for n, p in model.named_parameters()})
    out.update({f"buffer.{n}": b.clone() for n, b in model.named_buffers()})
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)  # fmt: skip
    try:
        # (torch's own nn.SyncBatchNorm needs a GPU: torch's BN becomes the from-scratch one)
        model = normzoo.convert_sync_batchnorm(_model(), torch_bn="normzoo")
        assert all(type(m) is normzoo.SyncBatchNorm for m in model)
        x, dy = _batch()
        half = x.shape[0] // WORLD
        part = slice(rank * half, (rank + 1) * half)
        torch.save(_step(model, x[part], dy[part]), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, dy = _batch()
    whole = _step(_model(), x, dy)  # per-device BatchNorm on the concatenated batch
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), whole["y"])
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), whole["dx"])
    for key in whole:
        if key.startswith("grad."):
            torch.testing.assert_close(ranks[0][key] + ranks[1][key], whole[key], msg=key)
        elif key.startswith("buffer."):
            for r in ranks:  # the same global statistics on every process
                torch.testing.assert_close(r[key], whole[key], msg=key)
    # the test can fail: per-device statistics of half the batch differ from the whole batch's
    alone = _step(_model(), x[:4], dy[:4])
    assert not torch.allclose(alone["y"], whole["y"][:4])


def test_convert_keeps_state_and_warns_for_batch_renorm() -> None:
    model = nn.Sequential(normzoo.build_norm("bn", C), normzoo.build_norm("brn", C)).eval()
    with torch.no_grad():
        model[0].running_mean.fill_(0.7)
    with pytest.warns(RuntimeWarning, match="Batch Renorm is not synchronised"):
        converted = normzoo.convert_sync_batchnorm(model)
    assert type(converted[0]).__name__ == "SyncBatchNorm" and not converted[0].training
    assert torch.equal(converted[0].running_mean, torch.full((C,), 0.7))
    assert type(converted[1]).__name__ == "BatchRenorm"
    x = torch.randn(4, C)
    plain = normzoo.build_norm("bn", C)
    plain.load_state_dict(converted[0].state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # without an initialised process group it is BatchNorm, running statistics included
        torch.testing.assert_close(converted[0].train()(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(converted[0].running_mean, plain.running_mean, rtol=0, atol=0)


def test_torchs_batchnorm_becomes_torchs_syncbatchnorm_by_default() -> None:
    model = normzoo.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(C)))
    assert type(model[0]) is nn.SyncBatchNorm


def test_torchs_converter_skips_normzoos_batchnorm() -> None:
    """What the docs warn about: torch's converter leaves normzoo's BatchNorm per-device."""
    model = nn.Sequential(normzoo.build_norm("bn", C))
    assert type(nn.SyncBatchNorm.convert_sync_batchnorm(model)[0]).__name__ == "BatchNorm"


RUN = [
    "norm=bn",
    "model.channels=[4,4]",
    "model.strides=[1,2]",
    "data.train_subset=64",
    "data.test_subset=32",
    "data.batch_size=16",
    "train.steps=3",
    "train.progress=none",
    "train.keep_predictions=false",
    "diagnostics.enabled=false",
    "device=cpu",
]


def _run_worker(rank: int, port: int, out_dir: str) -> None:
    """One torchrun-style process of a ``train.sync_batchnorm=true`` run: the run itself
    initialises the gloo group from the environment."""
    import json
    import logging

    from hydra import compose, initialize_config_dir

    from normzoo.config import CONF_DIR
    from normzoo.norms import sync_batch
    from normzoo.run import run

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    calls = []
    reduce = sync_batch._all_reduce
    sync_batch._all_reduce = lambda t, group: calls.append(1) or reduce(t, group)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("normzoo.sync_bn").addHandler(handler)
    logging.getLogger("normzoo.sync_bn").setLevel(logging.INFO)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*RUN, "train.sync_batchnorm=true"])
    try:
        result = run(cfg, out_dir=Path(out_dir) / f"rank{rank}")
        world = dist.get_world_size() if dist.is_initialized() else 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    info = {"status": result["status"], "error": result["error"], "reduces": len(calls),
            "lines": lines, "world": world}  # fmt: skip
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(info))


def test_a_run_with_sync_batchnorm_on_two_processes_all_reduces(tmp_path: Path) -> None:
    """The config path (issue 15, item 3): ``train.sync_batchnorm=true`` in 2 gloo processes
    converts the run's BatchNorms, whose statistics and gradient sums are then all-reduced."""
    import json

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    mp.spawn(_run_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for info in infos:
        assert info["status"] == "ok", info["error"]
        assert info["world"] == WORLD
        assert (
            "train.sync_batchnorm: 2 BatchNorm layers synchronised over 2 processes"
            in info["lines"]
        )
        assert info["reduces"] > 0
    assert infos[0]["reduces"] == infos[1]["reduces"]  # (a collective: the same calls on both)


def test_sync_batchnorm_is_off_by_default_and_a_no_op_on_one_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra import compose, initialize_config_dir

    from normzoo.config import CONF_DIR
    from normzoo.run import run

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        assert compose("config", overrides=RUN).train.sync_batchnorm is False
        cfg = compose("config", overrides=[*RUN, "train.sync_batchnorm=true"])
    with caplog.at_level("INFO", logger="normzoo.sync_bn"):
        assert run(cfg, out_dir=tmp_path)["status"] == "ok"
    lines = [r.getMessage() for r in caplog.records if r.name == "normzoo.sync_bn"]
    assert lines == ["train.sync_batchnorm: one process; the norms keep per-device statistics"]
    assert not dist.is_initialized()


def test_a_synchronised_layer_refuses_tracing_and_names_the_route(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = normzoo.SyncBatchNorm(C).train()
    monkeypatch.setattr(normzoo.SyncBatchNorm, "_synchronised", lambda self: True)
    with pytest.raises(RuntimeError, match=r"torch\.export.*dynamo=True"):
        torch.jit.trace(layer, torch.randn(4, C, 5))
