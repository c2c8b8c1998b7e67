"""Estimators of log p(x), one number per datapoint, for ANY Pyro model/guide pair with a data plate.

The lecture's ladder: naive Monte Carlo from the prior (log mean_k p(x | z_k)), importance sampling
with a proposal q(z | x) (log (1/K) Σ_k p(x, z_k) / q(z_k | x), the IWAE bound), the ELBO
((1/K) Σ_k log p(x, z_k) / q(z_k | x)), and the exact marginal when every latent is discrete.
All of them read off one matrix, ``log_weights`` [K, N]: IWAE is its log-mean-exp over K, the ELBO
its mean. The weights are built site by site from the traces (``ppl_lvm.program`` says which plate
runs over the rows and which sites are local), vectorised over K, chunked over datapoints.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import inspect
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.util import site_is_subsample
from pyro.poutine.messenger import Messenger

from ppl_lvm import compiled, densities, program, progress
from ppl_lvm.ais import ais_log_marginal
from ppl_lvm.objectives import IWAE_ELBO  # noqa: F401  (its old path: ppl_lvm.estimators.IWAE_ELBO)
from ppl_lvm.program import plate_nesting, sample_sites  # noqa: F401  (public here too)
from ppl_lvm.psis import pareto_khat
from ppl_lvm.particles import (  # noqa: F401  (public here too)
    _ACTIVATION_FACTOR, _MODEL_ERRORS, _PARTICLE_PLATE, CPU_MEMORY_BYTES, DEFAULT_MEMORY_BYTES,
    SEED_BLOCK_PARTICLES, SEED_BLOCK_ROWS, LogMarginalEstimate, _plan, _RunningWeights,
    noise_from_cpu,
    _seed_block, default_memory_bytes, trace_bytes, vectorize,
)

METHODS = ("prior", "uniform", "is", "iwae", "elbo", "exact", "ais")
GUIDE_METHODS = ("is", "iwae", "elbo")
GLOBALS = (None, "median", "sample")
_KEPT = []


def keep_freed_memory(device, threshold=1 << 28):
    """On the CPU (glibc), keep freed chunk buffers in the process instead of returning them to
    the OS: each chunk's [K, n, D] tensors would otherwise be mapped afresh and fault in page by
    page (K = 1000 on 200 MNIST images: 0.44 M minor page faults and ~25 % of the CPU time).
    Raises glibc's mmap and trim thresholds to ``threshold`` bytes, once per process."""
    if _KEPT or torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return
    _KEPT.append(True)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
        libc.mallopt(-1, int(threshold))  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def accepts(fn, name):
    """Whether ``fn`` names keyword ``name`` explicitly (see ``ppl_lvm.program.names_keywords``)."""
    return program.names_keywords(fn, name)


def log_marginal(model: Callable[..., Any], guide: Callable[..., Any] | None,
                 x: torch.Tensor | Sequence[torch.Tensor], *args: Any,
                 method: str = "iwae", num_samples: int = 1000,
                 plate_name: str | None = None, chunk_size: int | None = None,
                 seed: int | None = None, idx: torch.Tensor | None = None,
                 memory_bytes: int | None = None,
                 globals: str | dict[str, torch.Tensor] | None = None,
                 num_global_samples: int = 10, num_steps: int | None = None,
                 per_row: str | Sequence[str] | None = None, compile: bool | str = False,
                 num_temperatures: int | None = None, **model_kwargs: Any) -> torch.Tensor:
    """Per-datapoint estimates of log p(x_n): the IWAE / importance-sampling estimator by default.

    Args:
        model, guide: Pyro programs called as ``model(x, *args, **model_kwargs)`` (``args``: the
            model's further positional arguments, e.g. labels y [N]). The plate over the rows
            of x (any name, any dim) is read from the model's trace; every site inside it is local
            to a datapoint. The guide also gets ``idx`` (the rows' indices) when it names it, so
            per-datapoint guides read their own φ_n; ``num_data`` is never passed (no N / B
            scaling at evaluation). ``guide`` may be None for "prior", "uniform" and "exact".
        x: [N, ...] the data; the estimates follow its device.
        method: one of ``METHODS``:
            "prior": log (1/K) Σ_k p(x | z_k), z_k ~ p(z) (naive Monte Carlo);
            "uniform": log (1/K) Σ_k |Z| p(x, z_k), z_k uniform on a finite discrete latent space;
            "is" / "iwae": log (1/K) Σ_k p(x, z_k) / q(z_k | x), z_k ~ q(z | x) (the same number);
            "elbo": (1/K) Σ_k log p(x, z_k) / q(z_k | x);
            "exact": log Σ_z p(x, z) by enumerating discrete latents (K is ignored);
            "ais": annealed importance sampling, K chains of ``num_temperatures`` = T HMC
            transitions (old name ``num_steps``; default 500)
            from q(z | x) (or the prior when ``guide`` is None) to the posterior: a tighter
            stochastic lower bound (``ppl_lvm.ais.ais_log_marginal``; ``ppl_lvm.ais.bdmc`` adds
            the upper bound on simulated data).
        num_samples: K ≥ 1.
        plate_name: the data plate's name, when the model has several plates as long as x.
        chunk_size: rows per vectorised call; None picks it from ``memory_bytes``. With a seed
            the rows are drawn in fixed blocks (``SEED_BLOCK_ROWS``) whatever chunk_size is, so the
            answer does not depend on it.
        seed: optional int; the same seed gives the same answer for any chunk_size. Without one,
            the global RNG is used (``pyro.set_rng_seed``).
        idx: optional [N] long, the rows' indices for a per-datapoint guide (default arange(N)).
        memory_bytes: rough budget per vectorised call (default 64 MiB on the CPU, where smaller
            calls run faster, 1 GiB on a GPU); K is chunked too when K alone exceeds it.
        globals: latent sites outside the data plate (mixture weights, a shared scale) have no
            per-datapoint log p(x_n); by default they are refused. "median": fix them at the
            guide's ``median()`` and estimate log p(x_n | globals); "sample": average
            p(x_n | g_s) over ``num_global_samples`` draws g_s from the guide; a dict
            {site: value}: fix them there (e.g. an autoguide's ``median()``).
        compile: record each chunk's log weights once as a graph and replay it for the other
            chunks of that shape (``ppl_lvm.compiled.CompiledWeights``; checked against eager on
            its first chunk, eager with one warning line when it cannot be recorded): False,
            True, "inductor" (the graph also through ``torch.compile``: fused kernels, after
            seconds of compiling per chunk shape; for long runs) or "auto" (on a GPU for
            K ≥ ``compiled.AUTO_MIN_SAMPLES``). With method="ais"
            it records the annealed log-density and its gradient instead (``ais_log_marginal``'s
            ``compile``).
        **model_kwargs: passed to model and guide; tensors whose first dim is N are sliced with x.

    Returns:
        [N] tensor on x's device. ``estimate_log_marginal`` also gives mean, stderr and ESS.
    """
    return estimate_log_marginal(
        model, guide, x, *args, method=method, num_samples=num_samples, plate_name=plate_name,
        chunk_size=chunk_size, seed=seed, idx=idx, memory_bytes=memory_bytes, globals=globals,
        num_global_samples=num_global_samples, num_steps=num_steps, per_row=per_row,
        compile=compile, num_temperatures=num_temperatures,
        **model_kwargs).log_px


