"""One run of a config, without Hydra: ``run(cfg, out_dir, task_overrides=..., multirun=...)``.

Validate the config, load the data onto the device, build the model (a combination that cannot
apply is recorded as ``invalid`` here, before any training), train (:func:`normzoo.run.loop.fit`),
then the mismatch diagnostics (``normzoo.diagnostics``; with ``diagnostics.panel`` also the
inference panel), keep ``predictions.npz`` (``train.keep_predictions``) and ``model.pt``
(``train.keep_model``, for ``normzoo-eval``), and write the record (:mod:`normzoo.run.record`). The run never raises for a failure of its own: it is recorded. A
config error (out of range, unknown norm, ``device=cuda`` without a GPU, a missing data set) is
raised before anything is loaded outside a multirun, and recorded as ``failed`` in one.

Resume. With ``resume=true`` (the default) a run whose dir already holds a ``metrics.json`` with
status ``ok``, ``invalid`` or ``diverged`` *for the same config* (the recorded ``config`` equals
this one up to :data:`normzoo.config.identity.RESULT_NEUTRAL_KEYS`) is skipped before anything is
loaded and its ``metrics.json`` is left untouched: those statuses are deterministic results of the
config. ``failed`` runs, dirs without a ``metrics.json`` (killed) and runs whose config changed are
run again; ``resume=false`` reruns everything. A result of another code revision is run again
(:mod:`normzoo.run.resume`) unless ``resume=keep_any_revision``. The temp files a
kill can leave (``.metrics.json.*.tmp``, ``.checkpoint.pt.*.tmp``) are removed when the run starts.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from normzoo.config.flat import plain
from normzoo.config.identity import comparable_config
from normzoo.config.options import explicit_norm_keys, norm_layer_options
from normzoo.config.validate import validate
from normzoo.data import DataNotFoundError, batches_per_epoch, load_data
from normzoo.diagnostics import run_diagnostics
from normzoo.errors import ConfigError, Diverged, InvalidCombination
from normzoo.inference import inference_panel
from normzoo.models import build_model, check_batch_size, count_parameters
from normzoo.provenance import now_utc
from normzoo.registry import NormSpec, get_norm
from normzoo.run.budget import peak_lr, total_steps
from normzoo.run.checkpoint import CHECKPOINT_FILE, MODEL_FILE, save_model, use_checkpoint
from normzoo.run.device import configure_torch, resolve_device, resolved_device_type
from normzoo.run.loop import FitState, batch_stats_in_eval, fit, predict
from normzoo.run.predictions import PREDICTIONS_FILE, save_predictions
from normzoo.run.record import KEEP_ON_RESUME, METRICS_FILE, base_record, read_record, write_record
from normzoo.run.resume import KEEP_ANY_REVISION, revision_change
from normzoo.sync_bn import sync_batchnorm_for_run

__all__ = ["keep_outputs", "kept_result", "run"]

log = logging.getLogger("normzoo.train")


def _spec_or_none(cfg: DictConfig) -> NormSpec | None:
    try:
        return get_norm(str(cfg.norm.name))
    except Exception:  # an unknown name is reported by validate()
        return None


def _lr_or_none(cfg: DictConfig) -> float | None:
    try:
        return peak_lr(cfg)
    except Exception:
        return None


def run(
    cfg: DictConfig,
    out_dir: str | Path | None = None,
    *,
    task_overrides: list[str] | None = None,
    multirun: bool = False,
) -> dict[str, Any]:
    """One run of ``cfg``; writes ``metrics.json`` into ``out_dir`` (default: the current dir).

    ``task_overrides``: the job's command-line overrides (recorded; a ``norm.<option>`` among them
    wins over a study's ``norm_options``). ``multirun``: the run is one job of a sweep (a config
    error is then recorded as ``failed`` instead of raised; log lines instead of a bar).
    Returns ``{"status", "error", "dir"}``; with ``cfg.resume`` a finished result of the same
    config already in ``out_dir`` is kept and nothing runs (then also ``skipped=True``).
    """
    t_start = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else Path.cwd()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("resume", False):
        kept = kept_result(out, cfg, task_overrides)
        if kept is not None:
            log.info("resume: %s is already %s; kept (resume=false reruns it)", out, kept["status"])
            with contextlib.suppress(OSError):  # left by a kill between the record and its delete
                (out / CHECKPOINT_FILE).unlink()
            return {"status": kept["status"], "error": kept.get("error"), "dir": str(out),
                    "skipped": True}  # fmt: skip
    _remove_temp_files(out)
    spec = _spec_or_none(cfg)
    record = base_record(cfg, spec, _lr_or_none(cfg), task_overrides)
    fit_state = FitState()
    try:
        _train(cfg, out, record, fit_state, task_overrides, multirun)
        record["status"] = "ok"
    except InvalidCombination as exc:
        record.update(status="invalid", error=str(exc))
        log.warning("invalid combination: %s", exc)
    except Diverged as exc:
        record.update(status="diverged", error=str(exc), error_step=exc.step)
        log.warning("diverged: %s", exc)
    except (ConfigError, DataNotFoundError) as exc:
        if not multirun:
            raise
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        log.error("config error: %s", exc)
    except Exception as exc:
        tail = traceback.format_exc().strip().splitlines()[-30:]
        record.update(
            status="failed",
            error=f"{type(exc).__name__}: {exc}",
            error_step=fit_state.steps if fit_state.steps else None,
            traceback="\n".join(tail),
        )
        log.error("run failed: %s\n%s", exc, "\n".join(tail))
    finally:
        _finish(record, fit_state, out, t_start)
    if record["status"] != "ok":
        log.info("status %s -> %s", record["status"], out / METRICS_FILE)
    return {"status": record["status"], "error": record["error"], "dir": str(out)}


def _train(
    cfg: DictConfig,
    out: Path,
    record: dict[str, Any],
    fit_state: FitState,
    task_overrides: list[str] | None,
    multirun: bool,
) -> None:
    """Everything of a run that can fail, in order; fills ``record`` and ``fit_state``."""
    explicit = explicit_norm_keys(task_overrides)
    validate(cfg, explicit=explicit)  # ranges, registry: before any data is loaded
    device = resolve_device(cfg.device)
    spec = get_norm(str(cfg.norm.name))  # the run's one resolution of its norm
    record["device"] = str(device)
    configure_torch(cfg, device)
    torch.manual_seed(int(cfg.seed))

    data = load_data(cfg.data, device)
    batch_size = int(cfg.data.batch_size)
    steps_per_epoch = batches_per_epoch(data, batch_size, int(cfg.data.classes_per_batch))
    if steps_per_epoch < 1:
        raise InvalidCombination(
            f"data.batch_size={cfg.data.batch_size} exceeds the {len(data.train_y)} training "
            f"samples (partial batches are dropped): no training step"
        )
    torch.manual_seed(int(cfg.seed))  # the model's init does not depend on the data loading
    layer_options = norm_layer_options(cfg, explicit)
    record["norm_layer_options"] = layer_options
    model: nn.Module = build_model(
        cfg.model, spec.name, layer_options, data.input_shape, data.num_classes
    ).to(device)
    model = sync_batchnorm_for_run(model, bool(cfg.train.get("sync_batchnorm", False)), device)
    check_batch_size(model, spec.name, data.input_shape, batch_size)
    record["num_params"] = count_parameters(model)
    total = total_steps(cfg, steps_per_epoch)
    log.info(
        "run %s on %s: %s/%s B=%d seed=%d lr=%.4g %d steps (%d per epoch) -> %s",
        spec.name, device, cfg.model.name, data.name, cfg.data.batch_size, cfg.seed,
        record["lr"], total, steps_per_epoch, out,
    )  # fmt: skip

    checkpoint = out / CHECKPOINT_FILE if use_checkpoint(cfg, total) else None
    identity = comparable_config(cfg, device, task_overrides)
    fit(model, data, cfg, device, fit_state, checkpoint, spec=spec, identity=identity,
        multirun=multirun)  # fmt: skip
    last = fit_state.curves[-1]
    for key in ("train_loss", "train_error", "test_loss", "test_error", "val_loss", "val_error"):
        record[key] = last.get(key)
    keep_outputs(model, data, cfg, spec, layer_options, record, out, fit_state.predictions)


def keep_outputs(
    model: nn.Module,
    data: Any,
    cfg: DictConfig,
    spec: NormSpec,
    layer_options: dict[str, Any],
    record: dict[str, Any],
    out: Path,
    last_epoch: dict[str, Tensor] | None = None,
) -> None:
    """What a trained run adds after its last epoch: the diagnostics (and the inference panel)
    into ``record``, ``predictions.npz`` and ``model.pt`` into ``out`` (also a stacked member's).
    ``last_epoch``: the classes the last epoch's evaluation predicted (``test_pred``,
    ``val_pred``), which ``predictions.npz`` keeps instead of predicting them again."""
    batch_size = int(cfg.data.batch_size)
    predictions: dict[str, Any] = {}
    panel = bool(cfg.diagnostics.get("panel", False))
    panel_note = ", inference panel" if panel else ""
    t_diag = time.perf_counter()
    population_cache: dict = {}  # the diagnostics' and the panel's PreciseBN share 4096 samples
    if cfg.diagnostics.enabled:  # its own keys: the run's test_error/test_loss stay the curves'
        log.info("diagnostics: mismatch, PreciseBN (%d samples)%s ...",
                 int(cfg.diagnostics.precise_samples), panel_note)  # fmt: skip
        record.update(
            run_diagnostics(
                model,
                data,
                batch_size=batch_size,
                precise_samples=int(cfg.diagnostics.precise_samples),
                seed=int(cfg.seed),
                eval_batch_size=int(cfg.data.eval_batch_size),
                predictions=predictions if spec.uses_batch_stats else None,
                with_variance_shift=bool(cfg.diagnostics.get("variance_shift", False)),
                population_cache=population_cache,
            )
        )
    if panel:
        if not cfg.diagnostics.enabled:
            log.info("diagnostics: inference panel ...")
        record["inference_panel"] = inference_panel(
            model, data, batch_size=batch_size, seed=int(cfg.seed),
            eval_batch_size=int(cfg.data.eval_batch_size),
            population_cache=population_cache)  # fmt: skip
    if cfg.diagnostics.enabled or panel:
        log.info("diagnostics done in %.1fs", time.perf_counter() - t_diag)
    if cfg.train.get("keep_predictions", True):
        _keep_predictions(model, data, cfg, spec, predictions, out, last_epoch or {})
        record["predictions"] = PREDICTIONS_FILE
    if cfg.train.get("keep_model", True):
        build = {"norm": spec.name, "layer_options": layer_options,
                 "input_shape": list(data.input_shape), "num_classes": data.num_classes}  # fmt: skip
        save_model(out / MODEL_FILE, model, plain(cfg), build)
        record["model_file"] = MODEL_FILE


def _keep_predictions(
    model, data, cfg, spec, predictions: dict[str, Any], out: Path, last_epoch: dict[str, Tensor]
) -> None:
    """``predictions.npz``: eval-mode test (and validation) classes as the run's own
    ``test_error`` counts them (the last epoch's, else predicted again in the same batches),
    plus the diagnostics' batch / PreciseBN ones (``predictions``)."""
    batch_stats = batch_stats_in_eval(model, spec)
    sizes = (int(cfg.data.eval_batch_size), int(cfg.data.batch_size))

    def classes(key: str, x: Tensor) -> Tensor:
        if key in last_epoch:
            return last_epoch[key]
        return predict(model, x, *sizes, batch_stats=batch_stats)

    predictions["test_y"] = data.test_y
    predictions["test_pred"] = classes("test_pred", data.test_x)
    if data.val_y.numel() > 0:
        predictions["val_y"] = data.val_y
        predictions["val_pred"] = classes("val_pred", data.val_x)
    save_predictions(out, predictions)


def _finish(record: dict[str, Any], fit_state: FitState, out: Path, t_start: float) -> None:
    """Timings and curves into the record; write it; a finished result needs no checkpoint."""
    record["curves"] = fit_state.curves
    record["steps"] = fit_state.steps
    record["epochs_run"] = len(fit_state.curves)
    batch = record["batch_size"]
    record["samples_seen"] = fit_state.steps * batch if isinstance(batch, int) else None
    record["train_time_s"] = fit_state.train_time_s
    record["eval_time_s"] = fit_state.eval_time_s
    record["steps_per_s"] = (
        fit_state.steps / fit_state.train_time_s if fit_state.train_time_s > 0 else None
    )
    record["wall_time_s"] = time.perf_counter() - t_start
    record["finished_at"] = now_utc()
    if record["status"] is not None:
        write_record(out, record)
    if record["status"] in KEEP_ON_RESUME:  # a finished result: nothing left to continue
        with contextlib.suppress(OSError):
            (out / CHECKPOINT_FILE).unlink()


def kept_result(
    out: Path, cfg: DictConfig, task_overrides: list[str] | None = None
) -> dict[str, Any] | None:
    """The ``metrics.json`` in ``out`` if a rerun keeps it: a status in :data:`KEEP_ON_RESUME`
    recorded for the same config (up to the result-neutral keys)."""
    old = read_record(Path(out) / METRICS_FILE)
    if old is None or old.get("status") not in KEEP_ON_RESUME:
        return None
    try:
        mine = comparable_config(cfg, resolved_device_type(cfg), task_overrides)
        theirs = comparable_config(
            old.get("config") or {}, old.get("device"), old.get("task_overrides")
        )
    except (ValueError, AttributeError):
        return None  # a damaged record: run again
    if theirs != mine:
        log.info("resume: %s holds a result of another config; running again", out)
        return None
    changed = revision_change(old) if cfg.get("resume") != KEEP_ANY_REVISION else None
    if changed:
        log.warning("resume: %s was %s; running again (resume=%s keeps it)", out, changed,
                    KEEP_ANY_REVISION)  # fmt: skip
        return None
    return old


def _remove_temp_files(out: Path) -> None:
    """Temp files of an atomic write killed mid-way (never read; a rerun writes new ones)."""
    for name in (METRICS_FILE, CHECKPOINT_FILE):
        for tmp in out.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
