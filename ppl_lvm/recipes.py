"""Recipes that train a guide on a trained model: the lecture's q*(z_i) per datapoint and the
amortization gap (Cremer, Li & Duvenaud 2018).

- ``infer_local``: fit per-datapoint φ_i for new rows with θ fixed (a ``LocalGuide``).
- ``amortization_gaps`` and ``Gaps``: log p(x) - ELBO(q_amortized) split into the approximation
  gap (q* vs p(z | x)) and the amortization gap (q_amortized vs q*), per datapoint.

The guide kinds and the per-row solver these stand on live in ``ppl_lvm.guides``; the optimiser
and the SVI step in ``ppl_lvm.train``.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from ppl_lvm import program, progress
from ppl_lvm.estimators import (SEED_BLOCK_PARTICLES, SEED_BLOCK_ROWS, _seed_block,
                                estimate_log_marginal)
from ppl_lvm.guides import (LocalGuide, _LocalProblem, data_plate_name, local_convergence,
                            log_joint, solve_local)
from ppl_lvm.optim import lr_factor
from ppl_lvm.particles import noise_from_cpu
from ppl_lvm.train import adam, bind_rows, svi_step
from ppl_lvm.vocabulary import renamed

def _fix_globals(model, structure, globals_guide, args, kwargs):
    """The model with its global latents held at ``globals_guide``'s median (or refused)."""
    names = structure.global_latents
    if not names:
        return model
    if globals_guide is None or not hasattr(globals_guide, "median"):
        raise ValueError(
            f"the model has global latent sites {list(names)} outside its data plate "
            f"{structure.plate_name!r}: q*(z_i) of new rows is defined given them; pass "
            "globals_guide= (e.g. the trained autoguide, whose median() fixes them)")
    with program.sandbox():
        values = globals_guide.median(*args, **kwargs)
    return poutine.condition(model, data={n: values[n].detach() for n in names})


def _site_layout(model, structure, args, kwargs, site_shapes):
    """Per latent site: its event dims, the model's other plates around it (name, size, dim) and
    its support, read from a trace of the model on two rows (all rows where the model refuses two),
    so a LocalGuide's values line up with the model's whatever its plate dims and lie in the
    site's support."""
    trace = program.trace_rows(model, args, kwargs, size=2)
    event_dims, inner, supports = {}, {}, {}
    for name in site_shapes:
        site = trace.nodes.get(name)
        if site is None or site["type"] != "sample":
            continue
        event_dims[name] = site["fn"].event_dim
        inner[name] = [(f.name, f.size, f.dim) for f in site["cond_indep_stack"]
                       if f.vectorized and f.name != structure.plate_name]
        supports[name] = site["fn"].support
    return event_dims, inner, supports