def _rows_of_a_subsampling_model(estimate):
    """Entry-point wrapper: a model that subsamples its own data plate
    (``pyro.plate("data", N, subsample_size=B)``) is scored B given rows at a time
    (``program.given_subsample``: its plate's draw replaced by those rows, the N / B scale undone),
    so every row gets its estimate; the program's own shape checks see the B rows they expect."""
    @functools.wraps(estimate)
    def scoring(model, guide, x, *args, **kwargs):
        try:
            return estimate(model, guide, x, *args, **kwargs)
        except program.SubsampledPlate as plate:
            if kwargs.get("method") == "ais" or plate.num_rows != x.shape[0]:
                raise
            return _score_subsampled(estimate, plate, model, guide, x, args, kwargs)
    return scoring


def _score_subsampled(estimate, plate, model, guide, x, args, kwargs):
    options = {k: v for k, v in kwargs.items() if k in inspect.signature(estimate).parameters}
    model_kwargs = {k: v for k, v in kwargs.items() if k not in options}
    seed, user_idx = options.pop("seed", None), options.pop("idx", None)
    for name in ("chunk_size", "per_row"):
        options.pop(name, None)
    num_rows, size = x.shape[0], plate.subsample_size
    guide_takes_idx = guide is not None and program.names_keywords(guide, "idx")
    parts = []
    for block, start in enumerate(range(0, num_rows, size)):
        first = min(start, num_rows - size)  # a short last block: the last B rows, new ones kept
        rows = torch.arange(first, first + size, device=x.device)

        def given(fn, x_rows):
            # the rows of this block that the estimator passed (all B, or its probe's first few)
            start = next((o for o in range(size - len(x_rows) + 1)
                          if torch.equal(x[rows[o:o + len(x_rows)]], x_rows)), 0)
            part = rows[start:start + len(x_rows)]
            return program.given_subsample(plate.plate_name, part)(fn), part

        def block_model(x_rows, *_, **__):
            fn, _ = given(model, x_rows)
            return fn(x, *args, **model_kwargs)

        def block_guide(x_rows, *_, **__):
            fn, part = given(guide, x_rows)
            if guide_takes_idx:  # a per-datapoint guide (LocalGuide) reads φ of these rows
                return fn(x[part], idx=part if user_idx is None else user_idx.to(x.device)[part])
            return fn(x, *args, **model_kwargs)

        with program.subsamples_given():
            estimate_ = estimate(block_model, None if guide is None else block_guide, x[rows],
                                 seed=None if seed is None else seed + block, chunk_size=size,
                                 **options)
        parts.append((estimate_, start - first))
    first = parts[0][0]

    def joined(name):
        values = [getattr(e, name) for e, _ in parts]
        if any(v is None for v in values):
            return None
        return torch.cat([v[skip:] for v, (_, skip) in zip(values, parts)])
    return dataclasses.replace(first, log_px=joined("log_px"), ess=joined("ess"),
                               khat=joined("khat"))


