"""Annealed importance sampling (AIS) and bidirectional Monte Carlo (BDMC): log p(x) per datapoint.

AIS (Neal 2001) walks K chains per datapoint through π_t(z) ∝ f_0(z)^(1-β_t) p(x, z)^β_t, with
f_0 = p(z) (no guide) or q(z | x), 0 = β_0 < ... < β_T = 1, one HMC transition per temperature; the
weights Π_t (p(x, z_{t-1}) / f_0(z_{t-1}))^(β_t - β_{t-1}) are unbiased for p(x), so log-mean-exp
over K is a stochastic lower bound. Run backwards from an exact posterior sample (simulated data)
it gives a stochastic upper bound: the BDMC sandwich (Grosse et al. 2015; Wu et al. 2017).
Works for any Pyro program whose continuous latents live in the data plate: latents are read from
a trace, moved to unconstrained space, and each energy is one vectorised trace over K × n chains.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from torch.distributions import biject_to

from ppl_lvm import compiled, densities, program, progress
from ppl_lvm.particles import (
    SEED_BLOCK_ROWS, LogMarginalEstimate, _RunningWeights, default_memory_bytes, noise_from_cpu,
    seed_all, trace_bytes, vectorize,
)
from ppl_lvm.program import frame_of as data_frame
from ppl_lvm.program import inspect_program, names_keywords, plate_nesting, sample_sites
from ppl_lvm.vocabulary import renamed

SCHEDULES = ("sigmoid", "linear")
# Wu et al.'s BDMC code: ε ← 1.02 ε above the target acceptance, ε / 1.02 below (their 0.98)
STEP_SIZE_FACTOR = 1.02
STEP_SIZE_RANGE = (1e-4, 1.0)
# autograd keeps every activation of a trace for the backward pass: a rough allowance per unit
_GRAD_FACTOR = 16


@dataclasses.dataclass(repr=False)
class AISEstimate(LogMarginalEstimate):
    """``LogMarginalEstimate`` of AIS, plus what the chains did.

    log_px: [N] log (1/K) Σ_k w_{k,n}; ess: [N] ESS of the final weights.
    num_steps: T temperatures; log_weights: [K, N] the chains' final log weights.
    acceptance: [N] HMC acceptance probability averaged over chains and temperatures.
    step_size: [N] the adapted leapfrog step size ε_n at the end.
    compiled: with compile=...: the recorded log-density's graphs, compile time, evaluations on
        each path (``ppl_lvm.compiled.CompiledDensity.summary``); None when it ran eagerly.
    """

    num_steps: int | None = None
    log_weights: torch.Tensor | None = None
    acceptance: torch.Tensor | None = None
    step_size: torch.Tensor | None = None
    compiled: str | None = None

    def __repr__(self):
        return (f"AISEstimate(K={self.num_samples}, T={self.num_steps}, N={self.log_px.numel()}, "
                f"mean={self.mean:.4f} ± {self.stderr:.4f}, "
                f"mean acceptance={self.acceptance.mean().item():.2f})")


@dataclasses.dataclass
class BDMCResult:
    """The BDMC sandwich per datapoint: lower ≤ log p(x_n) ≤ upper (each in expectation).

    lower: [N] forward AIS, log (1/K) Σ_k w_k (a stochastic lower bound).
    upper: [N] reverse AIS from an exact posterior sample, -log (1/K) Σ_k w̃_k (a stochastic upper
        bound, since E w̃ = 1 / p(x)).
    x: [N, ...] the data the sandwich is for (simulated when not given); z: {site: [N, ...]} the
        exact posterior samples reverse AIS started from.
    forward, reverse: the two ``AISEstimate`` (reverse.log_px holds ``upper``).
    """

    lower: torch.Tensor
    upper: torch.Tensor
    x: torch.Tensor
    z: dict[str, torch.Tensor]
    forward: AISEstimate
    reverse: AISEstimate

    @property
    def gap(self) -> torch.Tensor:
        """[N] upper - lower: a bound on each estimate's error (≥ 0 in expectation)."""
        return self.upper - self.lower

    def __repr__(self):
        return (f"BDMCResult(N={self.lower.numel()}, K={self.forward.num_samples}, "
                f"T={self.forward.num_steps}, lower={self.lower.mean().item():.4f}, "
                f"upper={self.upper.mean().item():.4f}, gap={self.gap.mean().item():.4f})")


def schedule_betas(num_steps, schedule="sigmoid", *, delta=4.0, dtype=torch.float64, device=None):
    """Inverse temperatures 0 = β_0 < β_1 < ... < β_T = 1: [T + 1].

    "sigmoid" (Wu et al. 2017): β_t ∝ σ(δ (2t / T - 1)), rescaled to [0, 1]: small steps near both
    ends, where the intermediate distributions change fastest. "linear": β_t = t / T.
    A 1-d tensor of increasing values from 0 to 1 is returned as given.
    """
    if isinstance(schedule, torch.Tensor):
        betas = schedule.to(dtype=dtype, device=device)
        if (betas.dim() != 1 or betas.numel() < 2 or betas[0] != 0 or betas[-1] != 1
                or (betas[1:] < betas[:-1]).any()):
            raise ValueError("a schedule given as a tensor must rise from 0 to 1: [T + 1]")
        return betas
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps (T) must be an integer ≥ 1, got {num_steps!r}")
    if schedule == "linear":
        return torch.linspace(0, 1, int(num_steps) + 1, dtype=dtype, device=device)
    if schedule == "sigmoid":
        if num_steps == 1:
            return torch.tensor([0.0, 1.0], dtype=dtype, device=device)
        s = torch.sigmoid(torch.linspace(-delta, delta, int(num_steps) + 1, dtype=dtype,
                                         device=device))
        return (s - s[0]) / (s[-1] - s[0])
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES} or pass a tensor")