@program.in_evaluation_mode
def infer_local(model: Callable[..., Any], x: torch.Tensor, *args: Any,
                site_shapes: dict[str, int | Sequence[int]] | None = None,
                encoder: torch.nn.Module | None = None, steps: int | None = None,
                lr: float = 1e-2, batch_size: int | None = None,
                num_particles: int | None = None, loss: pyro.infer.ELBO | None = None,
                name: str = "new", seed: int = 0,
                globals_guide: Callable[..., Any] | None = None, num_steps: int | None = None,
                method: str | None = None, tol: float = 1e-3,
                **model_kwargs: Any) -> LocalGuide:
    """Fit per-datapoint φ_i for rows ``x`` with θ fixed: q*(z_i) = argmax ELBO_i (the decoder frozen).

    A ``LocalGuide`` fitted on training rows has no φ for new rows; this fits them. Every parameter
    of the model stays as it is; only the new table changes. Each row runs until it converges
    (its natural-gradient residual below ``tol``) or hits the cap, and the result says which rows
    did: ``guide.convergence`` (a ``LocalConvergence``), ``guide.converged`` [M] bool. A warning
    names the rows that did not.

    method: "natural" (the default when every latent site of the data plate is the guide's and
        no ``loss`` is given): per-row damped Newton steps in the Normal family's natural geometry
        (``solve_local``), which reach the mean-field q* of a Gaussian posterior exactly and
        climb monotonically otherwise; ``num_particles`` (default 32) points per row, ``steps``
        (default 200) a cap per row, ``lr`` unused. "adam": the earlier SGD on the ELBO (Pyro's
        ``loss``, ``lr`` decayed along a cosine, ``steps`` default 200, ``num_particles``
        default 1), its convergence measured at the end (``local_convergence``).

    Args:
        model: the trained model (its params already in the param store / its modules).
        x: [M, ...] the new rows; ``*args``: the model's further positional arguments (labels,
            masks: tensors [M, ...] are per-row and follow x's rows); ``**model_kwargs`` alike.
        site_shapes: {site: shape}; by default read from the model's trace: every continuous latent
            site in its data plate (whatever their names). encoder: optional x -> (loc, scale) for
            a single latent site: rows start at the encoder's output (then q* is at least as good
            as the amortized q up to optimisation noise).
        num_steps (old name ``steps``; not both): the cap on steps per row; lr: Adam's
            step size ("adam" only), decayed to lr / 100 along a cosine so the final φ is not
            jittered by gradient noise; batch_size: rows per step (default all).
        num_particles: samples per ELBO gradient (or give ``loss``, any Pyro ELBO, e.g. one with
            ``vectorize_particles=True``); name: the new table's name (any old table of that name
            is replaced).
        globals_guide: for a model with global latents outside the data plate: a guide whose
            ``median()`` fixes them (e.g. the trained autoguide).

    Returns:
        LocalGuide over the M rows (call it with ``idx=torch.arange(M)`` or all rows at once),
        with ``convergence`` and ``converged`` set.
    """
    steps = renamed("num_steps", num_steps, "steps", steps, 200)
    structure = program.inspect_program(model, x, *args, allow_subsample=True, **model_kwargs)
    model = _fix_globals(model, structure, globals_guide, (x,) + args, model_kwargs)
    if site_shapes is None:
        site_shapes = {n: structure.event_shapes[n] for n in structure.local_latents}
        if not site_shapes:
            raise ValueError(f"the model has no latent site in its data plate "
                             f"{structure.plate_name!r}: nothing to infer per row")
    if encoder is not None and len(site_shapes) != 1:
        raise ValueError(f"an encoder gives one (loc, scale); the model has latent sites "
                         f"{list(site_shapes)}: pass site_shapes= for one of them or no encoder")
    num_rows = x.shape[0]
    event_dims, inner, supports = _site_layout(model, structure, (x,) + args, model_kwargs,
                                               site_shapes)
    guide = LocalGuide(num_rows, site_shapes, name=name, plate_name=structure.plate_name,
                       plate_dim=structure.plate_dim, event_dims=event_dims, inner_plates=inner,
                       supports=supports)
    store = pyro.get_param_store()
    if guide.param_name in store:
        del store[guide.param_name]
    guide.table(x.device)
    if encoder is not None:
        with torch.no_grad():
            for start in range(0, num_rows, 1024):
                loc, scale = encoder(x[start:start + 1024])
                guide.initialize(loc, scale, rows=slice(start, start + 1024))
    covered = set(site_shapes) >= set(structure.local_latents)
    # the natural-gradient solver works on Normal φ in the latents' own space, on all rows at once:
    # a site with a constrained support (its Normal goes through biject_to) or a model that
    # subsamples its own plate takes Adam on Pyro's ELBO
    plain = not guide.transforms and not structure.subsample_size
    if method is None:
        method = "natural" if loss is None and covered and plain else "adam"
    if method not in ("natural", "adam"):
        raise ValueError(f"method must be 'natural' or 'adam', got {method!r}")
    if method == "natural" and not plain:
        what = (f"site {next(iter(guide.transforms))!r} has a constrained support" if
                guide.transforms else f"the data plate {structure.plate_name!r} subsamples itself")
        raise ValueError(f"method 'natural' needs unconstrained latents on all rows; {what}: "
                         "use method='adam'")
    if method == "natural":
        if not covered:
            raise ValueError(f"method 'natural' needs every latent site of the data plate in the "
                             f"guide; {sorted(set(structure.local_latents) - set(site_shapes))} "
                             "are not: use method='adam'")
        guide.convergence = solve_local(model, guide, x, *args, max_steps=steps, tol=tol,
                                        num_particles=num_particles or 32, seed=seed,
                                        rows_per_call=batch_size, **model_kwargs)
    else:
        _adam_local(model, guide, structure, x, args, model_kwargs, encoder, steps, lr,
                    batch_size, num_particles or 1, loss, seed)
        guide.convergence = local_convergence(model, guide, x, *args, tol=tol, seed=seed,
                                              **model_kwargs) if covered and plain else None
        if guide.convergence is not None:
            guide.convergence.num_steps.fill_(steps)
    guide.converged = None if guide.convergence is None else guide.convergence.converged
    if guide.convergence is not None and not guide.converged.all():
        bad = (~guide.converged).nonzero().flatten()
        warnings.warn(f"infer_local: φ of {bad.numel()}/{num_rows} rows did not converge within "
                      f"{steps} steps (rows {bad[:8].tolist()}{' ...' if bad.numel() > 8 else ''}; "
                      f"{guide.convergence}); raise num_steps= or check the model", RuntimeWarning)
    return guide