@_rows_of_a_subsampling_model
@program.in_evaluation_mode
@torch.no_grad()
def estimate_log_marginal(model: Callable[..., Any], guide: Callable[..., Any] | None,
                          x: torch.Tensor | Sequence[torch.Tensor], *args: Any,
                          method: str = "iwae", num_samples: int = 1000,
                          plate_name: str | None = None, chunk_size: int | None = None,
                          seed: int | None = None, idx: torch.Tensor | None = None,
                          memory_bytes: int | None = None,
                          globals: str | dict[str, torch.Tensor] | None = None,
                          num_global_samples: int = 10, num_steps: int | None = None,
                          per_row: str | Sequence[str] | None = None, compile: bool | str = False,
                          num_temperatures: int | None = None, **model_kwargs: Any) -> LogMarginalEstimate:
    """``log_marginal`` returning a ``LogMarginalEstimate`` (per-datapoint values, mean, stderr,
    ESS and Pareto k̂)."""
    x, args, per_row = _data_tuple(x, args, per_row)
    num_samples = _check_inputs(guide, x, method, num_samples, chunk_size, idx, globals,
                                num_global_samples)
    if method == "ais":
        if globals is not None:
            raise ValueError("method 'ais' anneals the per-datapoint latents only; globals= is "
                             "not supported with it (fix them in the model)")
        _row_spec(model, x, args, model_kwargs, per_row)  # names an unknown per_row entry
        return ais_log_marginal(model, guide, x, *args, num_temperatures=num_temperatures,
                                num_steps=num_steps, num_samples=num_samples,
                                plate_name=plate_name, seed=seed, memory_bytes=memory_bytes,
                                chunk_size=chunk_size, idx=idx, compile=compile,
                                per_row=per_row, **model_kwargs)
    device = x.device
    keep_freed_memory(device)
    idx = torch.arange(x.shape[0], device=device) if idx is None else idx.to(device)
    if memory_bytes is not None and (isinstance(memory_bytes, bool) or not isinstance(
            memory_bytes, (int, float)) or not 1 <= memory_bytes < math.inf):
        raise ValueError(f"memory_bytes must be a positive number of bytes or None, got "
                         f"{memory_bytes!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    memory_bytes = default_memory_bytes(device) if memory_bytes is None else int(memory_bytes)
    call = (model, guide, x, method, num_samples, plate_name, chunk_size, seed, idx, memory_bytes,
            model_kwargs, globals, num_global_samples, args, per_row, compile)
    if seed is not None:  # a seeded call leaves the global RNG as it found it
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                noise_from_cpu(device):
            return _estimate(*call)
    return _estimate(*call)


@program.in_evaluation_mode
def log_weights(model: Callable[..., Any], guide: Callable[..., Any] | None, *args: Any,
                num_samples: int = 1000, plate_name: str | None = None, seed: int | None = None,
                idx: torch.Tensor | None = None, memory_bytes: int | None = None,
                globals: str | dict[str, torch.Tensor] | None = None,
                per_row: str | Sequence[str] | None = None, compile: bool | str = False,
                **kwargs: Any) -> torch.Tensor:
    """The importance log weights log w_{k,n} = log p(x_n, z_k) - log q(z_k | x_n): [K, N].

    z_k ~ q(z | x_n) (the guide; ``guide=None``: the prior, so w = p(x_n | z_k)). Every estimator of
    the lecture is one reduction of this matrix: IWAE_K = logmeanexp(w, 0), ELBO = w.mean(0).
    ``args``: the model's positional arguments, the first a tensor [N, ...] of rows (or a tuple of
    per-row tensors); the others are passed whole unless named in ``per_row`` (see
    ``log_marginal``). Other keywords as ``log_marginal``.
    """
    x, rest, per_row = _data_tuple(args[0], args[1:], per_row)
    method = "prior" if guide is None else "iwae"
    num_samples = _check_inputs(guide, x, method, num_samples, None, idx, globals, 1)
    keep_freed_memory(x.device)
    idx = torch.arange(x.shape[0], device=x.device) if idx is None else idx.to(x.device)
    with torch.no_grad(), torch.random.fork_rng(
            devices=[x.device] if x.device.type == "cuda" and seed is not None else []), \
            noise_from_cpu(x.device if seed is not None else "cpu"):
        prog = compiled.compile_weights(
            _Program(model, guide, x, method, plate_name, idx, kwargs, globals, rest, per_row),
            compile, num_samples)
        memory = default_memory_bytes(x.device) if memory_bytes is None else int(memory_bytes)
        rows_per_call, particles_per_call = _plan(x.shape[0], num_samples, None, seed, memory,
                                                  prog.bytes_per_unit, prog.row_bound or
                                                  bool(prog.ambiguous))
        blocks = []
        for block, start in enumerate(range(0, x.shape[0], rows_per_call)):
            rows = slice(start, min(start + rows_per_call, x.shape[0]))
            parts = []
            for particle_block, first in enumerate(range(0, num_samples, particles_per_call)):
                _seed_block(seed, block, particle_block)
                parts.append(prog.log_weights(rows, min(particles_per_call, num_samples - first)))
            blocks.append(torch.cat(parts, 0))
        return torch.cat(blocks, 1)


@torch.no_grad()
def joint_log_marginal(model: Callable[..., Any], guide: Callable[..., Any] | None,
                       x: torch.Tensor | Sequence[torch.Tensor], *args: Any, method: str = "iwae",
                       num_samples: int = 100, seed: int | None = None,
                       **model_kwargs: Any) -> torch.Tensor:
    """The whole-data bound on log p(x_1..N): a 0-dim tensor (nats, for all rows together).

    For guides whose density is joint over rows (AutoDiagonalNormal, AutoMultivariateNormal,
    AutoLowRankMultivariateNormal over local latents), models with global latents or factors
    outside the data plate: anything that has no per-datapoint split. Each of the K draws
    z_k ~ q(z | x_1..N) gives log w_k = log p(x_1..N, z_k) - log q(z_k | x_1..N), every site
    counted once (``ppl_lvm.densities.joint_log_weight``); "iwae": log (1/K) Σ_k w_k, "elbo":
    (1/K) Σ_k log w_k. ``guide`` None: the prior as proposal (method "prior").
    """
    if method not in ("iwae", "elbo", "is", "prior"):
        raise ValueError(f"joint_log_marginal: method must be 'iwae', 'elbo' or 'prior', got "
                         f"{method!r}")
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples (K) must be an integer ≥ 1, got {num_samples!r}")
    if method == "prior":
        guide = None
    elif guide is None:
        raise ValueError(f"method {method!r} needs a guide; use method='prior' without one")
    device = x.device if torch.is_tensor(x) else torch.device("cpu")
    data = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            noise_from_cpu(device if seed is not None else "cpu"):
        if seed is not None:
            torch.manual_seed(int(seed))
        enumerated, nesting = _enumerated_sites(model, guide, data + args, model_kwargs)
        weights = []
        for _ in range(int(num_samples)):
            with poutine.block():
                if enumerated:  # the model's own enumerated latents are summed out exactly
                    log_w = densities.enumerated_joint_log_weight(model, guide, data + args,
                                                                  model_kwargs, nesting)
                    weights.append(log_w.detach())
                    continue
                guide_trace, model_trace = densities.trace_pair(model, guide, data + args,
                                                                model_kwargs)
            if guide is None:  # w = p(x | z): the latents' own terms are the proposal's
                log_w = densities.joint_log_weight(model_trace, None, observed_only=True)
            else:
                log_w = densities.joint_log_weight(model_trace, guide_trace)
            weights.append(torch.as_tensor(log_w, dtype=torch.get_default_dtype()))
    log_w = torch.stack(weights)
    if method == "elbo":
        return log_w.mean()
    return torch.logsumexp(log_w, 0) - math.log(len(weights))


def _enumerated_sites(model, guide, args, kwargs):
    """(model latents marked for enumeration that the guide does not sample, plate nesting)."""
    with program.sandbox(), torch.no_grad():
        guide_trace, model_trace = densities.trace_pair(model, guide, args, kwargs)
    names = [n for n, s in sample_sites(model_trace).items() if not s["is_observed"]
             and s["infer"].get("enumerate") == "parallel"
             and (guide_trace is None or n not in guide_trace.nodes)]
    traces = [t for t in (guide_trace, model_trace) if t is not None]
    return names, plate_nesting(*traces)


def _estimate(model, guide, x, method, num_samples, plate_name, chunk_size, seed, idx,
              memory_bytes, model_kwargs, globals, num_global_samples, rest=(), per_row=None,
              compile=False):
    if globals == "sample":
        # log (1/S) Σ_s p(x_n | g_s): one estimate per draw g_s ~ q(globals), then log-mean-exp
        draws = []
        for s in range(num_global_samples):
            _seed_block(None if seed is None else seed + 7919 * (s + 1), 0, 0)
            draws.append(_estimate(model, guide, x, method, num_samples, plate_name, chunk_size,
                                   None if seed is None else seed + s, idx, memory_bytes,
                                   model_kwargs, ("draw", s), 1, rest, per_row, compile))
        log_px = torch.stack([d.log_px for d in draws]).logsumexp(0) - math.log(len(draws))
        ess = torch.stack([d.ess for d in draws]).mean(0)
        first = draws[0]
        khat = torch.stack([d.khat for d in draws]).max(0).values
        # delta method over the S draws (between) plus each draw's own error (within)
        shares = torch.softmax(torch.stack([d.log_px for d in draws]), 0)  # [S, N]
        count = len(draws)
        between = ((count * (shares ** 2).sum(0) - 1) / max(count - 1, 1)).clamp(min=0)
        within = (shares ** 2 * torch.stack([d.mc_stderr for d in draws]) ** 2).sum(0)
        return LogMarginalEstimate(log_px, ess, method, num_samples, first.rows_per_call,
                                   first.particles_per_call, first.vectorized,
                                   f"sample:{num_global_samples}", khat, (between + within).sqrt())
    num_rows = x.shape[0]
    prog = _Program(model, guide, x, method, plate_name, idx, model_kwargs, globals, rest, per_row)
    if method != "exact":
        prog = compiled.compile_weights(prog, compile, num_samples)
    if method == "exact":
        rows_per_call = num_rows if prog.row_bound or (prog.ambiguous and not chunk_size) else (
            chunk_size or max(1, memory_bytes // max(prog.bytes_per_unit, 1)))
        particles_per_call = 1
    else:
        rows_per_call, particles_per_call = _plan(
            num_rows, num_samples, chunk_size, seed, memory_bytes, prog.bytes_per_unit,
            prog.row_bound or bool(prog.ambiguous and not chunk_size))

    log_px, ess, khat, mc_stderr, tops = [], [], [], [], []
    for block, start in enumerate(progress.chunks(num_rows, rows_per_call,
                                                  f"log p(x) by {method}")):
        rows = slice(start, min(start + rows_per_call, num_rows))
        if method == "exact":
            log_px.append(prog.exact(rows))
            ess.append(torch.full_like(log_px[-1], float("nan")))
            khat.append(torch.full_like(log_px[-1], float("nan")))
            mc_stderr.append(torch.zeros_like(log_px[-1]))
            continue
        totals = _RunningWeights(num_samples)
        for particle_block, first in enumerate(range(0, num_samples, particles_per_call)):
            count = min(particles_per_call, num_samples - first)
            _seed_block(seed, block, particle_block)
            totals.add(prog.log_weights(rows, count))
        log_px.append(totals.elbo() if method == "elbo" else totals.log_mean_weight())
        ess.append(totals.ess())
        tops.append(totals.top)  # k̂ of every row at once, below (a fit per chunk cost ~1 ms)
        mc_stderr.append(totals.elbo_stderr() if method == "elbo" else totals.stderr())
    if tops:
        top = torch.cat(tops, 1)
        khat = [pareto_khat(top, num_samples=num_samples).to(top.dtype)]
    label = globals if isinstance(globals, str) else "given" if isinstance(globals, dict) else None
    summary = prog.summary() if isinstance(prog, compiled.CompiledWeights) else None
    return LogMarginalEstimate(torch.cat(log_px), torch.cat(ess), method, num_samples,
                               rows_per_call, particles_per_call, prog.vectorized, label,
                               torch.cat(khat), torch.cat(mc_stderr), summary)


# ----------------------------------------------------------------------------------------------
# inputs, plans, seeds


def _data_tuple(x, args, per_row):
    """x given as a tuple (x, y, ...) of per-row tensors: (x, (y, ..., *args), per_row with the
    tuple's other members declared per-row)."""
    if not isinstance(x, (tuple, list)) or not x or not all(torch.is_tensor(v) for v in x):
        return x, tuple(args), per_row  # not a tuple of tensors: _check_inputs says what x is
    extra = len(x) - 1
    declared = tuple(range(extra)) + tuple(
        p + extra if isinstance(p, int) else p for p in (per_row or ()))
    return x[0], tuple(x[1:]) + tuple(args), declared


def _row_spec(model, x, rest, kwargs, per_row):
    """Which arguments are per-row: (positions in (x, *rest), keyword names, ambiguous names).

    x is per-row; the others are whole unless ``per_row`` names them (ints: positions in ``rest``,
    strings: keyword names). With ``per_row`` None, a tensor whose first dim merely equals N is
    *ambiguous*: passed whole, and a call that would split the rows is refused naming it.
    """
    num_rows = x.shape[0]
    _refuse_keyword_only(model)
    names = _positional_names(model, 1 + len(rest))
    row_args, row_kwargs = {0}, set()
    for entry in program.per_row_entries(per_row, len(rest)):
        if isinstance(entry, int):
            value, label, target = rest[entry], names[entry + 1], row_args
            target.add(entry + 1)
        else:
            if entry not in kwargs:
                raise ValueError(f"per_row names {entry!r}, which is not among the keywords "
                                 f"passed {sorted(kwargs)}")
            value, label = kwargs[entry], entry
            row_kwargs.add(entry)
        if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != num_rows:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"per-row argument {label!r} must have x's {num_rows} rows first, "
                             f"got {shape}")
    ambiguous = []
    if per_row is None:
        candidates = [(names[i + 1], v) for i, v in enumerate(rest)] + list(kwargs.items())
        ambiguous = [label for label, value in candidates
                     if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == num_rows]
    return frozenset(row_args), frozenset(row_kwargs), ambiguous


def _refuse_keyword_only(fn):
    """A model that takes its data by keyword only (``model(*, obs)``) cannot be given x."""
    try:
        target = fn.forward if isinstance(fn, torch.nn.Module) else fn
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params):
        return
    keyword_only = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
    if keyword_only:
        raise ValueError(
            f"the model takes its data by keyword only ({', '.join(keyword_only)}): the package "
            f"passes the rows x positionally; wrap it, e.g. lambda x: model({keyword_only[0]}=x), "
            "and the guide the same way")


def _positional_names(fn, count):
    """Names of ``fn``'s first ``count`` positional parameters (``argument i`` where unknown)."""
    names = [f"argument {i}" for i in range(count)]
    try:
        target = fn.forward if isinstance(fn, torch.nn.Module) else fn
        params = [p for p in inspect.signature(target).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return names
    for i, param in enumerate(params[:count]):
        names[i] = param.name
    return names


def _check_inputs(guide, x, method, num_samples, chunk_size, idx, globals=None,
                  num_global_samples=1):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor [N, ...], got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have shape [N, ...] with N ≥ 1 rows, got {tuple(x.shape)}")
    # one pass (a sum is finite when every value is, NaN and ±inf propagate) before the exact test,
    # which runs only when the sum is not finite (an overflowing sum of finite values passes it)
    if x.is_floating_point() and not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(-1).nonzero().flatten()
        raise ValueError(f"x contains NaN or inf in {bad.numel()} rows (first: {bad[:5].tolist()});"
                         " mask missing values in the model instead")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, float)) or not (
            1 <= num_samples < math.inf) or int(num_samples) != num_samples:
        raise ValueError(f"num_samples (K) must be an integer ≥ 1, got {num_samples!r}")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if method in GUIDE_METHODS and guide is None:
        raise ValueError(f"method {method!r} needs a guide q(z | x); use 'prior' without one")
    if idx is not None and tuple(idx.shape) != (x.shape[0],):
        raise ValueError(f"idx must have shape [{x.shape[0]}] to match x, got {tuple(idx.shape)}")
    if globals not in GLOBALS and not isinstance(globals, (tuple, dict)):
        raise ValueError(f"globals must be None, 'median', 'sample' or a dict {{site: value}}, "
                         f"got {globals!r}")
    if isinstance(globals, str) and guide is None:
        raise ValueError(f"globals={globals!r} takes the global latents from the guide; pass one")
    if int(num_global_samples) != num_global_samples or num_global_samples < 1:
        raise ValueError(f"num_global_samples must be an integer ≥ 1, got {num_global_samples!r}")
    return int(num_samples)