@program.in_evaluation_mode
@torch.no_grad()
def ais_log_marginal(model: Callable[..., Any], guide: Callable[..., Any] | None,
                     x: torch.Tensor, *args: Any, num_temperatures: int | None = None,
                     num_samples: int = 16, schedule: str | torch.Tensor = "sigmoid",
                     leapfrog_steps: int = 5, step_size: float = 0.1, target_accept: float = 0.65,
                     plate_name: str | None = None, seed: int | None = None,
                     memory_bytes: int | None = None, chunk_size: int | None = None,
                     idx: torch.Tensor | None = None, compile: bool | str = False,
                     num_steps: int | None = None,
                     per_row: int | str | tuple[int | str, ...] | None = None,
                     **model_kwargs: Any) -> AISEstimate:
    """Per-datapoint AIS estimates of log p(x_n): K chains per datapoint, T temperatures.

    Args:
        model, guide: Pyro programs called as ``model(x, *args, **model_kwargs)`` (``args`` are
            passed by the names the model's signature gives them); the latents are the
            model's unobserved sample sites, continuous and inside ``pyro.plate(plate_name)``.
            ``guide`` None anneals from the prior p(z) to p(z | x); a guide q(z | x) (same latent
            sites; gets ``idx`` when it accepts it) anneals from q(z | x) instead.
        x: [N, ...] the data; results follow its device.
        num_temperatures (old name ``num_steps``): T, the number of temperatures after β_0 = 0
            (one HMC transition each); default 500.
        num_samples: K independent chains per datapoint.
        schedule: "sigmoid", "linear" or a [T + 1] tensor of β's (see ``schedule_betas``).
        leapfrog_steps: L leapfrog steps per HMC transition (≈ L gradient evaluations of the
            model per temperature and chain).
        step_size: the initial leapfrog step ε, adapted per datapoint after every transition:
            ×1.02 when the K chains' mean acceptance probability exceeds ``target_accept``, ÷1.02
            otherwise (Wu et al.'s BDMC code), within ``STEP_SIZE_RANGE``. ε_t depends on the
            chains' past only, as is usual in AIS practice.
        plate_name: the plate over datapoints.
        seed: optional int. Rows are drawn in blocks of ``SEED_BLOCK_ROWS``, each block's
            randomness from its own stream seeded by (seed, block), so the answer does not
            depend on chunk_size or memory_bytes; every stream is the CPU's generator (draws
            moved to x's device: ``particles.noise_from_cpu``), so it does not depend on the
            device either, up to float error. Without a seed the global RNG is used.
        memory_bytes: rough budget per vectorised call, with the backward pass (default: the
            estimators' one default, ``particles.default_memory_bytes``: 64 MiB on the CPU,
            1 GiB on a GPU; the seeded answer does not depend on it).
        chunk_size: rows per vectorised call (all K chains of a row are always in one call);
            None picks it from ``memory_bytes``.
        idx: optional [N] long, the rows' indices, for a per-datapoint guide.
        compile: record the annealed log-density and its gradient in z once per chunk shape as
            a graph (the traces, the density kernel's sums and the backward pass) and replay it
            at every leapfrog step instead of re-tracing the program
            (``ppl_lvm.compiled.CompiledDensity``; checked against eager on its first call,
            eager after one warning line when it cannot be recorded): False (default), True
            or "auto" (on when a chunk takes at least ``compiled.AUTO_MIN_EVALUATIONS``
            evaluations, T × L). The seeded answer is eager's up to float rounding.
        per_row: which further arguments are per-row (sliced with x's rows as AIS runs them in
            chunks): keyword names, or positions in ``args``; the others are passed whole. A
            tensor argument with N rows that ``per_row`` does not mention is refused in one line
            (it could be either); ``per_row=()`` passes every one whole.
        **model_kwargs: passed to model and guide by keyword.

    Returns:
        ``AISEstimate``: log_px [N], ess [N], log_weights [K, N], acceptance [N], step_size [N].

    Raises:
        ValueError naming the site: a discrete latent, a latent outside the data plate, a guide
        whose sites differ from the model's latents.
    """
    num_steps = renamed("num_temperatures", num_temperatures, "num_steps", num_steps, 500)
    model_kwargs = _rows_of(_with_positional(model, args, model_kwargs), args, per_row,
                            x.shape[0])
    return _run_ais(model, guide, x, num_steps=num_steps, num_samples=num_samples,
                    schedule=schedule, leapfrog_steps=leapfrog_steps, step_size=step_size,
                    target_accept=target_accept, plate_name=plate_name, seed=seed,
                    memory_bytes=memory_bytes, chunk_size=chunk_size, idx=idx,
                    model_kwargs=model_kwargs, compile=compile)


class RowKwargs(dict):
    """The model's keyword arguments, knowing which are per-row (``rows``: sliced with x)."""

    rows = frozenset()


