"""Normalisation over the batch: BatchNorm (Ioffe & Szegedy 2015) and Batch Renorm (Ioffe 2017).

Both reduce an input of shape (N, C, *S) over N and the spatial dims S, one (mean, variance) per
channel, and keep running (moving-average) statistics for inference, with PyTorch's conventions: the
biased variance normalises, ``running_var`` stores the unbiased one, ``momentum=None`` is a cumulative
average.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normzoo.norms._base import (
    _RENORM_DIAGNOSTICS,
    RunningStatsMixin,
    _is_small,
    _normalise_with_running_stats,
    _NormBase,
    refuse_running_update_under_transform,
)

# (_batch_stats and the torch.func twin are imported here by tests: re-exported by name)
from normzoo.norms._batch_function import _batch_norm_apply, _values_per_channel
from normzoo.norms._batch_function import _batch_stats as _batch_stats
from normzoo.norms._batch_function import (
    _BatchNormFunctionForTransforms as _BatchNormFunctionForTransforms,
)
from normzoo.norms._ghost import check_ghost_batch_size, ghost_batch_norm
from normzoo.norms._small import SmallBatchNorm
from normzoo.registry import register_norm

__all__ = ["RENORM_SCHEDULES", "BatchNorm", "BatchRenorm", "set_progress"]


def _check_batch(x: Tensor) -> int:
    """m for ``x``; torch's error (same type and wording) when a channel holds a single value."""
    m = _values_per_channel(x)
    if m == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )
    return m