def _adam_local(model, guide, structure, x, args, model_kwargs, encoder, steps, lr, batch_size,
                num_particles, loss, seed):
    """infer_local's "adam" method: SGD on Pyro's ELBO over the new table alone."""
    num_rows = x.shape[0]
    store = pyro.get_param_store()
    batch_size = batch_size or num_rows
    own = structure.subsample_size  # the model subsamples its own plate: steps of its B rows
    if own:
        batch_size = own
    optim = adam(local_lr=lr)
    elbo = loss or pyro.infer.Trace_ELBO(num_particles=num_particles)
    only_this_table = lambda param_name: param_name == guide.param_name  # noqa: E731
    # θ needs no gradients here: switch them off so each step only pays for φ's
    frozen = [store._params[n] for n in store.keys()
              if n != guide.param_name and store._params[n].requires_grad]
    modules = [m for m in (getattr(model, "__self__", None), encoder) if isinstance(m, torch.nn.Module)]
    module_params = [p for m in modules for p in m.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed)
    # the ELBO's draws from the CPU's generator on any device: the same φ on a GPU as on the CPU
    with warnings.catch_warnings(), noise_from_cpu(x.device):
        # pyro.module warns about the parameters frozen here
        warnings.filterwarnings("ignore", message=".*not registered in the param store")
        try:
            for p in frozen + module_params:
                p.requires_grad_(False)
            for step in progress.chunks(steps, 1, "q(z | x) per row (Adam)", unit="step"):
                optim.set_lr_factor(lr_factor("cosine", step, steps))
                order = torch.randperm(num_rows, generator=generator).to(x.device)
                for start in range(0, num_rows, batch_size):
                    idx = order[start:start + batch_size]
                    if own:
                        idx = order[-own:] if len(idx) < own else idx
                    # every per-row argument follows the same rows as x
                    batch, kwargs = program.take((x,) + args, model_kwargs, idx, num_rows)
                    pair = (bind_rows(model, idx, num_rows, structure.plate_name),
                            bind_rows(guide, idx, num_rows, structure.plate_name))
                    if own:
                        pair = _given_rows(model, guide, idx, num_rows, structure.plate_name,
                                           (x,) + args, model_kwargs)
                    svi_step(*pair, optim, elbo, batch, kwargs, param_filter=only_this_table)
        finally:
            for p in frozen + module_params:
                p.requires_grad_(True)


def _given_rows(model, guide, idx, num_rows, plate_name, args, kwargs):
    """(model, guide) for the rows ``idx`` of a model that subsamples its own plate: the model runs
    on all its arguments with its draw replaced by ``idx``, the guide on those rows; both at
    scale 1 (``program.given_subsample``)."""
    given = program.given_subsample(plate_name, idx)

    def model_rows(*_, **__):
        return given(model)(*args, **kwargs)
    return model_rows, given(bind_rows(guide, idx, num_rows, plate_name))