def _rows_of(model_kwargs, args, per_row, num_rows, caller="ais_log_marginal"):
    """``model_kwargs`` as ``RowKwargs``: the names ``per_row`` declares (keyword names, or
    positions in ``args``, whose names come first in ``model_kwargs``) are per-row; an undeclared
    tensor with ``num_rows`` rows is refused when x has more than one row."""
    kwargs = RowKwargs(model_kwargs)
    positional = list(model_kwargs)[:len(args)]
    declared = set()
    for entry in program.per_row_entries(per_row, len(positional)):
        if isinstance(entry, int):
            entry = positional[entry]
        if entry not in kwargs:
            raise ValueError(f"per_row names {entry!r}, which is not among the model's arguments "
                             f"{sorted(kwargs)}")
        value = kwargs[entry]
        if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != num_rows:
            raise ValueError(f"per_row names {entry!r}, but it has no first dim of {num_rows} "
                             "rows like x")
        declared.add(entry)
    if per_row is None and num_rows > 1:
        for name, value in kwargs.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == num_rows:
                raise ValueError(
                    f"{caller}: the model's argument {name!r} has {num_rows} rows like x, and AIS "
                    f"runs x's rows in chunks: say per_row=({name!r},) if its row n belongs to "
                    "x[n], or per_row=() to pass it whole to every chunk")
    kwargs.rows = frozenset(declared)
    return kwargs


def _with_positional(model, args, model_kwargs):
    """``args`` after x merged into ``model_kwargs`` by the model's parameter names."""
    positional = program.args_as_keywords(model, args)
    both = sorted(set(positional) & set(model_kwargs))
    if both:
        raise TypeError(f"the model's argument {both[0]!r} was given both by position and by "
                        "keyword")
    return {**positional, **model_kwargs}


@program.in_evaluation_mode
@torch.no_grad()
def bdmc(model: Callable[..., Any], guide: Callable[..., Any] | None = None, *,
         x: torch.Tensor | None = None, z: torch.Tensor | dict[str, torch.Tensor] | None = None,
         num_data: int | None = None, data_shape: Sequence[int] | None = None,
         device: str | torch.device | None = None, num_temperatures: int | None = None,
         num_samples: int = 16, schedule: str | torch.Tensor = "sigmoid",
         leapfrog_steps: int = 5, step_size: float = 0.1, target_accept: float = 0.65,
         plate_name: str | None = None, seed: int | None = None, memory_bytes: int | None = None,
         chunk_size: int | None = None, compile: bool | str = False,
         num_steps: int | None = None,
         per_row: int | str | tuple[int | str, ...] | None = None,
         **model_kwargs: Any) -> BDMCResult:
    """Bidirectional Monte Carlo: forward AIS (a lower bound), reverse AIS (an upper) on log p(x_n).

    Reverse AIS needs an exact sample from p(z | x_n); two ways to have one:
      * simulate: leave x and z None and give ``num_data`` N and ``data_shape`` (one datapoint's
        shape): (x_n, z_n) ~ p(x, z) ancestrally (the model is run under ``poutine.uncondition``
        on a zero template [N, *data_shape]); then z_n ~ p(z | x_n) exactly. The observed site
        holding x is the one whose value is the template itself (``obs=x``).
      * give both x [N, ...] and z: {site: [N, ...]} (or one tensor when there is one latent
        site) drawn from the exact posterior, e.g. PPCA's ``exact_posterior``.

    Args:
        model, guide, plate_name, schedule, num_temperatures (T; old name num_steps),
            num_samples (K), leapfrog_steps, step_size, target_accept, memory_bytes,
            chunk_size, compile, per_row, **model_kwargs: as in
            ``ais_log_marginal``; both directions use the same schedule, reversed.
        device: where simulated data go (default: CPU).
        seed: optional int; seeds the simulation and both runs (from the CPU's generator on
            any device, as ``ais_log_marginal``).

    Returns:
        ``BDMCResult``: lower [N], upper [N], gap [N], x, z, forward, reverse.
    """
    num_steps = renamed("num_temperatures", num_temperatures, "num_steps", num_steps, 500)
    if z is None:
        if x is not None:
            raise ValueError("bdmc needs exact posterior samples z with x; pass both, or neither "
                             "(with num_data and data_shape) to simulate (x, z) from the model")
        if num_data is None or data_shape is None:
            raise ValueError("to simulate data, bdmc needs num_data (N) and data_shape (the shape "
                             "of one datapoint, e.g. (784,))")
        x, z = simulate(model, num_data, data_shape, plate_name=plate_name, device=device,
                        seed=seed, **model_kwargs)
    else:
        if x is None:
            raise ValueError("bdmc got z without x; pass the x the samples z were drawn for")
        model_kwargs = _rows_of(model_kwargs, (), per_row, x.shape[0], caller="bdmc")
        if isinstance(z, torch.Tensor):
            names = _latent_names(model, x, model_kwargs)
            if len(names) != 1:
                raise ValueError(f"the model has latent sites {names}: pass z as a dict")
            z = {names[0]: z}
    if not isinstance(model_kwargs, RowKwargs):  # simulated x
        model_kwargs = _rows_of(model_kwargs, (), per_row, x.shape[0], caller="bdmc")
    common = dict(num_steps=num_steps, num_samples=num_samples, schedule=schedule,
                  leapfrog_steps=leapfrog_steps, step_size=step_size, target_accept=target_accept,
                  plate_name=plate_name, seed=seed, memory_bytes=memory_bytes,
                  chunk_size=chunk_size, idx=None, model_kwargs=model_kwargs, compile=compile)
    forward = _run_ais(model, guide, x, **common)
    if seed is not None:  # the reverse chains draw their own noise
        common["seed"] = int(np.random.SeedSequence([int(seed), 1 << 21]).generate_state(1)[0])
    reverse = _run_ais(model, guide, x, posterior=z, **common)
    return BDMCResult(forward.log_px, reverse.log_px, x, z, forward, reverse)


