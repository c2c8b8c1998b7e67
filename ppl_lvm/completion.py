"""Completion: draws of the missing pixels from p(x_miss | x_obs), and how good an imputation is.

The lecture's example: missing pixels x_miss are latent like z, and completions come from the
posterior p(x_miss | x_obs) = ∫ p(x_miss | z) p(z | x_obs) dz. ``complete`` draws them for any
model by sampling-importance-resampling with the guide as proposal, or by Metropolis-within-Gibbs on
(z, x_miss); for a mixture of Gaussians ``mixture_conditional`` gives the exact conditional.
``log_marginal_observed`` is log p(x_obs); ``imputation_scores``, ``mean_imputation`` and
``knn_imputation`` are the yardsticks. Masks and the masked models are in ``ppl_lvm.models.missing``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from pyro.poutine.messenger import Messenger

from ppl_lvm import program, progress
from ppl_lvm import densities
from ppl_lvm.estimators import log_marginal, plate_nesting, sample_sites
from ppl_lvm.models.missing import check_missing, fill_missing
from ppl_lvm.particles import noise_from_cpu
from ppl_lvm.psis import pareto_khat
from ppl_lvm.vocabulary import renamed

COMPLETION_METHODS = ("auto", "sir", "mwg")
# a row's SIR completion is trusted when its weights' Pareto k̂ is at most this (PSIS's rule);
# method="auto" leaves SIR already above KHAT_GOOD (0.5-0.7: usable, but converging slowly) ...
KHAT_TRUSTED, KHAT_GOOD = 0.7, 0.5
# ... and an MwG chain when it accepts at least this share of its z moves (else it barely moves)
ACCEPTANCE_TRUSTED = 0.05
# rows × particles per traced call in ``complete``: bounds memory (≈ 4 · this · D floats)
ROWS_PER_CALL = 1 << 17


def log_marginal_observed(model: Callable[..., Any], guide: Callable[..., Any] | None,
                          x: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """log p(x_obs) per datapoint by importance weighting with the guide (IWAE by default).

    The estimator of ``ppl_lvm.estimators.log_marginal`` applied to the masked model: weights
    p(x_obs, z_k) / q(z_k | x_obs). x: [N, D] (NaN allowed where missing); mask: [N, D] bool.
    Returns [N] (nats). ``kwargs`` go to ``log_marginal`` (method, num_samples, seed, ...).
    """
    check_missing(x, mask)
    return log_marginal(model, guide, fill_missing(x, mask), mask=mask, **kwargs)


# ----------------------------------------------------------------------------------------------
# completion: samples of x_miss from p(x_miss | x_obs)


@dataclasses.dataclass
class Completion:
    """What ``complete`` returns. Observed pixels are copied from x in ``samples`` and ``mean``.

    samples: [S, N, D] completions x ~ p(x_miss | x_obs) (one per posterior draw).
    mean: [N, D] the posterior mean E[x | x_obs] (for Bernoulli pixels: P(x_d = 1 | x_obs)).
    ess: [N] effective sample size of the importance weights (SIR), else None.
    acceptance: [N] the Metropolis acceptance rate of z moves (MwG; NaN for rows that SIR
        completed), else None.
    log_weights: [K, N] the importance log weights log p(x_obs, z_k) - log q(z_k | x_obs) (SIR).
    khat: [N] Pareto k̂ of those weights (``ppl_lvm.psis``): above 0.7 SIR's completion of the row
        cannot be trusted (+inf where too few or tied weights allow no fit; then ESS decides).
    trusted: [N] bool, whether the row's completion passed its health check (SIR: k̂ ≤ 0.7, or
        no k̂ and ESS ≥ K / 2; MwG: acceptance ≥ 5 %).
    sample_means: [S, N, D] E[x | z_s] for the z_s behind each sample (the image a sample is a
        noisy draw of: easier to look at, and as diverse as the posterior over z).
    """

    samples: torch.Tensor
    mean: torch.Tensor
    method: str
    sample_means: torch.Tensor | None = None
    ess: torch.Tensor | None = None
    acceptance: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None
    khat: torch.Tensor | None = None
    trusted: torch.Tensor | None = None

    def most_probable(self) -> torch.Tensor:
        """Per-pixel most probable completion of binary pixels: 1{P(x_d = 1 | x_obs) > 1/2}, [N, D]."""
        return (self.mean > 0.5).to(self.mean.dtype)


class MaskObserved(Messenger):
    """Leaves the missing entries of the observed site ``site`` out of its likelihood.

    For a model written for complete data (``model(x)``, e.g. a ``VAE``): its observed site's
    distribution, pixels independent given z (``Independent`` over the last dim), is replaced by
    the same distribution with ``mask`` applied per pixel, so log p(x_obs | z) counts observed
    pixels only, and the missing ones are latent (the lecture's missing values).
    """

    def __init__(self, site, mask):
        super().__init__()
        self.site, self.mask = site, mask

    def _pyro_sample(self, msg):
        if msg["name"] != self.site:
            return
        fn = msg["fn"]
        if not isinstance(fn, torch.distributions.Independent) and (
                tuple(fn.batch_shape[-self.mask.dim():]) == tuple(self.mask.shape)):
            # the pixels are batch dims already (a plate over them): mask them one by one
            msg["fn"] = fn.mask(self.mask)
            msg["value"] = fill_missing(msg["value"], self.mask)
            return
        if not isinstance(fn, torch.distributions.Independent):
            raise ValueError(f"complete: the observed site {self.site!r} has "
                             f"{type(fn).__name__}; completing a model that takes no mask needs "
                             "pixels independent given the latents (e.g. Bernoulli(...).to_event(1))"
                             " or a model(x, mask) that masks its own likelihood")
        msg["fn"] = fn.base_dist.mask(self.mask).to_event(fn.reinterpreted_batch_ndims)
        msg["value"] = fill_missing(msg["value"], self.mask)


@dataclasses.dataclass
class _Masked:
    """How to call a model/guide pair on partly observed rows, read from the model once."""

    plate_name: str
    site: str            # the observed site whose value is x
    model_takes_mask: bool
    guide_takes_mask: bool

    def call_model(self, model, x, mask):
        if self.model_takes_mask:
            return lambda: model(x, mask=mask)
        return lambda: MaskObserved(self.site, mask)(model)(x)

    def call_guide(self, guide, x, mask, kwargs):
        if self.guide_takes_mask:
            return lambda: guide(x, mask=mask, **kwargs)
        return lambda: guide(fill_missing(x, mask), **kwargs)


def _read_masked(model, guide, x, mask):
    """Which site observes x, where the data plate is, and whether model/guide take ``mask``."""
    model_takes_mask = program.names_keywords(model, "mask")
    args = {"mask": mask} if model_takes_mask else {}
    structure = program.inspect_program(model, fill_missing(x, mask), **args)
    row_shape = tuple(x.shape[1:])
    observed = [n for n in structure.observed_sites if n in structure.local_sites]
    trace = program.trace_of(model, fill_missing(x[:2], mask[:2]),
                             **({"mask": mask[:2]} if model_takes_mask else {}))
    matching = [n for n in observed if tuple(trace.nodes[n]["value"].shape[1:]) == row_shape
                and trace.nodes[n]["value"].shape[0] == min(2, x.shape[0])]
    if len(matching) != 1:
        raise ValueError(f"complete: cannot tell which observed site holds x (rows of shape "
                         f"{row_shape}): the model's observed sites in its data plate are "
                         f"{observed}")
    return _Masked(structure.plate_name, matching[0], model_takes_mask,
                   program.names_keywords(guide, "mask"))


def _traces(masked, model, guide, x, mask, guide_x, guide_mask, values=None, guide_kwargs=None):
    """One particle per row: guide trace (conditioned on ``values`` if given) and replayed model.

    Returns log w [R] = log p(x, z) - log q(z | guide input), the latent values and p(x | z).
    """
    guide_fn = guide if values is None else poutine.condition(guide, data=values)
    guide_call = masked.call_guide(guide_fn, guide_x, guide_mask, guide_kwargs or {})
    model_call = masked.call_model(model, x, mask)
    if values is None:
        guide_trace, model_trace = densities.trace_pair(model_call, guide_call)
    else:  # replay needs sampled, not observed, z
        guide_trace = densities.trace_pair(guide_call, None)[1]
        model_trace = densities.trace_given(model_call, values)
    nesting = plate_nesting(guide_trace, model_trace)
    log_weights = densities.row_log_weights(model_trace, guide_trace, masked.plate_name,
                                            x.shape[0], nesting).reshape(-1)
    latents = {name: site["value"] for name, site in sample_sites(guide_trace).items()}
    return log_weights, latents, model_trace.nodes[masked.site]["fn"]


def _chunks(num_rows, copies, data_dim):
    rows = max(1, ROWS_PER_CALL // max(copies, 1) // max(1, data_dim // 64))
    return [slice(start, min(start + rows, num_rows)) for start in range(0, num_rows, rows)]


def _guide_kwargs(guide, idx, copies):
    return {} if idx is None or not program.names_keywords(guide, "idx") else {
        "idx": idx.repeat(copies)}


def _steps(num_steps):
    """range(num_steps) with a progress bar (Metropolis-within-Gibbs sweeps)."""
    with progress.phase("Metropolis-within-Gibbs", num_steps, unit="sweep"):
        for step in range(num_steps):
            yield step
            progress.advance()


def _sir(masked, model, guide, x, mask, num_samples, num_particles, idx):
    """Sampling-importance-resampling: z_k ~ q(z | x_obs), resample by w_k, x_miss ~ p(x_miss | z)."""
    rows, dim = x.shape
    reps = lambda t, k: t.repeat(k, *([1] * (t.dim() - 1)))  # [n, ...] -> [k·n, ...], k-major
    log_weights, latents, x_fn = _traces(masked, model, guide, reps(x, num_particles),
                                         reps(mask, num_particles), reps(x, num_particles),
                                         reps(mask, num_particles),
                                         guide_kwargs=_guide_kwargs(guide, idx, num_particles))
    log_weights = log_weights.reshape(num_particles, rows)
    normalised = torch.softmax(log_weights, 0)  # [K, n]
    mean = (normalised[..., None] * x_fn.mean.reshape(num_particles, rows, dim)).sum(0)
    chosen = torch.distributions.Categorical(probs=normalised.T).sample((num_samples,))  # [S, n]
    flat = (chosen * rows + torch.arange(rows, device=x.device)).reshape(-1)  # rows of the K·n batch
    values = {name: value[flat] for name, value in latents.items()}
    _, _, x_fn = _traces(masked, model, guide, reps(x, num_samples), reps(mask, num_samples),
                         reps(x, num_samples), reps(mask, num_samples), values=values,
                         guide_kwargs=_guide_kwargs(guide, idx, num_samples))
    samples = x_fn.sample().reshape(num_samples, rows, dim)
    ess = 1.0 / (normalised**2).sum(0)
    return samples, mean, dict(ess=ess, log_weights=log_weights,
                               sample_means=x_fn.mean.reshape(num_samples, rows, dim))


def _mwg(masked, model, guide, x, mask, num_samples, num_steps, proposal, idx):
    """Metropolis-within-Gibbs on (z, x_miss), S chains per row.

    z-step: independence proposal z' ~ q(z | x_obs) ("observed") or q(z | x_obs, x_miss) with the
    current completion and an all-observed mask ("completed", Mattei & Frellsen 2018), accepted with
    probability min(1, [p(x, z') q(z | ·)] / [p(x, z) q(z' | ·)]) where x = (x_obs, x_miss);
    x-step: x_miss ~ p(x_miss | z) exactly. The mean averages E[x | z] over the second half of the run.
    """
    rows, dim = x.shape
    x_rep, mask_rep = x.repeat(num_samples, 1), mask.repeat(num_samples, 1)
    every = torch.ones_like(mask_rep)
    guide_kwargs = _guide_kwargs(guide, idx, num_samples)
    # start: z ~ q(z | x_obs), x_miss ~ p(x_miss | z)
    _, state, x_fn = _traces(masked, model, guide, x_rep, mask_rep, x_rep, mask_rep,
                             guide_kwargs=guide_kwargs)
    current = torch.where(mask_rep, x_rep, x_fn.sample())
    accepted = torch.zeros(rows * num_samples, device=x.device)
    mean_sum, mean_count = torch.zeros_like(x_rep), 0
    for step in _steps(num_steps):
        guide_x, guide_mask = (x_rep, mask_rep) if proposal == "observed" else (current, every)
        log_w_new, proposed, fn_new = _traces(masked, model, guide, current, every, guide_x,
                                              guide_mask,
                                              guide_kwargs=guide_kwargs)
        log_w_old, _, fn_old = _traces(masked, model, guide, current, every, guide_x, guide_mask,
                                       values=state, guide_kwargs=guide_kwargs)
        accept = torch.rand_like(log_w_new).log() < log_w_new - log_w_old
        accepted += accept
        state = {name: torch.where(accept.reshape(-1, *[1] * (value.dim() - 1)), proposed[name],
                                   value) for name, value in state.items()}
        keep = accept[:, None]
        draw = torch.where(keep, fn_new.sample(), fn_old.sample())
        state_mean = torch.where(keep, fn_new.mean, fn_old.mean)
        current = torch.where(mask_rep, x_rep, draw)
        if step >= num_steps // 2:
            mean_sum += state_mean
            mean_count += 1
    if not num_steps:  # the starting draws
        state_mean, mean_sum, mean_count = x_fn.mean, x_fn.mean, 1
    mean = (mean_sum / mean_count).reshape(num_samples, rows, dim).mean(0)
    acceptance = (accepted / max(num_steps, 1)).reshape(num_samples, rows).mean(0)
    return current.reshape(num_samples, rows, dim), mean, dict(
        acceptance=acceptance, sample_means=state_mean.reshape(num_samples, rows, dim))


@program.in_evaluation_mode
@torch.no_grad()
def complete(model: Callable[..., Any], guide: Callable[..., Any] | None, x: torch.Tensor,
             mask: torch.Tensor, num_samples: int | None = None, *, method: str = "auto",
             num_particles: int = 1000, num_steps: int | None = None, proposal: str = "observed",
             idx: torch.Tensor | None = None, seed: int | None = None,
             num_completions: int | None = None, num_sweeps: int | None = None) -> Completion:
    """Samples of the missing pixels from the posterior p(x_miss | x_obs), and its mean.

    Args:
        model, guide: any pair whose data plate holds one observed site with x's rows (found
            by tracing, whatever its name). A model that names a ``mask`` argument
            (``model(x, mask)``, e.g. ``MaskedVAE``) is given the mask and masks its own
            likelihood; any other (``model(x)``, e.g. a ``VAE`` trained on complete data) has the
            mask applied per pixel to its observed site (``MaskObserved``). The guide gets
            ``mask=`` if it names it, else the zero-filled image.
        x: [N, D] images (NaN allowed where mask is False); mask: [N, D] bool, True = observed.
        num_completions (old name ``num_samples``, also the fifth positional argument): S
            completions per image, default 16.
        method: "auto" (default): SIR, checked row by row (Pareto k̂ of its weights); the rows
            where k̂ > 0.5 (or, with too few weights for a fit, ESS < K / 2) are completed by MwG
            with the "completed" proposal instead, and a warning names what is still untrusted
            (an MwG chain that barely moves).
            "sir": sampling-importance-resampling, z_k ~ q(z | x_obs) for k ≤ K
            (``num_particles``), w_k = p(x_obs, z_k) / q(z_k | x_obs), S indices resampled by w,
            then x_miss ~ p(x_miss | z); the mean is the self-normalised Σ_k w̃_k E[x | z_k].
            "mwg": Metropolis-within-Gibbs, S chains of ``num_sweeps`` sweeps (old name
            ``num_steps``; default 200; see ``proposal``).
        proposal: for "mwg": "observed" (q(z | x_obs), an independence sampler) or "completed"
            (the encoder fed the current completion as if fully observed).
        idx: optional [N] row indices for a per-datapoint guide.
        seed: optional int; the same seed gives the same completions (on any device: the draws
            come from the CPU's generator, ``particles.noise_from_cpu``).

    Returns:
        ``Completion`` (samples [S, N, D], mean [N, D], ESS, k̂ or acceptance, trusted). Warns
        (RuntimeWarning) when rows fail their health check.
    """
    num_samples = renamed("num_completions", num_completions, "num_samples", num_samples, 16)
    num_steps = renamed("num_sweeps", num_sweeps, "num_steps", num_steps, 200)
    check_missing(x, mask)
    if method not in COMPLETION_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {COMPLETION_METHODS}")
    if proposal not in ("observed", "completed"):
        raise ValueError(f"proposal must be 'observed' or 'completed', got {proposal!r}")
    if min(num_samples, num_particles) < 1 or num_steps < 0:
        raise ValueError("num_samples and num_particles must be >= 1 and num_steps >= 0")
    x = fill_missing(x, mask)
    masked = _read_masked(model, guide, x, mask)
    rng = torch.random.fork_rng() if seed is not None else contextlib.nullcontext()
    # seeded, every draw comes from the CPU's generator on any device: the same completions on a
    # GPU as on the CPU (up to float error)
    with rng, noise_from_cpu(x.device if seed is not None else "cpu"):
        if seed is not None:
            pyro.set_rng_seed(seed)
        if method == "mwg":
            completion = _complete_rows(masked, model, guide, x, mask, num_samples, "mwg",
                                        num_particles, num_steps, proposal, idx)
        else:
            completion = _complete_rows(masked, model, guide, x, mask, num_samples, "sir",
                                        num_particles, num_steps, proposal, idx)
            khat = completion.khat
            bad = ~completion.trusted | (torch.isfinite(khat) & (khat > KHAT_GOOD))
            if method == "auto" and bad.any():
                # SIR cannot be trusted on these rows: MwG from the encoder fed its own completion
                rows = bad.nonzero()[:, 0]
                mwg = _complete_rows(masked, model, guide, x[rows], mask[rows], num_samples,
                                     "mwg", num_particles, num_steps, "completed",
                                     None if idx is None else idx[rows])
                completion = _replace_rows(completion, mwg, rows)
    _warn_untrusted(completion, method, num_particles)
    return completion


def _complete_rows(masked, model, guide, x, mask, num_samples, method, num_particles, num_steps,
                   proposal, idx):
    """``complete``'s work for one method on rows x [n, D], in chunks that bound memory."""
    outputs = []
    copies = num_particles if method == "sir" else 2 * num_samples
    for rows in _chunks(x.shape[0], copies, x.shape[1]):
        row_idx = None if idx is None else idx[rows]
        if method == "sir":
            outputs.append(_sir(masked, model, guide, x[rows], mask[rows], num_samples,
                                num_particles, row_idx))
        else:
            outputs.append(_mwg(masked, model, guide, x[rows], mask[rows], num_samples,
                                num_steps, proposal, row_idx))
    samples = torch.cat([o[0] for o in outputs], 1)
    mean = torch.cat([o[1] for o in outputs], 0)
    extras = {key: torch.cat([o[2][key] for o in outputs], 1 if key == "sample_means" else -1)
              for key in outputs[0][2]}
    samples = torch.where(mask, x, samples)
    mean = torch.where(mask, x, mean)
    extras["sample_means"] = torch.where(mask, x, extras["sample_means"])
    if method == "sir":
        khat = pareto_khat(extras["log_weights"]).to(mean.dtype)
        no_fit = torch.isinf(khat)
        extras["khat"] = khat
        extras["trusted"] = torch.where(no_fit, extras["ess"] >= num_particles / 2,
                                        khat <= KHAT_TRUSTED)
    else:
        extras["trusted"] = extras["acceptance"] >= ACCEPTANCE_TRUSTED
    return Completion(samples, mean, method, **extras)


def _replace_rows(completion, other, rows):
    """``completion`` with rows ``rows`` taken from ``other`` (a completion of those rows only)."""
    def put(into, values, dim):
        if values is None:
            return into
        into = into.clone()
        index = [slice(None)] * into.dim()
        index[dim] = rows
        into[tuple(index)] = values.to(into.dtype)
        return into
    num_rows = completion.mean.shape[0]
    acceptance = torch.full((num_rows,), math.nan, device=completion.mean.device)
    return dataclasses.replace(
        completion, method="sir+mwg" if len(rows) < num_rows else "mwg",
        samples=put(completion.samples, other.samples, 1), mean=put(completion.mean, other.mean, 0),
        sample_means=put(completion.sample_means, other.sample_means, 1),
        acceptance=put(acceptance, other.acceptance, 0),
        trusted=put(completion.trusted, other.trusted, 0))


def _warn_untrusted(completion, method, num_particles):
    """One RuntimeWarning saying which rows failed their health check and by how much."""
    bad = ~completion.trusted
    if not bad.any():
        return
    count, total = int(bad.sum()), bad.numel()
    parts = []
    if completion.khat is not None:
        unfit = completion.khat > KHAT_TRUSTED
        parts.append(f"SIR's weights have Pareto k̂ > {KHAT_TRUSTED} on {int(unfit.sum())} rows "
                     f"(ESS {completion.ess.min().item():.1f}-{completion.ess.max().item():.1f} "
                     f"of K = {num_particles})")
    if completion.acceptance is not None:
        low = completion.acceptance < ACCEPTANCE_TRUSTED
        parts.append(f"MwG accepted under {ACCEPTANCE_TRUSTED:.0%} of its z moves on "
                     f"{int(low.sum())} rows")
    hint = ("a proposal q(z | x) closer to the posterior is needed (an encoder trained with "
            "missing pixels, or more particles)" if method == "auto" else
            "try method='auto' (MwG where SIR fails) or method='mwg', proposal='completed'")
    warnings.warn(f"complete: {count} of {total} rows cannot be trusted: {'; '.join(parts)}; "
                  f"{hint}", RuntimeWarning, stacklevel=5)


# ----------------------------------------------------------------------------------------------
# mixture of Gaussians: the exact conditional


@dataclasses.dataclass
class MixtureConditional:
    """p(x_miss | x_obs) of a mixture of Gaussians, per row: a mixture of Gaussian conditionals.

    responsibilities: [N, C] p(c | x_obs) ∝ π_c N(x_obs; μ_c,obs, Σ_c,obs,obs).
    component_means: [N, C, D] E[x | x_obs, c] (observed entries = x).
    mean: [N, D] E[x | x_obs] = Σ_c p(c | x_obs) E[x | x_obs, c].
    log_px: [N] log p(x_obs), exact.
    samples: [S, N, D] draws of x from p(x_miss | x_obs) (observed entries = x), or None.
    """

    responsibilities: torch.Tensor
    component_means: torch.Tensor
    mean: torch.Tensor
    log_px: torch.Tensor
    samples: torch.Tensor = None


def mixture_conditional(weights, means, covs, x, mask, num_samples=None, generator=None, *,
                        num_completions=None):
    """The exact completion of a mixture of Gaussians given the observed dims of each row.

    With c ~ Cat(π), x | c ~ N(μ_c, Σ_c): p(c | x_o) ∝ π_c N(x_o; μ_{c,o}, Σ_{c,oo}) and
    x_m | x_o, c ~ N(μ_{c,m} + Σ_{c,mo} Σ_{c,oo}⁻¹ (x_o - μ_{c,o}), Σ_{c,mm} - Σ_{c,mo} Σ_{c,oo}⁻¹ Σ_{c,om}).
    With diagonal covariances the missing dims are independent of the observed ones given c: the
    conditional of component c is just its marginal on the missing dims.

    Args:
        weights: [C] mixture weights π (summing to 1).
        means: [C, D] μ_c.
        covs: [C, D, D] full covariances Σ_c, or [C, D] diagonal variances.
        x: [N, D] (NaN allowed where mask is False); mask: [N, D] bool, True = observed.
        num_completions (old name ``num_samples``): S ≥ 0 draws of the completion (default 0).
        generator: optional torch.Generator for the draws (a CPU one serves data on any device).

    Returns:
        ``MixtureConditional``. Full covariances are solved once per distinct mask pattern.
    """
    num_samples = renamed("num_completions", num_completions, "num_samples", num_samples, 0)
    check_missing(x, mask)
    num_rows, dim = x.shape
    num_components = weights.shape[0]
    if means.shape != (num_components, dim) or covs.shape not in (
            (num_components, dim), (num_components, dim, dim)):
        raise ValueError(f"need means [C, D] and covs [C, D] or [C, D, D] with C={num_components}, "
                         f"D={dim}; got {tuple(means.shape)} and {tuple(covs.shape)}")
    x = fill_missing(x, mask)
    log_weights = weights.log()
    if covs.dim() == 2:
        return _diagonal_conditional(log_weights, means, covs, x, mask, num_samples, generator)
    log_joint_c = x.new_empty(num_rows, num_components)
    component_means = x.new_empty(num_rows, num_components, dim)
    patterns, which = torch.unique(mask, dim=0, return_inverse=True)
    factors = []  # per pattern: (rows, missing dims, [C, m, m] Cholesky of the conditional cov)
    for p, pattern in enumerate(patterns):
        rows = (which == p).nonzero().flatten()
        obs, miss = pattern.nonzero().flatten(), (~pattern).nonzero().flatten()
        cov_oo = covs[:, obs][:, :, obs]  # [C, o, o]
        cov_mo = covs[:, miss][:, :, obs]  # [C, m, o]
        chol = torch.linalg.cholesky(cov_oo)
        resid = x[rows][:, obs][:, None, :] - means[:, obs]  # [n, C, o]
        log_joint_c[rows] = log_weights + dist.MultivariateNormal(
            means[:, obs], scale_tril=chol).log_prob(resid + means[:, obs])
        # Σ_oo⁻¹ (x_o - μ_o) via the Cholesky factor: [C, o, n]
        solved = torch.cholesky_solve(resid.permute(1, 2, 0), chol)
        cond_mean = means[:, miss][:, :, None] + cov_mo @ solved  # [C, m, n]
        block = x[rows][:, None, :].expand(-1, num_components, -1).clone()
        block[:, :, miss] = cond_mean.permute(2, 0, 1)
        component_means[rows] = block
        if num_samples and miss.numel():
            cond_cov = covs[:, miss][:, :, miss] - cov_mo @ torch.cholesky_solve(
                cov_mo.transpose(1, 2), chol)
            cond_cov = (cond_cov + cond_cov.transpose(1, 2)) / 2
            factors.append((rows, miss, torch.linalg.cholesky(cond_cov)))
    log_px = log_joint_c.logsumexp(-1)
    responsibilities = (log_joint_c - log_px[:, None]).exp()
    mean = (responsibilities[..., None] * component_means).sum(1)
    samples = None
    if num_samples:
        c = _components(responsibilities, num_samples, generator)  # [S, N]
        samples = component_means[torch.arange(num_rows), c]  # [S, N, D]
        for rows, miss, cond_chol in factors:
            noise = torch.randn(num_samples, rows.numel(), miss.numel(), 1, generator=generator,
                                dtype=x.dtype).to(x.device)
            draws = (cond_chol[c[:, rows]] @ noise).squeeze(-1)  # [S, n, m]
            samples[:, rows[:, None], miss] += draws
    return MixtureConditional(responsibilities, component_means, mean, log_px, samples)


def mixture_completion(mixture: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor,
                       num_samples: int | None = None,
                       generator: torch.Generator | None = None, *,
                       num_completions: int | None = None) -> MixtureConditional:
    """``mixture_conditional`` with the π, μ, Σ of a ``MixtureOfGaussians`` (ppl_lvm.models.mog).

    x: [N, D] (NaN allowed where missing); mask: [N, D] bool; num_completions (old name
    ``num_samples``): S draws. Returns ``MixtureConditional``.
    """
    num_samples = renamed("num_completions", num_completions, "num_samples", num_samples, 0)
    with torch.no_grad():
        covs = (mixture.log_scale.exp() ** 2 if mixture.covariance == "diag"
                else mixture.covariance_matrix)
        return mixture_conditional(mixture.weights, mixture.loc, covs, x, mask, num_samples,
                                   generator)


def _components(responsibilities, num_samples, generator):
    """c_s ~ Categorical(r_n): [S, N] on the responsibilities' device, drawn on the generator's
    (a CPU generator with GPU data draws the CPU's numbers, as the Normal noise beside it does)."""
    on = responsibilities.device if generator is None else generator.device
    return torch.multinomial(responsibilities.to(on), num_samples, replacement=True,
                             generator=generator).T.to(responsibilities.device)


def _diagonal_conditional(log_weights, means, variances, x, mask, num_samples, generator):
    scales = variances.sqrt()
    log_prob = dist.Normal(means, scales).log_prob(x[:, None, :])  # [N, C, D]
    log_joint_c = log_weights + torch.where(mask[:, None, :], log_prob, 0.0).sum(-1)
    log_px = log_joint_c.logsumexp(-1)
    responsibilities = (log_joint_c - log_px[:, None]).exp()
    component_means = torch.where(mask[:, None, :], x[:, None, :], means)
    mean = (responsibilities[..., None] * component_means).sum(1)
    samples = None
    if num_samples:
        c = _components(responsibilities, num_samples, generator)  # [S, N]
        noise = torch.randn((num_samples,) + x.shape, generator=generator, dtype=x.dtype).to(x.device)
        samples = torch.where(mask, x, means[c] + scales[c] * noise)
    return MixtureConditional(responsibilities, component_means, mean, log_px, samples)


# ----------------------------------------------------------------------------------------------
# imputation quality and the baselines


def imputation_scores(x: torch.Tensor, mask: torch.Tensor, imputed: torch.Tensor,
                      binary: bool = True, eps: float = 1e-6) -> dict[str, float]:
    """How well ``imputed`` predicts the missing pixels of ``x`` (missing pixels only).

    x: [N, D] true values; mask: [N, D] bool (True = observed, so scored where False); imputed:
    [N, D] predictions: P(x_d = 1) for binary pixels, values otherwise. Returns a dict: "mse"
    always; for binary pixels also "accuracy" of 1{imputed > 1/2} and "cross_entropy" (nats per
    missing pixel, predictions clipped to [eps, 1 - eps]).
    """
    missing = ~mask
    if not missing.any():
        raise ValueError("no missing pixels to score")
    truth, guess = x[missing].double(), imputed[missing].double()
    scores = {"mse": ((truth - guess) ** 2).mean().item()}
    if binary:
        prob = guess.clamp(eps, 1 - eps)
        scores["accuracy"] = ((prob > 0.5).double() == truth).double().mean().item()
        scores["cross_entropy"] = -(truth * prob.log() + (1 - truth) * (1 - prob).log()).mean().item()
    return scores


def mean_imputation(x_train, mask_train, x, mask):
    """Each missing pixel filled with its observed mean over the training rows: [N, D].

    x_train: [M, D]; mask_train: [M, D] bool or None (all observed). Pixels never observed in
    training get the overall observed mean.
    """
    mask_train = torch.ones_like(x_train, dtype=torch.bool) if mask_train is None else mask_train
    filled = fill_missing(x_train, mask_train)
    counts = mask_train.sum(0)
    overall = filled.sum() / mask_train.sum()
    pixel_mean = torch.where(counts > 0, filled.sum(0) / counts.clamp(min=1), overall)
    return torch.where(mask, fill_missing(x, mask), pixel_mean)


def knn_imputation(x_train, mask_train, x, mask, n_neighbors=5):
    """scikit-learn's ``KNNImputer``: each missing pixel the mean of its k nearest training rows.

    Neighbours are found by the NaN-aware Euclidean distance on the pixels both rows observe.
    x_train: [M, D]; mask_train: [M, D] bool or None; returns [N, D] on x's device.
    """
    from sklearn.impute import KNNImputer

    mask_train = torch.ones_like(x_train, dtype=torch.bool) if mask_train is None else mask_train
    train = torch.where(mask_train, x_train, float("nan")).double().cpu().numpy()
    test = torch.where(mask, x, float("nan")).double().cpu().numpy()
    # keep_empty_features: a pixel never observed in training must keep its column (filled with 0)
    imputer = KNNImputer(n_neighbors=n_neighbors, keep_empty_features=True).fit(train)
    imputed = torch.as_tensor(np.asarray(imputer.transform(test)), dtype=x.dtype, device=x.device)
    return torch.where(mask, fill_missing(x, mask), imputed)