@dataclasses.dataclass
class Gaps:
    """The decomposition of Cremer, Li & Duvenaud (2018), per datapoint (nats).

    log p(x) - ELBO(q_amortized) = [log p(x) - ELBO(q*)] + [ELBO(q*) - ELBO(q_amortized)]
                                 = approximation gap     + amortization gap.
    log_px, elbo_optimal, elbo_amortized: [N]; num_samples: K of the estimate of log p(x).
    log_px_stderr, elbo_optimal_stderr, elbo_amortized_stderr: [N] their Monte Carlo standard
        errors (independent draws, so a gap's is the root sum of squares of its two terms).
    optimal_converged: [N] bool, whether q*'s φ_i converged (``LocalConvergence``); the means
        are over the rows where it did. proposal: how log p(x) was estimated ("pooled": both
        proposals' weights pooled, a deterministic mixture).
    The ``*_stderr`` of a gap in ``summary()`` is the spread over datapoints (std / √N, the error
    of the mean as an estimate over the data distribution); ``*_mc_stderr`` is the Monte Carlo
    error of the mean over these rows (how far a rerun with another seed would move it).
    """

    log_px: torch.Tensor
    elbo_optimal: torch.Tensor
    elbo_amortized: torch.Tensor
    num_samples: int
    log_px_stderr: torch.Tensor | None = None
    elbo_optimal_stderr: torch.Tensor | None = None
    elbo_amortized_stderr: torch.Tensor | None = None
    optimal_converged: torch.Tensor | None = None
    proposal: str | None = None

    def _rows(self):
        if self.optimal_converged is None:
            return torch.ones_like(self.log_px, dtype=torch.bool)
        return self.optimal_converged

    def _mean(self, values):
        return values[self._rows()].mean().item()

    def _mc(self, *stderrs):
        if any(s is None for s in stderrs):
            return math.nan
        rows = self._rows()
        total = sum(s[rows].double() ** 2 for s in stderrs)
        return total.sum().sqrt().item() / max(int(rows.sum()), 1)

    @property
    def approximation_gap(self) -> float:
        """mean over datapoints of log p(x) - ELBO(q*) (a float, nats)."""
        return self._mean(self.log_px - self.elbo_optimal)

    @property
    def amortization_gap(self) -> float:
        """mean over datapoints of ELBO(q*) - ELBO(q_amortized) (a float, nats)."""
        return self._mean(self.elbo_optimal - self.elbo_amortized)

    @property
    def inference_gap(self) -> float:
        """mean of log p(x) - ELBO(q_amortized): the sum of the two gaps."""
        return self._mean(self.log_px - self.elbo_amortized)

    @property
    def approximation_gap_mc_stderr(self) -> float:
        """Monte Carlo standard error of ``approximation_gap`` (a float)."""
        return self._mc(self.log_px_stderr, self.elbo_optimal_stderr)

    @property
    def amortization_gap_mc_stderr(self) -> float:
        """Monte Carlo standard error of ``amortization_gap`` (a float)."""
        return self._mc(self.elbo_optimal_stderr, self.elbo_amortized_stderr)

    @property
    def negative_amortization_gap(self) -> bool:
        """True when the amortization gap is below zero by more than 3 Monte Carlo standard
        errors: impossible if q_amortized is in q*'s family and q* converged, so either q* has
        not reached its optimum or the amortized q is outside the mean-field family."""
        return self.amortization_gap < -3 * self.amortization_gap_mc_stderr

    def stderr(self, values: torch.Tensor) -> float:
        values = values[self._rows()]
        return values.std().item() / math.sqrt(values.numel()) if values.numel() > 1 else 0.0

    def summary(self) -> dict[str, Any]:
        """A dict of floats: the three means, the two gaps and their standard errors (over
        datapoints: ``*_stderr``; Monte Carlo: ``*_mc_stderr``) and the checks."""
        rows = self._rows()
        return {"num_data": self.log_px.numel(), "num_samples": self.num_samples,
                "num_converged": int(rows.sum()), "proposal": self.proposal,
                "log_px": self._mean(self.log_px),
                "log_px_mc_stderr": self._mc(self.log_px_stderr),
                "elbo_optimal": self._mean(self.elbo_optimal),
                "elbo_amortized": self._mean(self.elbo_amortized),
                "approximation_gap": self.approximation_gap,
                "approximation_gap_stderr": self.stderr(self.log_px - self.elbo_optimal),
                "approximation_gap_mc_stderr": self.approximation_gap_mc_stderr,
                "amortization_gap": self.amortization_gap,
                "amortization_gap_stderr": self.stderr(self.elbo_optimal - self.elbo_amortized),
                "amortization_gap_mc_stderr": self.amortization_gap_mc_stderr,
                "negative_amortization_gap": self.negative_amortization_gap,
                "inference_gap": self.inference_gap}

    def __str__(self):
        s = self.summary()
        lines = [
            f"{s['num_data']} datapoints, log p(x) by {s['proposal'] or 'IWAE'} importance "
            f"sampling with K={s['num_samples']}; ± spread over datapoints (Monte Carlo ±)",
            f"  log p(x)                 {s['log_px']:10.3f}         (MC ± {s['log_px_mc_stderr']:.3f})",
            f"  ELBO(q*)                 {s['elbo_optimal']:10.3f}",
            f"  ELBO(q amortized)        {s['elbo_amortized']:10.3f}",
            f"  approximation gap        {s['approximation_gap']:10.3f} ± {s['approximation_gap_stderr']:.3f}"
            f" (MC ± {s['approximation_gap_mc_stderr']:.3f})",
            f"  amortization gap         {s['amortization_gap']:10.3f} ± {s['amortization_gap_stderr']:.3f}"
            f" (MC ± {s['amortization_gap_mc_stderr']:.3f})",
        ]
        if s["num_converged"] < s["num_data"]:
            lines.append(f"  NOT CONVERGED: q* converged on {s['num_converged']}/{s['num_data']} "
                         "rows only; the means are over those rows")
        if s["negative_amortization_gap"]:
            lines.append("  NEGATIVE AMORTIZATION GAP beyond 3 Monte Carlo errors: q amortized is "
                         "outside q*'s (mean-field Normal) family, or q* is not its optimum")
        return "\n".join(lines)