@torch.no_grad()
def simulate(model, num_data, data_shape, *, plate_name=None, device=None, seed=None,
             **model_kwargs):
    """(x, z) ~ p(x, z) with N = num_data rows: x [N, *data_shape], z {latent site: [N, ...]}.

    The model runs once on a zero template x and once under ``poutine.uncondition`` (observed
    sites sampled); the observed site whose value is the template (``obs=x``) gives the new x. It
    must be the only observed site, and the model must use x only as that site's ``obs``.
    """
    template = torch.zeros((int(num_data),) + tuple(data_shape), device=device)
    with _forked_rng(template.device, seed is not None), noise_from_cpu(
            template.device if seed is not None else "cpu"):
        if seed is not None:
            seed_all(_block_seed(seed, 1 << 20))
        trace = poutine.trace(model).get_trace(template, **model_kwargs)
        names = [name for name, site in sample_sites(trace).items()
                 if site["is_observed"] and site["value"] is template]
        if len(names) != 1:
            raise ValueError("cannot tell which observed site holds x (none or several have "
                             "obs=x); simulate (x, z) yourself and pass both to bdmc")
        others = [name for name, site in sample_sites(trace).items()
                  if site["is_observed"] and name != names[0]]
        if others:  # their simulated values would not be what the model computes from x
            raise ValueError(f"observed sites {others} besides x {names[0]!r}: simulate (x, z) "
                             "yourself and pass both to bdmc")
        simulated = poutine.trace(poutine.uncondition(model)).get_trace(template, **model_kwargs)
    sites = sample_sites(trace)
    x = simulated.nodes[names[0]]["value"].detach().reshape(template.shape)
    if plate_name is None:
        plate_name = inspect_program(model, x, **model_kwargs).plate_name
    z = {name: simulated.nodes[name]["value"].detach()
         for name, site in sites.items() if not site["is_observed"]}
    for name, value in z.items():
        if data_frame(sites[name], plate_name) is None:
            raise ValueError(f"latent site {name!r} is outside the data plate {plate_name!r}")
    return x, z


def _latent_names(model, x, model_kwargs):
    """The model's latent site names, in trace order."""
    trace = poutine.trace(model).get_trace(x[:1], **_slice_kwargs(model_kwargs, x.shape[0],
                                                                  slice(0, 1)))
    return [name for name, site in sample_sites(trace).items() if not site["is_observed"]]


# ----------------------------------------------------------------------------------------------
# the driver: chunks of rows, seeds by row block


def _vectorisation_refused(run):
    """AIS runs model and guide vectorised over its K chains (a plate of K particles left of the
    program's plates, as Pyro's vectorised ELBOs do). A program that cannot be (it indexes or
    reshapes assuming its own batch shape, a BatchNorm1d fed [K, B, D]) is run again with a loop
    over the chains (one trace per chain: K times slower, the same answer); where even that fails,
    it is refused in one line that says so, not with the raw error from inside the program."""
    @functools.wraps(run)
    def checked(model, guide, x, **kwargs):
        try:
            return run(model, guide, x, **kwargs)
        except (IndexError, RuntimeError) as error:
            failed = _fails_vectorised(model, guide, x, kwargs.get("model_kwargs") or {})
            if failed is None:
                raise
            try:
                return run(model, guide, x, loop_chains=True, **kwargs)
            except (IndexError, RuntimeError):
                pass
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(
                f"AIS runs the {failed} vectorised over its K chains and this program cannot be "
                f"({type(error).__name__}: {reason}); estimate log p(x) with method='iwae' "
                "(importance sampling loops over particles when vectorising fails), or write "
                "the program to broadcast over leading batch dims") from error
    return checked


def _fails_vectorised(model, guide, x, model_kwargs):
    """'model' or 'guide' when that program fails on two rows under a plate of 2 particles but
    runs without it; None otherwise."""
    rows = x[:2]
    kwargs = _slice_kwargs(model_kwargs, x.shape[0], slice(0, 2))
    for role, fn in (("guide", guide), ("model", model)):
        if fn is None:
            continue
        try:
            nesting = plate_nesting(program.trace_of(fn, rows, **kwargs))
        except Exception:
            return None
        try:
            program.trace_of(vectorize(fn, 2, nesting, x.device), rows, **kwargs)
        except Exception:
            return role
    return None


