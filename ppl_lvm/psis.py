"""Pareto-smoothed importance sampling's diagnostic k̂, per datapoint (Vehtari et al. 2015/2024).

Fit a generalized Pareto distribution to the largest M = ⌈min(K / 5, 3 √K)⌉ importance weights of
each datapoint (Zhang & Stephens 2009, with the weakly informative prior of arviz / loo); its shape
k̂ estimates how many moments the weights have (1 / k̂): k̂ < 0.5 the estimate is reliable, 0.5–0.7
it converges slowly, k̂ > 0.7 the IS / IWAE estimate of log p(x) is not to be trusted.
"""
from __future__ import annotations

import math

import torch

# Zhang & Stephens' grid and the prior arviz and loo put on k (n·k + 10·0.5) / (n + 10)
_PRIOR_BS = 3.0
_PRIOR_K = 10.0
_MIN_GRID = 30
# log weights whose M + 1 largest agree to within this many ulps of max |log w| count as equal
_ROUNDING_ULPS = 1024


def tail_size(num_samples):
    """M = ⌈min(K / 5, 3 √K)⌉: how many of the largest weights the Pareto fit uses (as arviz)."""
    return int(math.ceil(min(0.2 * num_samples, 3 * math.sqrt(num_samples))))


@torch.no_grad()
def pareto_khat(log_weights: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
    """Per-datapoint Pareto k̂ of importance weights, by arviz's rule (``arviz.psislw``, r_eff = 1).

    Args:
        log_weights: [K, N] log w_{k,n} (unnormalised: constants per datapoint do not matter),
            or [K] for one datapoint. K ≥ 25 or so.
        num_samples: K when ``log_weights`` holds only the largest M + 1 or more of K weights
            per datapoint (what an estimator that streams over chunks of K keeps); None: all K.

    Returns:
        [N] (or a 0-dim tensor for [K] input) k̂ on log_weights' device, float64. As arviz: the
        cutoff is the (M + 1)-th largest weight, the tail the weights strictly above it, and a
        generalized Pareto is fitted to the tail's exceedances; with 4 or fewer tail weights k̂
        is +inf (no fit: K too small, or the largest weights tie, as discrete latents under
        "prior" or "uniform" give, or all weights are equal, as an exact posterior proposal
        gives). Log weights within rounding of the cutoff (1024 ulps of their dtype, relative to
        max |log w|) count as ties. NaN log weights give NaN.
    """
    squeeze = log_weights.dim() == 1
    if squeeze:
        log_weights = log_weights[:, None]
    if log_weights.dim() != 2:
        raise ValueError(f"log_weights must be [K, N] or [K], got {tuple(log_weights.shape)}")
    given, num_rows = log_weights.shape
    num_samples = given if num_samples is None else int(num_samples)
    tail = tail_size(num_samples)
    out = torch.full((num_rows,), math.inf, dtype=torch.float64, device=log_weights.device)
    if tail <= 4 or tail >= num_samples or tail + 1 > given:
        return out[0] if squeeze else out
    rounding = _ROUNDING_ULPS * torch.finfo(log_weights.dtype).eps
    log_weights = log_weights.to(torch.float64).T  # [N, K]
    top = torch.topk(log_weights, tail + 1, dim=-1).values  # descending: [N, M + 1]
    scale = log_weights.abs().max(-1).values.clamp(min=1.0)
    top = top - top[:, :1]
    cutoff = top[:, -1:].clamp(min=math.log(torch.finfo(torch.float64).tiny))
    # the tail: weights strictly above the cutoff (arviz's np.where(x > xcutoff))
    above = top[:, :-1] > cutoff + rounding * scale[:, None]
    counts = above.sum(-1)
    exceedances = (top[:, :-1].exp() - cutoff.exp()).flip(-1)  # ascending [N, M]
    for count in counts.unique().tolist():
        if count <= 4:
            continue  # arviz: not enough tail samples for gpdfit, k = inf
        rows = (counts == count).nonzero().flatten()
        out[rows] = _gpd_shape(exceedances[rows][:, -count:])
    out = torch.where(torch.isnan(log_weights).any(-1), torch.full_like(out, math.nan), out)
    return out[0] if squeeze else out


def _gpd_shape(exceedances):
    """Zhang & Stephens' posterior-mean estimate of the GPD shape k = mean log(1 - b x) (the sign of
    arviz and loo: k > 0 is a heavy tail), pulled toward 0.5 by their prior; arviz's ``_gpdfit``
    line for line, batched. exceedances: [N, M] ascending, > 0. Returns [N]."""
    num_rows, size = exceedances.shape
    grid = _MIN_GRID + int(math.sqrt(size))
    j = torch.arange(1, grid + 1, dtype=exceedances.dtype, device=exceedances.device)
    quartile = exceedances[:, int(size / 4 + 0.5) - 1 : int(size / 4 + 0.5)]  # [N, 1]
    largest = exceedances[:, -1:]
    tiny = torch.finfo(exceedances.dtype).tiny
    b = 1 / largest.clamp(min=tiny) + (1 - torch.sqrt(grid / (j - 0.5))) / (
        _PRIOR_BS * quartile.clamp(min=tiny))
    k = torch.log1p(-b[:, :, None] * exceedances[:, None, :]).mean(-1)  # [N, grid]
    profile = size * (torch.log(-b / k) - k - 1)  # [N, grid]
    weights = torch.softmax(profile, dim=-1)
    # arviz drops grid points of negligible weight before renormalising
    weights = torch.where(weights >= 10 * torch.finfo(weights.dtype).eps, weights,
                          torch.zeros_like(weights))
    weights = weights / weights.sum(-1, keepdim=True)
    b_post = (weights * b).sum(-1, keepdim=True)
    k_post = torch.log1p(-b_post * exceedances).mean(-1)
    return (size * k_post + _PRIOR_K * 0.5) / (size + _PRIOR_K)