def _encoder_of(guide):
    encoder = getattr(guide, "encoder", None)
    if encoder is None:
        encoder = getattr(getattr(guide, "__self__", None), "encoder", None)
    return encoder


def _rng_states(device):
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None, device)


def _set_rng_states(states):
    cpu, cuda, device = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class _Mixed:
    """Scores importance weights under the equal mixture ½ q* + ½ q_amortized (both proposals'
    draws pooled: Veach & Guibas' balance heuristic, a deterministic mixture), per datapoint."""

    def __init__(self, model, guide, optimal, x, kwargs):
        self.model, self.guide, self.optimal, self.x, self.kwargs = model, guide, optimal, x, kwargs
        self.problem = _LocalProblem(model, optimal, x, (), kwargs, False)
        try:  # the guide's own data plate, read as the model's is
            self.guide_plate = data_plate_name(guide, x, **kwargs)
        except ValueError:  # a guide whose plate cannot be read from a probe: as before, by size
            self.guide_plate = None
        with torch.no_grad():
            table = optimal.table(x.device).detach()
        self.loc = table[:, self.problem.loc_cols.to(x.device)]
        self.scale = table[:, self.problem.scale_cols.to(x.device)].exp()

    def _repeat(self, rows, count):
        _, kwargs = program.take((self.x,), self.kwargs, rows, self.x.shape[0])
        batch = rows.stop - rows.start
        repeat = lambda v: v.repeat(count, *([1] * (v.dim() - 1)))  # noqa: E731
        return repeat(self.x[rows]), {k: repeat(v) if program.is_per_row(v, batch) else v
                                     for k, v in kwargs.items()}

    def log_weights(self, rows, count, source):
        """[count, B] log p(x, z) - log(½ q*(z) + ½ q_a(z)) for z ~ ``source`` ("optimal" or
        "amortized"), and the same with the source alone as the proposal."""
        batch = rows.stop - rows.start
        x, kwargs = self._repeat(rows, count)
        optimal = dist.Normal(self.loc[rows], self.scale[rows])
        if source == "optimal":
            flat = optimal.sample((count,))  # [count, B, W]
            values = self.problem.values(flat, count * batch)
        else:
            # a guide with randomness of its own (SemiAmortizedGuide's refinement noise) is scored
            # at its draws under the same noise: the RNG is rewound for the scoring pass
            before = _rng_states(x.device)
            with poutine.block():
                trace = poutine.trace(self.guide).get_trace(x, **kwargs)
            after = _rng_states(x.device)
            values = {n: s["value"].detach() for n, s in program.sample_sites(trace).items()
                      if not s["is_observed"]}
            if set(values) != set(self.optimal.site_shapes):
                raise ValueError(f"pooled proposals need the same latent sites in both guides: "
                                 f"q* has {sorted(self.optimal.site_shapes)}, the amortized guide "
                                 f"{sorted(values)}; use proposal='amortized'")
            flat = torch.cat([values[n].reshape(count, batch, -1) for n in self.optimal.site_shapes], -1)
        log_p = log_joint(self.model, values, x, plate_name=self.problem.plate_name,
                          **kwargs).reshape(count, batch)
        log_optimal = optimal.log_prob(flat).sum(-1)
        if source != "optimal":
            _set_rng_states(before)
        log_amortized = log_joint(self.guide, values, x, plate_name=self.guide_plate,
                                  **kwargs).reshape(count, batch)
        if source != "optimal":
            _set_rng_states(after)
        mixture = torch.logaddexp(log_optimal, log_amortized) - math.log(2)
        alone = log_optimal if source == "optimal" else log_amortized
        return log_p - mixture, log_p - alone