@register_norm(
    "batchnorm",
    display="BatchNorm",
    aliases=("bn",),
    paper="Ioffe & Szegedy 2015, Batch Normalization: Accelerating Deep Network Training by "
    "Reducing Internal Covariate Shift, arXiv:1502.03167",
    uses_batch_stats=True,
    native="native_batchnorm",
    description="BatchNorm: statistics over N and the spatial dims, one per channel",
)
class BatchNorm(RunningStatsMixin, _NormBase):
    r"""Batch Normalization (Ioffe & Szegedy 2015, arXiv:1502.03167), from scratch.

    For an input x of shape (N, C, *S) (any rank >= 2, channels at dim 1)::

        y = (x - mu) / sqrt(sigma2 + eps) * gamma + beta

    with one (mu, sigma2) per channel, taken over N and all spatial dims (m = N * prod(S) values).

    * **Training:** mu, sigma2 are the batch mean and the *biased* batch variance (divide by m).
      With ``track_running_stats`` the buffers are updated as
      ``running = (1 - momentum) * running + momentum * batch``, where ``running_var`` receives the
      *unbiased* variance (m / (m - 1) * sigma2); ``momentum=None`` uses the factor
      ``1 / num_batches_tracked`` (cumulative average). m == 1 raises torch's ``ValueError``.
    * **Eval:** ``running_mean``/``running_var`` when tracked, else the batch statistics.
    * **Ghost batches** (Hoffer et al. 2017, arXiv:1705.08741): with ``ghost_batch_size`` G (None:
      the whole batch) the batch statistics are those of consecutive chunks of G samples (the last
      chunk smaller when G does not divide N; one holding a single value per channel raises), as if
      the layer ran on each chunk; the running statistics get one update per forward, towards the
      chunks' mean and mean unbiased variance weighted by their sizes (``normzoo.norms._ghost``).

    State: ``weight`` (gamma, ones), ``bias`` (beta, zeros) when ``affine``; ``running_mean`` (zeros),
    ``running_var`` (ones), ``num_batches_tracked`` (long 0) when ``track_running_stats``. Names match
    ``torch.nn.BatchNorm2d``, so state dicts move between the two. A channels_last input gives a
    channels_last output.

    Multi-device: torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` does not convert this class
    (it looks for torch's own) and leaves it per-device silently; use
    :func:`normzoo.convert_sync_batchnorm` (:class:`~normzoo.norms.sync_batch.SyncBatchNorm`).

    Example::

        >>> bn = BatchNorm(64)
        >>> y = bn(torch.randn(8, 64, 16, 16))
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        ghost_batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        self._init_running_stats(momentum, track_running_stats, device, dtype)
        self.ghost_batch_size = check_ghost_batch_size(ghost_batch_size)

    def _in_ghost_batches(self, x: Tensor) -> bool:
        """Whether batch statistics are taken over ghost batches (a ghost size >= N is plain BN)."""
        return self.ghost_batch_size is not None and x.shape[0] > self.ghost_batch_size

    def _empty_batch(self, x: Tensor) -> Tensor:
        """torch's answer to an empty batch: an empty output, the statistics left alone (the step
        is still counted)."""
        if self.training and self.track_running_stats:
            self._averaging_weight()
        return x.clone()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.numel() == 0:
            return self._empty_batch(x)
        if self.training or not self.track_running_stats:
            m = _check_batch(x)
            if self._in_ghost_batches(x):  # (normzoo.norms._ghost: one running update per step)
                assert self.ghost_batch_size is not None
                y, mean, var_unbiased, _ = ghost_batch_norm(
                    x, self.weight, self.bias, self.eps, self.ghost_batch_size
                )
                if self.training and self.track_running_stats:
                    self._update_running_stats(mean, var_unbiased)
                return y
            if _is_small(x):  # (updates the running statistics itself)
                layer = self if self.training and self.track_running_stats else None
                return SmallBatchNorm.apply(x, self.weight, self.bias, self.eps, layer, None)
            y, mean, var = _batch_norm_apply(x, self.weight, self.bias, self.eps)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var * (m / (m - 1)))
            return y
        assert self.running_mean is not None and self.running_var is not None
        return _normalise_with_running_stats(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
        )

    def extra_repr(self) -> str:
        ghost = (
            "" if self.ghost_batch_size is None else f", ghost_batch_size={self.ghost_batch_size}"
        )
        return (
            f"{super().extra_repr()}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}{ghost}"
        )


#: Batch Renorm's limit schedule: plain BatchNorm (rmax = 1, dmax = 0) until ``relax_start``, then a
#: linear relaxation reaching ``rmax`` at ``rmax_relaxed`` and ``dmax`` at ``dmax_relaxed``. The paper
#: (Ioffe 2017, Sec. 4.1) relaxes from step 5k to rmax = 3 at 40k and dmax = 5 at 25k steps; as
#: fractions of a 100k-step run these are the progress defaults 0.05, 0.4 and 0.25.
RENORM_SCHEDULES = ("auto", "steps", "none")


def _relaxed_fraction(now: float, start: float, end: float) -> float:
    """How far along [start, end] ``now`` is, clipped to [0, 1] (a jump at ``start`` if end == start)."""
    if end <= start:
        return 1.0 if now >= start else 0.0
    return min(max((now - start) / (end - start), 0.0), 1.0)


@register_norm(
    "batchrenorm",
    display="Batch Renorm",
    aliases=("brn", "renorm"),
    paper="Ioffe 2017, Batch Renormalization: Towards Reducing Minibatch Dependence in "
    "Batch-Normalized Models, arXiv:1702.03275",
    uses_batch_stats=True,
    native=None,
    description="Batch Renorm: BatchNorm corrected by clipped (r, d) towards the moving statistics",
)
class BatchRenorm(BatchNorm):
    r"""Batch Renormalization (Ioffe 2017, arXiv:1702.03275), from scratch.

    Statistics over N and the spatial dims, one (mu_B, sigma_B) per channel, as :class:`BatchNorm`.
    In training, the batch-normalised value is corrected towards the moving statistics (mu, sigma)::

        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
        r = stop_grad(clip(sigma_B / sigma, 1/rmax, rmax))
        d = stop_grad(clip((mu_B - mu) / sigma, -dmax, dmax))

    with sigma_B = sqrt(biased batch variance + eps), sigma = sqrt(running_var + eps), and mu, sigma
    the moving statistics from *before* this step's update. r = 1, d = 0 (rmax = 1, dmax = 0) is
    exactly BatchNorm. The gradient treats r and d as constants: it is BatchNorm's with gamma * r
    as the per-channel scale (one shared hand-written backward).

    * **Training:** as above; then ``running_mean``/``running_var`` are updated as in BatchNorm
      (torch's convention: unbiased variance, ``momentum`` default 0.01 as in the paper,
      ``momentum=None`` a cumulative average). Without ``track_running_stats`` there are no moving
      statistics to correct towards and the layer is plain BatchNorm.
    * **Eval:** y = gamma * (x - mu) / sigma + beta with the moving statistics (as BatchNorm).
    * **Ghost batches** (``ghost_batch_size``, as :class:`BatchNorm`): mu_B, sigma_B, r and d per
      ghost batch (r, d against the same moving statistics); one moving-stats update per forward;
      the diagnostics are over all (ghost batch, channel) pairs, ``last_r``/``last_d`` the ghost
      batches' mean.

    **Limits schedule** (``schedule``). The paper trains with plain BN first and relaxes the limits
    later; here the limits move linearly from (1, 0) to (``rmax``, ``dmax``):

    * ``"auto"`` (default): driven by the training loop's *progress* p in [0, 1] (the fraction of
      the run done), set with :meth:`set_progress` (or the module-level :func:`set_progress`):
      plain BN while p < ``relax_start``, rmax fully relaxed at p = ``rmax_relaxed``, dmax at
      p = ``dmax_relaxed`` (defaults 0.05, 0.4, 0.25: the paper's 5k / 40k / 25k steps as
      fractions of a 100k-step run), so short runs relax the limits too. Until set_progress is
      first called, the limits follow the paper's step schedule (below) on ``num_batches_tracked``
      -- a layer nobody drives still leaves plain BN, it never silently stays BatchNorm.
    * ``"steps"``: the paper's schedule on ``num_batches_tracked``: plain BN for
      ``relax_start_step`` (5000) steps, rmax reached at ``rmax_relaxed_step`` (40000), dmax at
      ``dmax_relaxed_step`` (25000).
    * ``"none"``: fixed limits ``rmax``, ``dmax`` from the first step (as Keras' ``renorm_clipping``).

    State: as BatchNorm (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``; a BatchNorm state dict loads). Not saved: the progress and the
    diagnostics ``clip_fraction_r``, ``clip_fraction_d`` -- 0-dim tensors, the fraction of channels
    whose r resp. d was clipped in the last training forward -- and ``last_r``, ``last_d``, that
    step's (C,) r and d (all detached, no device sync).
    :attr:`current_rmax` and :attr:`current_dmax` are the limits the next training step uses.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        momentum: float | None = 0.01,
        rmax: float = 3.0,
        dmax: float = 5.0,
        schedule: str = "auto",
        relax_start: float = 0.05,
        rmax_relaxed: float = 0.4,
        dmax_relaxed: float = 0.25,
        relax_start_step: int = 5000,
        rmax_relaxed_step: int = 40000,
        dmax_relaxed_step: int = 25000,
        track_running_stats: bool = True,
        ghost_batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            affine=affine,
            momentum=momentum,
            track_running_stats=track_running_stats,
            ghost_batch_size=ghost_batch_size,
            device=device,
            dtype=dtype,
        )
        if not rmax >= 1.0 or not dmax >= 0.0 or math.isinf(rmax) or math.isinf(dmax):
            raise ValueError(f"need finite rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        if schedule not in RENORM_SCHEDULES:
            raise ValueError(f"schedule must be one of {RENORM_SCHEDULES}, got {schedule!r}")
        if (
            not 0.0
            <= relax_start
            <= min(rmax_relaxed, dmax_relaxed)
            <= max(rmax_relaxed, dmax_relaxed)
            <= 1.0
        ):
            raise ValueError(
                "need 0 <= relax_start <= rmax_relaxed, dmax_relaxed <= 1 (fractions of the run), "
                f"got {relax_start}, {rmax_relaxed}, {dmax_relaxed}"
            )
        steps = (relax_start_step, rmax_relaxed_step, dmax_relaxed_step)
        if any(isinstance(s, bool) or not isinstance(s, int) for s in steps) or not (
            0 <= relax_start_step <= min(rmax_relaxed_step, dmax_relaxed_step)
        ):
            raise ValueError(
                "need integer steps 0 <= relax_start_step <= rmax_relaxed_step, dmax_relaxed_step, "
                f"got {steps}"
            )
        self.rmax, self.dmax, self.schedule = float(rmax), float(dmax), schedule
        self.relax_start, self.rmax_relaxed, self.dmax_relaxed = (
            float(relax_start),
            float(rmax_relaxed),
            float(dmax_relaxed),
        )
        self.relax_start_step, self.rmax_relaxed_step, self.dmax_relaxed_step = steps
        self.progress: float | None = None  # set by set_progress
        self._progress_driven = False  # a bool, so torch.compile guards on it, not on the float
        factory = {"device": device, "dtype": dtype}

        def constant(*values: float) -> Tensor:
            return torch.tensor(values, **factory)  # type: ignore[arg-type]

        # [rmax, dmax] limits: plain BN, fully relaxed, as last set by set_progress; the values are
        # (re)written from Python floats by _fill_constants, also after every .to()/.double(), so a
        # float64 layer clips at exactly rmax/dmax, not at their float32 roundings
        self.register_buffer("_limits_bn", constant(1.0, 0.0), persistent=False)
        self.register_buffer("_limits_full", constant(1.0, 0.0), persistent=False)
        self.register_buffer("_limits_progress", constant(1.0, 0.0), persistent=False)
        # the step schedule's relaxation lengths (at least 1 step: a jump if start == end)
        self._spans = tuple(
            float(max(s - relax_start_step, 1)) for s in (rmax_relaxed_step, dmax_relaxed_step)
        )
        self.register_buffer("_relax_steps", constant(1.0, 1.0), persistent=False)
        self._fill_constants()
        self.register_buffer("clip_fraction_r", constant(0.0).squeeze(0), persistent=False)
        self.register_buffer("clip_fraction_d", constant(0.0).squeeze(0), persistent=False)
        self.register_buffer("last_r", constant(*[1.0] * num_features), persistent=False)
        self.register_buffer("last_d", constant(*[0.0] * num_features), persistent=False)

    def set_progress(self, progress: float) -> None:
        """Drive the limits by the run's progress p in [0, 1] (the fraction of training done).

        Used by the ``"auto"`` schedule from the first call on; recorded but without effect for
        ``"steps"`` and ``"none"``.
        """
        p = _check_progress(progress)
        self.progress = p
        self._progress_driven = True
        limits = self._progress_limits(p)
        if limits != self._limits_written:  # (constant outside the relaxation: no op per step)
            self._limits_progress.copy_(self._exact(*limits))
            self._limits_written = limits

    def _progress_limits(self, p: float) -> tuple[float, float]:
        """(rmax, dmax) at progress p, in Python floats (double precision)."""
        fr = _relaxed_fraction(p, self.relax_start, self.rmax_relaxed)
        fd = _relaxed_fraction(p, self.relax_start, self.dmax_relaxed)
        return 1.0 + (self.rmax - 1.0) * fr, self.dmax * fd

    @staticmethod
    def _exact(*values: float) -> Tensor:
        """Values as a float64 CPU tensor: ``copy_`` into a buffer then rounds once, to its dtype."""
        return torch.tensor(values, dtype=torch.float64)

    def _fill_constants(self) -> None:
        """Write the limit buffers from the Python-float settings, in the buffers' own dtype."""
        with torch.no_grad():
            self._limits_bn.copy_(self._exact(1.0, 0.0))
            self._limits_full.copy_(self._exact(self.rmax, self.dmax))
            self._relax_steps.copy_(self._exact(*self._spans))
            limits = (1.0, 0.0) if self.progress is None else self._progress_limits(self.progress)
            self._limits_progress.copy_(self._exact(*limits))
            self._limits_written = limits  # what _limits_progress holds, as Python floats

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # a dtype change (.double(), .half(), .to(dtype)) converts the buffers' values; refill them
        # from the Python floats so each holds the setting rounded once, to its new dtype
        super()._apply(fn, recurse)
        if "_relax_steps" in self._buffers:  # not during __init__
            self._fill_constants()
        return self

    def _limits_now(self) -> Tensor:
        """The (2,) tensor [rmax, dmax] for the next training step (tensor ops only: no sync)."""
        if self.schedule == "none":
            return self._limits_full
        if self.schedule == "auto" and self._progress_driven:
            return self._limits_progress
        assert self.num_batches_tracked is not None, "the step schedule needs track_running_stats"
        done = (self.num_batches_tracked - self.relax_start_step) / self._relax_steps
        return torch.lerp(self._limits_bn, self._limits_full, done.clamp_(0.0, 1.0))

    @property
    def current_rmax(self) -> float:
        """The r limit the next training step uses (1 = plain BatchNorm)."""
        if not self.track_running_stats:
            return 1.0
        return float(self._limits_now()[0])

    @property
    def current_dmax(self) -> float:
        """The d limit the next training step uses (0 = plain BatchNorm)."""
        if not self.track_running_stats:
            return 0.0
        return float(self._limits_now()[1])

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(x)  # eval with the moving statistics, or plain BatchNorm
        refuse_running_update_under_transform(self)  # (before the diagnostics are stored)
        self._check_input(x)
        if x.numel() == 0:
            return self._empty_batch(x)
        m = _check_batch(x)
        if self._in_ghost_batches(x):  # r, d per ghost batch; one moving-stats update per step
            assert self.running_mean is not None and self.running_var is not None
            assert self.ghost_batch_size is not None
            moving = (self.running_mean, self.running_var, self._limits_now())
            y, mean, var_unbiased, extra = ghost_batch_norm(
                x, self.weight, self.bias, self.eps, self.ghost_batch_size, moving
            )
            self._buffers.update(zip(_RENORM_DIAGNOSTICS, extra, strict=True))
            self._update_moving_stats(mean, var_unbiased)
            return y
        if _is_small(x):  # (sets the diagnostics and updates the moving statistics itself)
            limits = self._limits_now()
            return SmallBatchNorm.apply(x, self.weight, self.bias, self.eps, self, limits)
        y, mean, var, *extra = _batch_norm_apply(
            x,
            self.weight,
            self.bias,
            self.eps,
            self.running_mean,
            self.running_var,
            self._limits_now(),
        )
        # (stored in the buffer dict: see _update_moving_stats)
        self._buffers.update(zip(_RENORM_DIAGNOSTICS, extra, strict=True))
        self._update_moving_stats(mean, var * (m / (m - 1)))
        return y

    def _update_moving_stats(self, mean: Tensor, var_unbiased: Tensor) -> None:
        """BatchNorm's running-statistics update; out of place under ``torch.compile``.

        The compiled backward (torch 2.14, AOTAutograd) may recompute r and d from the moving
        statistics and the step count *as they are after the step* if they were updated in place,
        which gives wrong gradients; replacing the buffers by new tensors keeps the old values.
        The new tensors (and the diagnostics, in :meth:`forward`) are stored into ``_buffers``
        directly: dynamo replays each store after the graph, and a dict store costs ~2-3 us less
        than ``Module.__setattr__`` (measured: 7 stores, ~13 us per step).
        """
        if not torch.compiler.is_compiling():
            self._update_running_stats(mean, var_unbiased)  # the shared in-place rule
            return
        buffers = self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        count = buffers["num_batches_tracked"]
        assert count is not None and running_mean is not None and running_var is not None
        count = count + 1
        factor = (
            count.to(running_mean.dtype).reciprocal() if self.momentum is None else self.momentum
        )
        buffers["num_batches_tracked"] = count
        buffers["running_mean"] = torch.lerp(running_mean, mean.detach(), factor)
        buffers["running_var"] = torch.lerp(running_var, var_unbiased.detach(), factor)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, schedule={self.schedule!r}"


def _check_progress(progress: float) -> float:
    if isinstance(progress, bool) or not isinstance(progress, (int, float)):
        raise TypeError(f"progress must be a number in [0, 1], got {type(progress).__name__}")
    if not 0.0 <= progress <= 1.0:  # also rejects nan
        raise ValueError(
            f"progress must be in [0, 1] (the fraction of training done), got {progress}"
        )
    return float(progress)


def set_progress(model: nn.Module, progress: float) -> None:
    """Tell every submodule of ``model`` (itself included) that has a ``set_progress`` method how far
    training is: ``progress`` in [0, 1], the fraction of the run done. The training loop calls this
    (e.g. every step with step / total_steps) so that scheduled layers (Batch Renorm's limits)
    follow the run whatever its length.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_progress expects an nn.Module, got {type(model).__name__}")
    progress = _check_progress(progress)
    for module in model.modules():
        method = getattr(module, "set_progress", None)
        if callable(method):
            method(progress)