# ----------------------------------------------------------------------------------------------
# traces -> per-datapoint log weights


def check_observed_support(trace, skip=()):
    """Observed values must lie in their distribution's support (e.g. binary pixels for a Bernoulli),
    except at the sites in ``skip`` (built with ``validate_args=False`` by the program)."""
    for name, site in sample_sites(trace).items():
        if site["is_observed"] and name not in skip:
            support = site["fn"].support
            try:
                inside = support.check(site["value"])
            except (RuntimeError, ValueError, NotImplementedError):
                # a support that cannot check batched values (Pyro's MaskedMixture under the
                # particle plate): the log-density itself must at least be a number
                if torch.isnan(densities.site_log_prob(site)).any():
                    raise ValueError(f"observed site {name!r}: its log-density is NaN for some "
                                     "values of x") from None
                continue
            if not bool(inside.all()):
                bad = (~inside).sum().item()
                raise ValueError(f"observed site {name!r}: {bad} values of x lie outside the support "
                                 f"of {type(site['fn']).__name__} ({support}); e.g. binarize x "
                                 "for a Bernoulli likelihood")




class _UniformProposal(Messenger):
    """Draws every latent site uniformly from its finite support; records log q = -log |Z_site|."""

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        fn = msg["fn"]
        if not fn.has_enumerate_support:
            raise ValueError(f"method 'uniform' needs finite discrete latents; site "
                             f"{msg['name']!r} has {type(fn).__name__} with no finite support")
        support = fn.enumerate_support(expand=True)  # [C, *batch, *event]
        size = support.shape[0]
        batch_shape = support.shape[1:support.dim() - len(fn.event_shape)]
        index = torch.randint(size, batch_shape, device=support.device)
        index = index.reshape((1,) + batch_shape + (1,) * len(fn.event_shape))
        msg["value"] = support.gather(0, index.expand((1,) + support.shape[1:])).squeeze(0)
        msg["done"] = True
        msg["infer"]["proposal_log_prob"] = torch.full(batch_shape, -math.log(size),
                                                    device=support.device)