def _log_mean_exp_stderr(parts):
    """log of the pooled mean weight and its delta-method error from equal-size parts [K_j, N]
    (each part's variance counted on its own: stratified, not i.i.d.)."""
    pooled = torch.cat(parts, 0)
    log_mean = pooled.logsumexp(0) - math.log(pooled.shape[0])
    variance = 0.0
    for part in parts:
        count = part.shape[0]
        relative = (part - log_mean).exp().double()  # w / mean(w)
        variance = variance + relative.var(0) / count * (count / pooled.shape[0]) ** 2
    return log_mean, variance.sqrt().to(log_mean.dtype)


@torch.no_grad()
def _pooled_log_px(model, guide, optimal, x, kwargs, num_samples, seed, sources):
    """log p(x_n) [N] by importance sampling with the weights of ``sources`` pooled (K / 2 draws
    from each of two: the balance heuristic), and its Monte Carlo standard error [N]."""
    mixed = _Mixed(model, guide, optimal, x, kwargs)
    num_rows = x.shape[0]
    per_source = -(-num_samples // len(sources))
    log_px, stderr = [], []
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), noise_from_cpu(x.device):
        for block, start in enumerate(range(0, num_rows, SEED_BLOCK_ROWS)):
            rows = slice(start, min(start + SEED_BLOCK_ROWS, num_rows))
            parts = []
            for s, source in enumerate(sources):
                weights = []
                for particle_block, first in enumerate(range(0, per_source, SEED_BLOCK_PARTICLES)):
                    _seed_block(seed + 1_000_003 * s, block, particle_block)
                    count = min(SEED_BLOCK_PARTICLES, per_source - first)
                    pooled, alone = mixed.log_weights(rows, count, source)
                    weights.append(pooled if len(sources) > 1 else alone)
                parts.append(torch.cat(weights, 0))
            mean, error = _log_mean_exp_stderr(parts)
            log_px.append(mean)
            stderr.append(error)
    return torch.cat(log_px), torch.cat(stderr)


