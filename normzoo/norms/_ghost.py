"""Ghost batches (Hoffer et al. 2017, arXiv:1705.08741): batch statistics over virtual sub-batches.

A layer with batch statistics and ``ghost_batch_size = G`` splits its input (N, C, *S) along N into
consecutive ghost batches of G samples (the last one smaller when G does not divide N) and
normalises each with its own per-channel statistics, exactly as if the layer had been run on each
chunk separately. The running statistics get ONE update per forward (the shared rule of every
ghost-batch layer, :func:`pooled_ghost_stats`)::

    mean_target = sum_k m_k * mean_k / sum_k m_k          (= the whole batch's mean)
    var_target  = sum_k m_k * var_k_unbiased / sum_k m_k  (the ghost batches' unbiased variances)

with m_k = N_k * prod(S) the values per channel of ghost batch k. Why one update of the averaged
statistics and not one EMA step per ghost batch: ``momentum`` keeps its per-optimizer-step meaning,
so the EMA's horizon in steps (and its lag behind the weights) is the same at every ghost size, and
the target is the expectation of the statistics a ghost batch normalises with (the unbiased
variance, as BatchNorm stores). Hoffer et al. fold the ghost batches into the EMA sequentially; with
momentum ``m`` that is close to one update with ``1 - (1 - m)^K``, i.e. a K-times faster EMA.

Ghost BatchNorm / Batch Renorm (:func:`ghost_batch_norm`) is plain BatchNorm per (ghost batch,
channel) pair, by BatchNorm's hand-derived autograd Function (``normzoo.norms._batch_function``)
in one call for the K full ghost batches of G samples: on the (K, G, C, R) view of a contiguous
x (N, C, *S) itself (R = prod(S); statistics over G and R, (K, C) of them; gamma, beta and Batch
Renorm's moving statistics (C,) broadcast), no copy of x, y or the grads. A channels-last input
is first rearranged (a copy) into (G, K * C, *S), channel k * C + c being channel c of ghost
batch k, with the per-channel vectors repeated K times (autograd sums their grads back); a
smaller last ghost batch gets a second call of its own. Measured on CPU
(``reports/bench/ghost_fast_path.md``, ``python -m scripts.bench_ghost``): the view route is
1.2-1.3x faster forward + backward than the rearranged one it replaced at one model's shapes in
the default study, 1.1-1.6x at a stack's; that one was 1.8-5.3x faster for stacked models than the
composed var_mean and autograd on the views before it.
The autograd layers' :func:`batch_moments` take the (K, G, C, *S) view.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normzoo.norms._batch_function import _batch_norm_apply

__all__: list[str] = []


def check_ghost_batch_size(size: int | None) -> int | None:
    """``size`` if it is None or a positive int, else a ValueError."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"ghost_batch_size must be a positive int or None, got {size!r}")
    return size