# what _Program's probes learned, per (model, guide, method, shapes): a few recent pairs
_PROBES = {}
_PROBE_CACHE_SIZE = 8


def _callable_key(fn):
    # bound methods are new objects at every access (vae.model): key on the function and its
    # object (held by the cache, so its id cannot be reused while cached)
    owner = getattr(fn, "__self__", None)
    return (getattr(fn, "__func__", fn), owner) if owner is not None else fn


def _probe_key(model, guide, x, method, plate_name, rest, kwargs, per_row=None):
    def describe(value):
        if torch.is_tensor(value):
            return ("tensor", tuple(value.shape[1:]), value.dtype, str(value.device))
        return ("value", type(value).__name__, repr(value)[:64])
    try:
        key = (_callable_key(model), _callable_key(guide), method, plate_name,
               describe(x), tuple(describe(a) for a in rest),
               tuple(sorted((k, describe(v)) for k, v in kwargs.items())),
               None if per_row is None else tuple(sorted(map(str, per_row))))
        hash(key)
        return key
    except TypeError:  # an unhashable callable: no cache
        return None


def _remember(key, values):
    _PROBES.pop(key, None)
    if len(_PROBES) >= _PROBE_CACHE_SIZE:
        _PROBES.pop(next(iter(_PROBES)))
    _PROBES[key] = values