@program.in_evaluation_mode
def amortization_gaps(model: Callable[..., Any], guide: Callable[..., Any], x: torch.Tensor,
                      *args: Any, encoder: torch.nn.Module | None = None,
                      site_shapes: dict[str, int | Sequence[int]] | None = None,
                      num_samples: int = 5000, elbo_samples: int = 1000,
                      local_steps: int | None = None, local_lr: float = 1e-2,
                      proposal: str = "pooled", seed: int = 0, tol: float = 1e-3,
                      **model_kwargs: Any) -> Gaps:
    """Approximation and amortization gaps of a trained model on (held-out) rows x.

    Args:
        model: the trained model p_θ(x, z) (frozen here). guide: its amortized q(z | x) (e.g.
            ``vae.guide``, an ``AmortizedGuide`` or a ``SemiAmortizedGuide``).
        x: [N, D] rows (held-out data); ``*args``, ``**model_kwargs``: the model's further
            arguments (per-row tensors follow x's rows), passed to model and guide alike.
        encoder: x -> (loc, scale) to start q* from (default: ``guide.encoder`` or the encoder of
            the module a bound ``guide`` belongs to); site_shapes: needed without an encoder.
        num_samples: K for the estimate of log p(x) (large: 5000 in Cremer et al.).
        elbo_samples: samples per datapoint for the two ELBO estimates.
        local_steps: the cap on q*'s steps per row (``infer_local``, natural-gradient Newton
            steps until converged; default 200); local_lr: unused (kept for old calls).
        proposal: "pooled" (default): log p(x) by importance sampling with K / 2 draws from q*
            and K / 2 from q_amortized, every weight scored under the mixture ½ q* + ½ q_amortized
            (multiple importance sampling, balance heuristic): unbiased for p(x) and never worse
            than the poorer proposal by more than log 2 in variance terms; "optimal" or
            "amortized": that proposal alone; "best" (the earlier default, kept for old calls):
            the larger of the two single-proposal estimates per row, biased upward.
        seed: seeds q*'s solver and the estimators (every draw from the CPU's generator,
            moved to x's device: the same gaps on a GPU up to float error); tol: q*'s
            convergence tolerance.

    Returns:
        ``Gaps`` (per datapoint values and their Monte Carlo errors; ``summary()``,
        ``approximation_gap``, ``amortization_gap``). Warns when q* did not converge on some rows
        (the means are then over the rows that did) and when the amortization gap is negative
        beyond 3 Monte Carlo errors (``Gaps.negative_amortization_gap``).
    """
    if proposal not in ("pooled", "best", "optimal", "amortized"):
        raise ValueError(f"proposal must be 'pooled', 'optimal', 'amortized' or 'best', got "
                         f"{proposal!r}")
    encoder = encoder if encoder is not None else _encoder_of(guide)
    if args:
        raise ValueError("amortization_gaps passes the model's further arguments by keyword "
                         "(log_marginal calls model(x, **model_kwargs)); name them, e.g. y=y")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # said below, with what it means here
        optimal = infer_local(model, x, site_shapes=site_shapes, encoder=encoder,
                              steps=local_steps, lr=local_lr, name="gaps", seed=seed, tol=tol,
                              **model_kwargs)
    rows = torch.arange(x.shape[0], device=x.device)
    elbo_optimal = estimate_log_marginal(model, optimal, x, method="elbo",
                                         num_samples=elbo_samples, seed=seed, idx=rows,
                                         **model_kwargs)
    elbo_amortized = estimate_log_marginal(model, guide, x, method="elbo",
                                           num_samples=elbo_samples, seed=seed + 1, **model_kwargs)
    if proposal == "best":
        estimates = [estimate_log_marginal(model, optimal, x, num_samples=num_samples,
                                           seed=seed + 2, idx=rows, **model_kwargs),
                     estimate_log_marginal(model, guide, x, num_samples=num_samples,
                                           seed=seed + 3, **model_kwargs)]
        best = torch.stack([e.log_px for e in estimates]).max(0)
        log_px = best.values
        log_px_stderr = torch.stack([e.mc_stderr for e in estimates]).gather(
            0, best.indices[None]).squeeze(0)
    else:
        sources = {"pooled": ("optimal", "amortized"), "optimal": ("optimal",),
                   "amortized": ("amortized",)}[proposal]
        log_px, log_px_stderr = _pooled_log_px(model, guide, optimal, x, model_kwargs,
                                               num_samples, seed + 2, sources)
    converged = optimal.converged if optimal.converged is not None else torch.ones_like(
        log_px, dtype=torch.bool)
    gaps = Gaps(log_px, elbo_optimal.log_px, elbo_amortized.log_px, num_samples, log_px_stderr,
                elbo_optimal.mc_stderr, elbo_amortized.mc_stderr, converged, proposal)
    if not converged.all():
        warnings.warn(f"amortization_gaps: q* did not converge on {int((~converged).sum())}/"
                      f"{len(converged)} rows ({optimal.convergence}); the gaps are reported over "
                      "the rows where it did: raise local_steps=", RuntimeWarning)
    if gaps.negative_amortization_gap:
        warnings.warn(f"amortization_gaps: the amortization gap {gaps.amortization_gap:.4f} is "
                      f"negative beyond 3 Monte Carlo errors (± {gaps.amortization_gap_mc_stderr:.4f})"
                      ": ELBO(q_amortized) > ELBO(q*) is impossible for an amortized q in q*'s "
                      "(mean-field Normal) family; the amortized guide is outside it, or q* is "
                      "not its optimum", RuntimeWarning)
    return gaps