@_vectorisation_refused
def _run_ais(model, guide, x, *, num_steps, num_samples, schedule, leapfrog_steps, step_size,
             target_accept, plate_name, seed, memory_bytes, chunk_size, idx, model_kwargs,
             posterior=None, loop_chains=False, compile=False):
    _check_inputs(x, num_samples, leapfrog_steps, step_size, target_accept, chunk_size, idx)
    num_rows, device = x.shape[0], x.device
    betas = schedule_betas(num_steps, schedule, device=device)
    if posterior is not None:
        betas = betas.flip(0)
    if idx is None:
        idx = torch.arange(num_rows, device=device)
    memory_bytes = default_memory_bytes(device) if memory_bytes is None else int(memory_bytes)
    if plate_name is None:  # the plate over the rows, whatever its name (ppl_lvm.program)
        plate_name = inspect_program(model, x, **model_kwargs).plate_name
    # seeded, the f_0 draws (guide or prior, seeded per block by seed_all) come from the CPU's
    # generator on any device, as the HMC noise does (_Noise)
    with _forked_rng(device, seed is not None), noise_from_cpu(device if seed is not None
                                                               else "cpu"):
        target = _Target(model, guide, x, plate_name, idx.to(device), model_kwargs)
        target.loop = loop_chains
        # T - 1 transitions of L gradients each, and the first state's
        target.compiled = compiled.compile_density(
            target.evaluate_given, compile, (betas.numel() - 2) * int(leapfrog_steps) + 1)
        if posterior is not None:
            posterior = target.match_posterior(posterior)
        rows_per_call = chunk_size or max(
            1, min(num_rows, memory_bytes // max(1, target.bytes_per_unit * num_samples)))
        log_weights, acceptance, step_sizes = [], [], []
        num_calls = -(-num_rows // rows_per_call)
        description = "reverse AIS" if posterior is not None else "AIS"
        with progress.phase(f"{description}, {num_rows} rows x {num_samples} chains",
                            num_calls * (betas.numel() - 1), unit="temperature"):
            for start in range(0, num_rows, rows_per_call):
                rows = slice(start, min(start + rows_per_call, num_rows))
                noise = _Noise(seed, rows, device)
                result = _anneal(target, rows, num_samples, betas, leapfrog_steps, step_size,
                                 target_accept, noise, posterior)
                log_weights.append(result[0])
                acceptance.append(result[1])
                step_sizes.append(result[2])
    log_weights = torch.cat(log_weights, -1)  # [K, N]
    if posterior is not None:  # reverse weights estimate 1 / p(x): upper = -log mean w̃
        log_px = -(torch.logsumexp(log_weights, 0) - math.log(num_samples))
    else:
        log_px = torch.logsumexp(log_weights, 0) - math.log(num_samples)
    ess = (2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0)).exp()
    ess = ess.nan_to_num(1.0).clamp(1.0, num_samples)
    method = "ais-reverse" if posterior is not None else "ais"
    # the Monte Carlo error of log mean_k w_k (and of its negative, the reverse bound), by the
    # delta method from the K chains' own weights, as for importance sampling
    totals = _RunningWeights(num_samples)
    totals.add(log_weights)
    return AISEstimate(log_px=log_px, ess=ess, method=method, num_samples=num_samples,
                       mc_stderr=totals.stderr(),
                       rows_per_call=rows_per_call, particles_per_call=num_samples,
                       num_steps=betas.numel() - 1, log_weights=log_weights,
                       acceptance=torch.cat(acceptance), step_size=torch.cat(step_sizes),
                       compiled=None if target.compiled is None else target.compiled.summary())


def _check_inputs(x, num_samples, leapfrog_steps, step_size, target_accept, chunk_size, idx):
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError("x must be a torch.Tensor [N, ...] with N ≥ 1 rows")
    for name, value in (("num_samples (K)", num_samples), ("leapfrog_steps (L)", leapfrog_steps)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size!r}")
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must lie in (0, 1), got {target_accept!r}")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if idx is not None and tuple(idx.shape) != (x.shape[0],):
        raise ValueError(f"idx must have shape [{x.shape[0]}] to match x, got {tuple(idx.shape)}")


def _forked_rng(device, active):
    """A seeded run leaves the global RNG (CPU, and x's CUDA device) as it found it."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=active)


def _block_seed(seed, block):
    state = np.random.SeedSequence([int(seed), block]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


class _Noise:
    """Randomness for rows [start, stop): per seed block of SEED_BLOCK_ROWS rows, each block's draws
    from its own stream and sliced to the rows of this call (so chunking cannot change them).
    Seeded, the streams are CPU generators whatever the device (the draws are moved to it)."""

    def __init__(self, seed, rows, device):
        self.rows, self.device, self.seed = rows, device, seed
        if seed is None:
            self.blocks = None
            return
        first, last = rows.start // SEED_BLOCK_ROWS, (rows.stop - 1) // SEED_BLOCK_ROWS
        self.blocks = []
        for block in range(first, last + 1):
            # the CPU's generator on every device, its draws moved to the device: a seeded answer
            # is then the same on a GPU as on the CPU (up to float error)
            generator = torch.Generator()
            generator.manual_seed(_block_seed(seed, block))
            lo, hi = block * SEED_BLOCK_ROWS, (block + 1) * SEED_BLOCK_ROWS
            self.blocks.append((block, generator, max(lo, rows.start) - lo,
                                min(hi, rows.stop) - lo))

    def draw(self, kind, shape, data_dim, dtype):
        """A [*shape] tensor of N(0, 1) ("normal") or U(0, 1) ("uniform") draws; shape[data_dim]
        is this call's number of rows."""
        sampler = torch.randn if kind == "normal" else torch.rand
        if self.blocks is None:
            return sampler(shape, dtype=dtype, device=self.device)
        parts = []
        for _, generator, lo, hi in self.blocks:
            block_shape = list(shape)
            block_shape[data_dim] = SEED_BLOCK_ROWS
            part = sampler(block_shape, generator=generator, dtype=dtype)
            parts.append(part.narrow(data_dim, lo, hi - lo))
        return torch.cat(parts, data_dim).to(self.device)

    def block_rows(self):
        """(block seed, rows of the whole block, slice of this call's rows within them) per block;
        without a seed one block: the call's rows."""
        if self.blocks is None:
            return [(None, self.rows, slice(0, self.rows.stop - self.rows.start))]
        return [(_block_seed(self.seed, block) ^ 0x5EED,
                 slice(block * SEED_BLOCK_ROWS, (block + 1) * SEED_BLOCK_ROWS),
                 slice(lo, hi)) for block, _, lo, hi in self.blocks]


# ----------------------------------------------------------------------------------------------
# the annealed target: a model/guide pair read from its traces, in unconstrained space


def _slice_kwargs(model_kwargs, num_rows, rows):
    """The per-row arguments (``RowKwargs.rows``, declared, never guessed) sliced to ``rows``."""
    per_row = getattr(model_kwargs, "rows", frozenset())
    return {key: value[rows] if key in per_row else value for key, value in model_kwargs.items()}


@dataclasses.dataclass
class _Site:
    name: str
    transform: object     # biject_to(support): unconstrained u -> z
    event_dim: int        # the site's event dims (of z)
    data_dim: int         # the data plate's dim in u, counted from the right (negative)


class _Target:
    """log π_β(u) = log f_0(z) + log |dz/du| + β (log p(x, z) - log f_0(z)).

    loop: trace each chain on its own (no particle plate), for a program that cannot be
    vectorised over the chains."""

    loop = False
    compiled = None  # a compiled.CompiledDensity replaying evaluate_given, or None: eager

    def __init__(self, model, guide, x, plate_name, idx, model_kwargs):
        self.model, self.guide, self.x, self.plate_name = model, guide, x, plate_name
        self.idx, self.model_kwargs = idx, model_kwargs
        self.guide_takes_idx = guide is not None and names_keywords(guide, "idx")
        self._probe()

    def args(self, rows):
        kwargs = _slice_kwargs(self.model_kwargs, self.x.shape[0], rows)
        guide_kwargs = dict(kwargs, idx=self.idx[rows]) if self.guide_takes_idx else kwargs
        return self.x[rows], kwargs, guide_kwargs

    def _probe(self):
        rows = slice(0, min(self.x.shape[0], 2))
        x, kwargs, guide_kwargs = self.args(rows)
        model_trace = poutine.trace(self.model).get_trace(x, **kwargs)
        traces = [model_trace]
        latents = {name: site for name, site in sample_sites(model_trace).items()
                   if not site["is_observed"]}
        if not latents:
            raise ValueError("the model has no latent sample sites: log p(x) needs no AIS")
        for name, site in latents.items():
            if data_frame(site, self.plate_name) is None:
                raise ValueError(f"latent site {name!r} is outside the data plate "
                                 f"{self.plate_name!r}: AIS here anneals per-datapoint latents "
                                 "only (integrate a global latent out, or fix it as a parameter)")
            if site["fn"].support.is_discrete:
                raise ValueError(f"latent site {name!r} is discrete ({type(site['fn']).__name__}):"
                                 " HMC needs continuous latents (sum it out in the model, e.g. "
                                 "with enumeration, or use estimators' importance sampling)")
        for name, site in sample_sites(model_trace).items():
            if site["is_observed"] and data_frame(site, self.plate_name) is None:
                raise ValueError(f"observed site {name!r} is outside the data plate "
                                 f"{self.plate_name!r}: log p(x) does not split per datapoint")
        if self.guide is not None:
            guide_trace = poutine.trace(self.guide).get_trace(x, **guide_kwargs)
            traces.append(guide_trace)
            guide_latents = set(sample_sites(guide_trace))
            if guide_latents != set(latents):
                raise ValueError(
                    f"the guide's sites do not match the model's latent sites: missing from the "
                    f"guide {sorted(set(latents) - guide_latents)}, in the guide but not latent "
                    f"in the model {sorted(guide_latents - set(latents))}")
        self.nesting = plate_nesting(*traces)
        self.sites, self._u_event_dim = [], {}
        for name, site in latents.items():
            transform = biject_to(site["fn"].support)
            event_dim = len(site["fn"].event_shape)
            unconstrained = transform.inv(site["value"])
            u_event_dim = event_dim + unconstrained.dim() - site["value"].dim()
            self._u_event_dim[name] = u_event_dim
            self.sites.append(_Site(name, transform, event_dim,
                                    data_frame(site, self.plate_name).dim - u_event_dim))
        # memory per (chain, row): the vectorised traces' tensors, times an allowance for autograd
        self.bytes_per_unit = max(1, _GRAD_FACTOR * trace_bytes(traces) // (rows.stop - rows.start))

    def match_posterior(self, posterior):
        """{site: [N, ...]} exact posterior samples, checked against the latent sites."""
        names = [site.name for site in self.sites]
        if set(posterior) != set(names):
            raise ValueError(f"z must hold exactly the latent sites {names}, got "
                             f"{sorted(posterior)}")
        for name, value in posterior.items():
            if value.shape[0] != self.x.shape[0]:
                raise ValueError(f"z[{name!r}] has {value.shape[0]} rows, x has {self.x.shape[0]}")
        return {name: value.to(self.x.device) for name, value in posterior.items()}

    def initial(self, rows, num_samples, noise, posterior=None):
        """u [K, ...] per site for the call's rows: f_0 draws, or the posterior sample repeated.

        posterior: {site: value} laid out as the model's own (unvectorised) trace lays the site
        out on all N rows, e.g. [N, M] for a site in the data plate with event dim M.
        """
        if posterior is not None:
            start = {}
            for site in self.sites:
                u = site.transform.inv(posterior[site.name])
                while u.dim() < self.nesting + self._u_event_dim[site.name]:
                    u = u.unsqueeze(0)
                u = u.narrow(u.dim() + site.data_dim, rows.start, rows.stop - rows.start)
                start[site.name] = u.unsqueeze(0).expand((num_samples,) + u.shape).contiguous()
            return start
        parts = {site.name: [] for site in self.sites}
        for block_seed, block_rows, within in noise.block_rows():
            block_rows = slice(block_rows.start, min(block_rows.stop, self.x.shape[0]))
            if block_seed is not None:
                seed_all(block_seed)
            x, kwargs, guide_kwargs = self.args(block_rows)
            program = self.guide if self.guide is not None else self.model
            call_kwargs = guide_kwargs if self.guide is not None else kwargs
            if self.loop:  # one trace per chain, stacked: [K, ...]
                traces = [poutine.trace(program).get_trace(x, **call_kwargs)
                          for _ in range(num_samples)]
                draws = {site.name: torch.stack([t.nodes[site.name]["value"].detach()
                                                 for t in traces]) for site in self.sites}
            else:
                program = vectorize(program, num_samples, self.nesting, x.device)
                trace = poutine.trace(program).get_trace(x, **call_kwargs)
                draws = {site.name: trace.nodes[site.name]["value"].detach()
                         for site in self.sites}
            for site in self.sites:
                u = site.transform.inv(draws[site.name])
                parts[site.name].append(u.narrow(u.dim() + site.data_dim, within.start,
                                                 within.stop - within.start))
        return {site.name: torch.cat(parts[site.name], site.data_dim).contiguous()
                for site in self.sites}

    def _trace(self, call, num_samples, values, program="model"):
        x, kwargs, guide_kwargs = call
        fn = self.model if program == "model" else self.guide
        if not self.loop:
            fn = vectorize(fn, num_samples, self.nesting, x.device)
        return densities.trace_given(fn, values, (x,),
                                     kwargs if program == "model" else guide_kwargs)

    def _per_row(self, site_record, tensor, num_rows):
        """A [K, *batch] tensor of a site folded to [K, n] (plates other than data summed)."""
        folded = densities.fold(site_record, tensor, self.plate_name, self.nesting)
        return folded.reshape(-1, num_rows)

    def log_densities(self, rows, u, call=None):
        """(log f_0(z) + log |dz/du|, log p(x, z) - log f_0(z)): each [K, n], differentiable.
        call: the rows' (x, model kwargs, guide kwargs), default ``self.args(rows)``."""
        call = self.args(rows) if call is None else call
        num_samples = next(iter(u.values())).shape[0]
        if not self.loop:
            return self._log_densities(call, u, num_samples)
        parts = [self._log_densities(call, {name: value[k] for name, value in u.items()}, 1)
                 for k in range(num_samples)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _log_densities(self, call, u, num_samples):
        num_rows = call[0].shape[0]
        values = {site.name: site.transform(u[site.name]) for site in self.sites}
        model_trace = self._trace(call, num_samples, values)
        nodes = sample_sites(model_trace)
        latent = densities.split(model_trace, self.plate_name, self.nesting, scaled=False,
                                 sites=lambda name, site: name in values)
        observed = densities.split(model_trace, self.plate_name, self.nesting, scaled=False,
                                   sites=lambda name, site: name not in values)
        for terms in (latent, observed):
            densities.refuse_globals(terms.global_terms, model_trace, self.plate_name, (), "model")
        log_prior = latent.rows.reshape(-1, num_rows)
        log_likelihood = observed.rows.reshape(-1, num_rows)
        log_det = 0.0
        for site in self.sites:
            z = values[site.name]
            jacobian = site.transform.log_abs_det_jacobian(u[site.name], z)
            batch_dims = z.dim() - site.event_dim
            if jacobian.dim() > batch_dims:
                jacobian = jacobian.sum(list(range(batch_dims - jacobian.dim(), 0)))
            log_det = log_det + self._per_row(dict(nodes[site.name], mask=None), jacobian,
                                              num_rows)
        if self.guide is None:
            log_base, log_ratio = log_prior, log_likelihood
        else:
            guide_trace = self._trace(call, num_samples, values, program="guide")
            log_base = densities.row_terms(model_trace, guide_trace, self.plate_name, num_rows,
                                           self.nesting)[1]
            log_ratio = log_prior + log_likelihood - log_base
        shape = (num_samples, num_rows)
        return (log_base + log_det).expand(shape), log_ratio.expand(shape)

    def evaluate(self, rows, u, beta, split=False):
        """log_base, log_ratio [K, n] and the gradient of log π_β (or of each term when split);
        from the recorded graph when ``self.compiled`` holds one (``ppl_lvm.compiled``)."""
        if self.compiled is not None:
            return self.compiled(self.args(rows), u, beta, split)
        return self.evaluate_given(self.args(rows), u, beta, split)

    def evaluate_given(self, call, u, beta, split=False):
        """``evaluate`` on the rows' arguments ``call``: (x, model kwargs, guide kwargs)."""
        with torch.enable_grad(), pyro.validation_enabled(False):
            u = {name: value.detach().requires_grad_(True) for name, value in u.items()}
            log_base, log_ratio = self.log_densities(None, u, call)
            inputs = list(u.values())
            if split:
                grads_base = torch.autograd.grad(log_base.sum(), inputs, retain_graph=True,
                                                 allow_unused=True)
                grads_ratio = torch.autograd.grad(log_ratio.sum(), inputs, allow_unused=True)
                grads = (_zeros_for_none(grads_base, inputs), _zeros_for_none(grads_ratio, inputs))
            else:
                grads = _zeros_for_none(torch.autograd.grad(
                    (log_base + beta * log_ratio).sum(), inputs, allow_unused=True), inputs)
        names = list(u)
        if split:
            return (log_base.detach(), log_ratio.detach(), dict(zip(names, grads[0])),
                    dict(zip(names, grads[1])))
        return log_base.detach(), log_ratio.detach(), dict(zip(names, grads))


def _zeros_for_none(grads, inputs):
    return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]


# ----------------------------------------------------------------------------------------------
# HMC transitions and the annealing loop


def _view_rows(values, site, num_rows):
    """A per-row [n] tensor shaped to broadcast against the site's u [K, ..., n, ...]."""
    return values.reshape((num_rows,) + (1,) * (-site.data_dim - 1))


def _per_row_sum(site, tensor, num_rows):
    """Σ of a u-shaped tensor over the site's dims other than chains and rows: [K, n]."""
    moved = tensor.movedim(site.data_dim, -1)
    return moved.reshape(moved.shape[0], -1, num_rows).sum(1)


@dataclasses.dataclass
class _State:
    u: dict                # site -> [K, ...] unconstrained values
    log_base: torch.Tensor  # [K, n]
    log_ratio: torch.Tensor  # [K, n]
    grad_base: dict
    grad_ratio: dict


def _initial_state(target, rows, u):
    log_base, log_ratio, grad_base, grad_ratio = target.evaluate(rows, u, None, split=True)
    return _State(u, log_base, log_ratio, grad_base, grad_ratio)


def hmc_step(target, rows, state, beta, step_size, leapfrog_steps, noise):
    """One HMC transition leaving π_β invariant, every chain: (new state, acceptance prob [K, n]).

    step_size: [n] ε per datapoint (shared by its K chains). Momenta v ~ N(0, I) in unconstrained
    space; L leapfrog steps; Metropolis accept with probability min(1, exp(H_0 - H_L)).
    """
    num_rows = rows.stop - rows.start
    sites = target.sites
    momentum = {site.name: noise.draw("normal", state.u[site.name].shape,
                                      state.u[site.name].dim() + site.data_dim,
                                      state.u[site.name].dtype) for site in sites}
    eps = {site.name: _view_rows(step_size.to(state.u[site.name].dtype), site, num_rows)
           for site in sites}

    def kinetic(v):
        return sum(_per_row_sum(site, v[site.name] ** 2, num_rows) for site in sites) / 2

    energy_start = -(state.log_base + beta * state.log_ratio) + kinetic(momentum)
    u = dict(state.u)
    grad = {name: state.grad_base[name] + beta * state.grad_ratio[name] for name in u}
    v = {name: momentum[name] + eps[name] / 2 * grad[name] for name in u}
    for step in range(leapfrog_steps):
        u = {name: u[name] + eps[name] * v[name] for name in u}
        if step + 1 < leapfrog_steps:
            _, _, grad = target.evaluate(rows, u, beta)
            v = {name: v[name] + eps[name] * grad[name] for name in u}
    log_base, log_ratio, grad_base, grad_ratio = target.evaluate(rows, u, beta, split=True)
    v = {name: v[name] + eps[name] / 2 * (grad_base[name] + beta * grad_ratio[name])
         for name in u}
    energy_end = -(log_base + beta * log_ratio) + kinetic(v)
    accept_prob = (energy_start - energy_end).clamp(max=0).exp().nan_to_num(0.0)
    uniform = noise.draw("uniform", accept_prob.shape, 1, accept_prob.dtype)
    accept = uniform < accept_prob  # [K, n]

    def choose(new, old, site=None):
        mask = accept if site is None else _accept_like(accept, new, site)
        return torch.where(mask, new, old)

    by_name = {site.name: site for site in sites}
    new_state = _State(
        {name: choose(u[name], state.u[name], by_name[name]) for name in u},
        choose(log_base, state.log_base), choose(log_ratio, state.log_ratio),
        {name: choose(grad_base[name], state.grad_base[name], by_name[name]) for name in u},
        {name: choose(grad_ratio[name], state.grad_ratio[name], by_name[name]) for name in u})
    return new_state, accept_prob


def _accept_like(accept, tensor, site):
    """accept [K, n] shaped to broadcast against a site's u [K, ..., n, ...]."""
    trailing = -site.data_dim - 1
    middle = tensor.dim() - 2 - trailing
    return accept.reshape((accept.shape[0],) + (1,) * middle + (accept.shape[1],)
                          + (1,) * trailing)


def _anneal(target, rows, num_samples, betas, leapfrog_steps, step_size, target_accept, noise,
            posterior):
    """AIS along betas for the call's rows: (log weights [K, n], mean acceptance [n], ε [n])."""
    num_rows = rows.stop - rows.start
    device = target.x.device
    u = target.initial(rows, num_samples, noise, posterior)
    state = _initial_state(target, rows, u)
    dtype = state.log_ratio.dtype
    # a float64 running sum: T small increments
    log_weights = torch.zeros(num_samples, num_rows, dtype=torch.float64, device=device)
    step = torch.full((num_rows,), float(step_size), dtype=dtype, device=device)
    acceptance = torch.zeros(num_rows, dtype=dtype, device=device)
    betas = betas.tolist()
    num_transitions = len(betas) - 2
    for t in range(1, len(betas)):
        progress.advance()
        log_weights = log_weights + (betas[t] - betas[t - 1]) * state.log_ratio
        if t == len(betas) - 1:  # no transition after the last temperature
            break
        state, accept_prob = hmc_step(target, rows, state, betas[t], step, leapfrog_steps, noise)
        mean_accept = accept_prob.mean(0)
        acceptance = acceptance + mean_accept
        step = adapt_step_size(step, mean_accept, target_accept)
    acceptance = acceptance / max(num_transitions, 1)
    return log_weights.to(dtype), acceptance, step


def adapt_step_size(step_size, acceptance, target_accept):
    """ε_n ← 1.02 ε_n if the chains' mean acceptance of row n beats the target, else ε_n / 1.02."""
    factor = torch.where(acceptance > target_accept, STEP_SIZE_FACTOR, 1 / STEP_SIZE_FACTOR)
    return (step_size * factor).clamp(*STEP_SIZE_RANGE)