class _Program:
    """A model/guide pair bound to its data: read once (``ppl_lvm.program``), then asked for the
    log weights of row chunks. Probing leaves the param store and the RNG as they were."""

    def __init__(self, model, guide, x, method, plate_name, idx, model_kwargs, globals=None,
                 rest=(), per_row=None):
        self.x, self.rest, self.method = x, tuple(rest), method
        self.row_args, self.row_kwargs, self.ambiguous = _row_spec(model, x, self.rest,
                                                                   model_kwargs, per_row)
        self.idx, self.model_kwargs = idx, model_kwargs
        self.uses_guide = method in GUIDE_METHODS
        self.guide_takes_idx = self.uses_guide and accepts(guide, "idx")
        self.num_rows = x.shape[0]
        key = None if globals is not None else _probe_key(model, guide, x, method, plate_name,
                                                            self.rest, model_kwargs, per_row)
        self.probe_key = key  # also keys the compiled graphs shared across calls
        known = _PROBES.get(key) if key is not None else None
        if known is not None and (not known["row_bound"] or known["num_rows"] == self.num_rows):
            # read before for this pair and these shapes: the probes' traces are skipped (a fixed
            # cost per call that dominates small K on a GPU); each chunk still checks the plates
            self.model, self.guide = model, guide
            self.__dict__.update({k: v for k, v in known.items() if k != "num_rows"})
            return
        try:
            structure = program.inspect_program(
                model, x, *self.rest, plate_name=plate_name,
                per_row=tuple(self.row_args) + tuple(self.row_kwargs), **model_kwargs)
        except _MODEL_ERRORS as error:
            if isinstance(error, ValueError) and "plate" in str(error):
                raise
            raise self._shape_error(error, slice(0, min(self.num_rows, 3))) from error
        self.plate_name = structure.plate_name
        self.fixed, self.enumerates = (), False
        outside = list(structure.global_latents)
        if outside and globals is None:
            raise ValueError(
                f"sites {sorted(outside)} are outside the data plate {self.plate_name!r}: log p(x) "
                "does not split into per-datapoint terms with a global latent. Pass "
                "globals='median' (log p(x_n | globals at the guide's median) or globals='sample' "
                "(averaged over draws from the guide), integrate it out in the model, or fix it "
                "as a parameter")
        if outside:
            values = self._global_values(model, guide, structure, globals)
            model = poutine.condition(model, data=values)
            guide = guide and poutine.condition(guide, data=values)
            self.fixed = tuple(values)
        self.model, self.guide = model, guide
        self.vectorized = True
        self.row_bound = False
        if self.uses_guide:
            self._check_guide_plate(structure)
        self._probe()
        if key is not None:
            _remember(key, {"plate_name": self.plate_name, "nesting": self.nesting,
                            "vectorized": self.vectorized, "row_bound": self.row_bound,
                            "bytes_per_unit": self.bytes_per_unit, "unchecked": self.unchecked,
                            "num_rows": self.num_rows, "fixed": self.fixed,
                            "enumerates": self.enumerates})

    def _check_guide_plate(self, structure):
        """Before the model is replayed on the guide's values: the guide's data plate must sit at
        the model's dim (else the two broadcast into a silently wrong log p(x))."""
        args, _, guide_kwargs = self._args(
            slice(0, self.num_rows if self.ambiguous else min(self.num_rows, 2)))
        try:
            guide_trace = program.trace_of(self.guide, *args, **guide_kwargs)
        except _MODEL_ERRORS:
            return  # a guide bound to its own rows: checked on all rows in the probe
        program.check_pair(structure, guide_trace, dims_only=True)

    # -- arguments

    def _args(self, rows):
        if self.ambiguous and (rows.start or 0, rows.stop) != (0, self.num_rows):
            raise ValueError(
                f"argument {self.ambiguous[0]!r} has {self.num_rows} rows, as many as x, and this "
                "call splits the rows into chunks: it is passed whole unless declared per-row. "
                f"Pass per_row=({self.ambiguous[0]!r},) if it holds one entry per row of x, or "
                "per_row=() if it is one whole tensor (e.g. training centres)")
        args, kwargs = program.take((self.x,) + self.rest, self.model_kwargs, rows, self.num_rows,
                                    per_row=tuple(self.row_args) + tuple(self.row_kwargs))
        guide_kwargs = dict(kwargs, idx=self.idx[rows]) if self.guide_takes_idx else kwargs
        return args, kwargs, guide_kwargs

    def _global_values(self, model, guide, structure, globals):
        """{global latent site: its value}, from the guide's median or one draw from the guide."""
        names = structure.global_latents
        args, kwargs, guide_kwargs = self._args(slice(None))
        if isinstance(globals, dict):
            values = globals
        elif globals == "median":
            if not hasattr(guide, "median"):
                raise ValueError(f"globals='median' needs a guide with a median() (a Pyro "
                                 f"autoguide); {type(guide).__name__} has none: use "
                                 "globals='sample'")
            with program.sandbox(self.x.device):
                values = guide.median(*args, **guide_kwargs)
        else:  # one draw g ~ q(globals)
            with poutine.block():
                trace = poutine.trace(guide).get_trace(*args, **guide_kwargs)
            values = {n: s["value"] for n, s in sample_sites(trace).items()}
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"the guide gives no value for the global latent sites {missing}")
        return {n: values[n].detach() for n in names}

    # -- traces

    def _traces(self, rows, num_particles=None):
        """Guide and model traces of one chunk; vectorised over K particles when given."""
        args, kwargs, guide_kwargs = self._args(rows)
        model, guide = self.model, self.guide
        if num_particles is not None:
            model = vectorize(model, num_particles, self.nesting, self.x.device)
            guide = guide and vectorize(guide, num_particles, self.nesting, self.x.device)
        if self.method == "uniform":
            return densities.trace_pair(_UniformProposal()(model), None, args, kwargs)
        if not self.uses_guide:
            return densities.trace_pair(model, None, args, kwargs)
        if self.enumerates:  # model latents the guide leaves out are summed out exactly
            model = poutine.enum(model, first_available_dim=-(self.nesting + 2))
        return densities.trace_pair(model, guide, args, model_kwargs=kwargs,
                                    guide_kwargs=guide_kwargs)

    def _shape_error(self, error, rows):
        shape = tuple(self.x[rows].shape)
        return ValueError(f"the model/guide failed on x of shape {tuple(self.x.shape)} (a chunk of "
                          f"shape {shape}): {type(error).__name__}: {error}")

    def _guide_rows(self, guide_trace):
        """The size of the guide's data plate (the rows its local sites were drawn for)."""
        for site in sample_sites(guide_trace).values():
            frame = program.frame_of(site, self.plate_name)
            if frame is not None and not site["is_observed"]:
                return program.plate_length(site, frame)
        return None

    def _probe(self):
        # with an argument of undeclared role the call cannot split the rows: probe on all of them
        rows = slice(0, self.num_rows if self.ambiguous else min(self.num_rows, 2))
        with program.sandbox(self.x.device):
            try:
                guide_trace, model_trace = self._traces(rows)
                given = None if guide_trace is None else self._guide_rows(guide_trace)
            except _MODEL_ERRORS as error:
                if not self.uses_guide:
                    raise self._shape_error(error, rows) from error
                first_error, given = error, -1
            if given is not None and given != rows.stop:
                # a guide with one parameter per row (an autoguide over local sites): it can only
                # score the rows it was fitted on, all at once
                rows = slice(0, self.num_rows)
                try:
                    guide_trace, model_trace = self._traces(rows)
                except _MODEL_ERRORS as error:
                    first = first_error if given == -1 else error
                    raise ValueError(
                        f"the model/guide failed on x of shape {tuple(self.x.shape)}, on 2 rows "
                        f"({type(first).__name__}: {str(first).splitlines()[0]}) and on all "
                        f"{self.num_rows} rows. A guide with one "
                        "parameter per row (e.g. an autoguide over local sites) scores only the "
                        "rows it was fitted on; for new rows fit per-datapoint φ with "
                        "ppl_lvm.infer_local or use an amortized guide") from error
                given = self._guide_rows(guide_trace)
                if given is not None and given != self.num_rows:
                    raise ValueError(
                        f"the guide draws its local sites for {given} rows but x has "
                        f"{self.num_rows}: a guide with one parameter per row (e.g. an autoguide "
                        "over local sites) scores only the rows it was fitted on; for new rows "
                        "fit per-datapoint φ with ppl_lvm.infer_local or use an amortized guide")
                self.row_bound = True
        model_structure = program.structure_of(model_trace, self.plate_name)
        # the probe ran under the user's validation setting: sites whose distribution the program
        # built with validate_args=False keep their values unchecked (e.g. grey-level Bernoulli)
        self.unchecked = {n for n, s in sample_sites(model_trace).items()
                          if s["is_observed"] and program.user_disabled_validation(s["fn"])}
        outside = model_structure.global_sites
        if outside and any(not model_trace.nodes[n]["is_observed"] for n in outside):
            latent = [n for n in outside if not model_trace.nodes[n]["is_observed"]]
            raise ValueError(f"sites {latent} are outside the data plate {self.plate_name!r}")
        traces = [t for t in (guide_trace, model_trace) if t is not None]
        self.nesting = plate_nesting(*traces)
        enumerated = ()
        if self.uses_guide:
            enumerated = tuple(n for n, s in sample_sites(model_trace).items()
                               if not s["is_observed"] and n not in guide_trace.nodes
                               and s["infer"].get("enumerate") == "parallel")
            program.check_pair(model_structure, guide_trace, enumerated=enumerated)
        if enumerated:
            self.enumerates = True
            with program.sandbox(self.x.device):
                guide_trace, model_trace = self._traces(rows)
        if self.method == "exact":
            self.bytes_per_unit = self._bytes(traces, rows.stop) * 8
            return
        with program.sandbox(self.x.device):
            try:
                self._weights_from_traces(guide_trace, model_trace, rows.stop)
            except densities.DensityError:
                raise
            except _MODEL_ERRORS as error:
                raise self._shape_error(error, rows) from error
            try:  # a vectorised probe: K = 2 particles
                log_weights = self._log_weights_vectorized(rows, 2)
                if log_weights.shape != (2, rows.stop):
                    raise RuntimeError(f"log weights of shape {tuple(log_weights.shape)}")
                guide_trace, model_trace = self._last_traces
                traces = [t for t in (guide_trace, model_trace) if t is not None]
                self.bytes_per_unit = self._bytes(traces, 2 * rows.stop)
            except densities.DensityError:
                raise
            except _MODEL_ERRORS as error:
                warnings.warn(f"the model/guide could not be vectorised over particles ({error}); "
                              "falling back to a loop over particles, which is slower",
                              RuntimeWarning)
                self.vectorized = False
                self.bytes_per_unit = self._bytes(traces, rows.stop)
            self._last_traces = None

    @staticmethod
    def _bytes(traces, units):
        return max(1, _ACTIVATION_FACTOR * trace_bytes(traces) // units)

    def _check_plates(self, traces):
        """Every latent site in the data plate, and no deeper plates than read at the probe (a
        program whose structure changed since it was read would be summed wrongly)."""
        for trace in traces:
            if trace is None:
                continue
            for name, site in sample_sites(trace).items():
                if (program.frame_of(site, self.plate_name) is None and not site["is_observed"]
                        and trace is traces[-1]):  # the model's (a guide has its own globals)
                    raise ValueError(f"site {name!r} is outside the data plate "
                                     f"{self.plate_name!r} (the program changed since it was read?)")
                if any(f.vectorized and f.dim < -(self.nesting + 1)
                       for f in site["cond_indep_stack"]):
                    raise ValueError(f"site {name!r} sits in more plates than the program had "
                                     "when it was read; call again after changing a model")

    def _weights_from_traces(self, guide_trace, model_trace, num_rows):
        """[K, n] from one trace pair, through the density kernel (``ppl_lvm.densities``)."""
        return densities.row_log_weights(model_trace, guide_trace, self.plate_name, num_rows,
                                         self.nesting, fixed=self.fixed,
                                         observed_only=self.method == "prior")

    def _log_weights_vectorized(self, rows, num_particles):
        guide_trace, model_trace = self._traces(rows, num_particles)
        self._last_traces = guide_trace, model_trace
        num_rows = rows.stop - rows.start
        log_weights = self._weights_from_traces(guide_trace, model_trace, num_rows)
        if log_weights.shape[0] != num_particles:
            raise RuntimeError(f"log weights for {log_weights.shape[0]} particles where "
                               f"{num_particles} were drawn")
        return log_weights

    def log_weights(self, rows, num_particles):
        """log w_{k,n} = log p(x_n, z_k) - log q(z_k | x_n) for the chunk: [K, n].

        The probe ran with the user's validation setting; here the distributions' argument checks
        (a pass over every [K, n, D] parameter tensor, ~10% of the time) are off, and only what
        they would catch about the data is checked: observed values inside their support.
        """
        with pyro.validation_enabled(False):
            if self.vectorized:
                log_weights = self._log_weights_vectorized(rows, num_particles)
                self._check_plates(self._last_traces)
                check_observed_support(self._last_traces[1], self.unchecked)
                self._last_traces = None  # free this chunk's [K, n, D] tensors before the next
                return log_weights
            weights = []
            for _ in range(num_particles):
                guide_trace, model_trace = self._traces(rows)
                check_observed_support(model_trace, self.unchecked)
                weights.append(self._weights_from_traces(
                    guide_trace, model_trace, rows.stop - rows.start).reshape(-1))
            return torch.stack(weights)

    def exact(self, rows):
        """log Σ_z p(x_n, z) by parallel enumeration of every latent site: [n]."""
        args, kwargs, _ = self._args(rows)
        return densities.exact_rows(self.model, args, kwargs, self.plate_name, self.nesting,
                                    self.fixed, num_rows=rows.stop - rows.start)