def ghost_views(x: Tensor, size: int) -> list[Tensor]:
    """``x`` (N, C, *S) as views (K, G, C, *S) of consecutive ghost batches, in order: the full
    ghost batches of ``size`` samples, then (when ``size`` does not divide N) the remainder."""
    n = x.shape[0]
    full = (n // size) * size
    views = []
    if full:  # (x itself when it is all full ghost batches: a slice's backward is a copy)
        views.append((x if full == n else x[:full]).reshape(n // size, size, *x.shape[1:]))
    if n > full:
        views.append(x[full:].unsqueeze(0))
    return views


def ghost_dims(view: Tensor) -> list[int]:
    """The axes of a (K, G, C, *S) view one ghost batch's per-channel statistics reduce over."""
    return [1, *range(3, view.dim())]


def check_ghost_values(view: Tensor, x: Tensor) -> int:
    """Values per channel of each ghost batch in ``view``; torch's error when that is 1."""
    m = view[0].numel() // view.shape[2]
    if m == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{x.size()} with a ghost batch of size {tuple(view.shape[1:])}"
        )
    return m


def pooled_ghost_stats(
    means: list[Tensor], variances: list[Tensor], counts: list[int]
) -> tuple[Tensor, Tensor]:
    """The running-statistics targets of one forward (module docstring): per channel (C,), the
    ghost batches' means and *unbiased* variances averaged with weights m_k. ``means`` and
    ``variances`` (biased) are (K, C) per view, ``counts`` the values per channel m of each view's
    ghost batches."""
    total = sum(v.shape[0] * m for v, m in zip(means, counts, strict=True))
    mean = sum(mu.sum(0) * (m / total) for mu, m in zip(means, counts, strict=True))
    var = sum(
        var.sum(0) * (m / (m - 1) * m / total) for var, m in zip(variances, counts, strict=True)
    )
    assert isinstance(mean, Tensor) and isinstance(var, Tensor)
    return mean, var


def ghost_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    size: int,
    moving: tuple[Tensor, Tensor, Tensor] | None = None,
    *,
    _pairs_only: bool = False,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    r"""BatchNorm (``moving`` None) or Batch Renorm over ghost batches of ``size`` samples.

    Per ghost batch k and channel, with its batch mean mu_k and biased variance s2_k::

        y = gamma * ((x - mu_k) / sqrt(s2_k + eps) * r_k + d_k) + beta

    r_k = 1, d_k = 0 for BatchNorm; for Batch Renorm (``moving`` = (running_mean, running_var,
    [rmax, dmax])) r_k = clip(sqrt(s2_k + eps) / sigma, 1/rmax, rmax) and
    d_k = clip((mu_k - mu) / sigma, -dmax, dmax), stop-gradient, sigma = sqrt(running_var + eps).
    Returns (y, mean_target, var_target, extra): the running-statistics targets of
    :func:`pooled_ghost_stats` and, for Batch Renorm, ``extra`` = (clip_fraction_r,
    clip_fraction_d, r, d) over all (ghost batch, channel) pairs, r and d averaged over the ghost
    batches (BatchNorm: ``extra`` = ()). Half-precision input is computed in float32.

    Computed by the BatchNorm Function (module docstring): one call for the full ghost batches
    (on their (K, G, C, R) view; over (ghost batch, channel) pairs for channels-last input, and
    everywhere with ``_pairs_only``, the route before the view's, kept for its benchmark), one
    for a smaller last one.
    """
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    dtype, last = xf.dtype, _channels_innermost(xf)
    outs, means, variances, counts, extras = [], [], [], [], []
    for view in ghost_views(xf, size):  # the full ghost batches (K, G, C, *S), the remainder
        counts.append(check_ghost_values(view, x))
        k, g, c, *s = view.shape
        grouped = k > 1 and not last and not _pairs_only  # the view itself (no copy), gamma (C,)
        repeats = 1 if grouped else k
        args = [_repeat(weight, repeats, dtype), _repeat(bias, repeats, dtype), eps]
        if moving is None:
            args += [None, None, None]
        else:
            ref_mean, ref_var, limits = moving
            args += [_repeat(ref_mean, repeats, dtype), _repeat(ref_var, repeats, dtype),
                     limits.to(dtype)]  # fmt: skip
        inp = view.reshape(k, g, c, -1) if grouped else _to_pairs(view, last)
        y, mean, var, *extra = _batch_norm_apply(inp, *args, grouped)
        outs.append(y.reshape(k * g, c, *s) if grouped else _from_pairs(y, k, last))
        means.append(mean.detach().view(k, -1))  # (K, C)
        variances.append(var.detach().view(k, -1))
        extras.append(extra)
    y = torch.cat(outs) if len(outs) > 1 else outs[0]
    mean, var = pooled_ghost_stats(means, variances, counts)
    return y.to(x.dtype), mean, var, _pooled_renorm_extra(extras, [m.shape[0] for m in means])


def _repeat(t: Tensor | None, k: int, dtype: torch.dtype) -> Tensor | None:
    """A per-channel (C,) tensor for the (ghost batch, channel) pairs: (K * C,), in ``dtype``."""
    if t is None:
        return None
    t = t.to(dtype)
    return t if k == 1 else t.expand(k, -1).reshape(-1)  # (cheaper than repeat, backward too)


def _channels_innermost(x: Tensor) -> bool:
    """Whether ``x`` (N, C, *S) is laid out channels last (channels_last, channels_last_3d)."""
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _to_pairs(view: Tensor, last: bool) -> Tensor:
    """A (K, G, C, *S) view as (G, K * C, *S), ghost batch k's channel c at channel k * C + c
    (a copy unless K == 1); channels stay innermost in memory if they were (``last``)."""
    k, g, c, *s = view.shape
    if not last:
        return view.transpose(0, 1).reshape(g, k * c, *s)
    return view.movedim(2, -1).movedim(0, -2).reshape(g, *s, k * c).movedim(-1, 1)


def _from_pairs(y: Tensor, k: int, last: bool) -> Tensor:
    """:func:`_to_pairs`' inverse for its output: (G, K * C, *S) -> (K * G, C, *S)."""
    g, kc, *s = y.shape
    c = kc // k
    if not last:
        return y.reshape(g, k, c, *s).transpose(0, 1).reshape(k * g, c, *s)
    y = y.movedim(1, -1).reshape(g, *s, k, c).movedim(-2, 0)
    return y.reshape(k * g, *s, c).movedim(-1, 1)


def _pooled_renorm_extra(extras: list[list[Tensor]], ghosts: list[int]) -> tuple[Tensor, ...]:
    """Batch Renorm's diagnostics over all (ghost batch, channel) pairs from each call's
    (clip_fraction_r, clip_fraction_d, r, d) over its K ghost batches (``ghosts``): the clip
    fractions weighted by K, r and d (K * C,) averaged over the ghost batches, per channel
    (BatchNorm, empty ``extras[0]``: ())."""
    if not extras[0]:
        return ()
    if len(extras) == 1:
        clip_r, clip_d, r, d = extras[0]
        k = ghosts[0]
        return clip_r, clip_d, r.view(k, -1).mean(0), d.view(k, -1).mean(0)
    total = sum(ghosts)
    clip_r = sum(e[0] * (k / total) for e, k in zip(extras, ghosts, strict=True))
    clip_d = sum(e[1] * (k / total) for e, k in zip(extras, ghosts, strict=True))
    r = torch.cat([e[2].view(k, -1) for e, k in zip(extras, ghosts, strict=True)]).mean(0)
    d = torch.cat([e[3].view(k, -1) for e, k in zip(extras, ghosts, strict=True)]).mean(0)
    assert isinstance(clip_r, Tensor) and isinstance(clip_d, Tensor)
    return clip_r, clip_d, r, d


def batch_moments(x: Tensor, size: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel batch statistics for the autograd layers (mean-only BN, BIN, SN), over ghost
    batches of ``size`` samples (None: the whole batch).

    Returns (mean, var, mean_target, var_target): each sample's ghost-batch mean and biased
    variance, shaped (N, C, 1, ..) to broadcast against x (differentiable), and the running
    targets (C,) of :func:`pooled_ghost_stats` (detached; var_target unbiased).
    """
    views = ghost_views(x, x.shape[0] if size is None else size)
    means, variances, counts, per_sample_mean, per_sample_var = [], [], [], [], []
    for view in views:
        counts.append(check_ghost_values(view, x))
        dims = ghost_dims(view)  # centred two-pass: on CPU faster than var_mean, as stable
        mean = view.mean(dims, keepdim=True)
        var = (view - mean).square().mean(dims, keepdim=True)
        shape = (-1, *mean.shape[2:])  # (K, 1, C, 1..) -> one row per sample
        per_sample_mean.append(mean.expand(-1, view.shape[1], *mean.shape[2:]).reshape(shape))
        per_sample_var.append(var.expand(-1, view.shape[1], *var.shape[2:]).reshape(shape))
        means.append(mean.reshape(mean.shape[0], -1).detach())
        variances.append(var.reshape(var.shape[0], -1).detach())
    mean_target, var_target = pooled_ghost_stats(means, variances, counts)
    mean = torch.cat(per_sample_mean) if len(views) > 1 else per_sample_mean[0]
    var = torch.cat(per_sample_var) if len(views) > 1 else per_sample_var[0]
    return mean, var, mean_target, var_target


def unit_count(x: Tensor) -> int:
    """prod(S): the values per (sample, channel) of an (N, C, *S) input."""
    return math.prod(x.shape[2:])
