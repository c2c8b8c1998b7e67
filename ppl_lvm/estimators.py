"""Estimators of log p(x), one number per datapoint, for ANY Pyro model/guide pair with a data plate.

The lecture's ladder: naive Monte Carlo from the prior (log mean_k p(x | z_k)), importance sampling
with a proposal q(z | x) (log (1/K) Σ_k p(x, z_k) / q(z_k | x), the IWAE bound), the ELBO
((1/K) Σ_k log p(x, z_k) / q(z_k | x)), and the exact marginal when every latent is discrete.
Log weights w_{k,n} are read off the traces site by site, so the estimators never know a model by
name; they are vectorised over K, chunked over datapoints, and combined with log-sum-exp. The same
machinery gives ``IWAE_ELBO``, the importance-weighted training objective (optionally with DReG).
"""
import dataclasses
import inspect
import math
import warnings

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import detach
from pyro.infer import ELBO, config_enumerate
from pyro.infer.util import site_is_subsample
from pyro.poutine.messenger import Messenger

METHODS = ("prior", "uniform", "is", "iwae", "elbo", "exact")
GUIDE_METHODS = ("is", "iwae", "elbo")
# With a seed, rows are drawn in fixed blocks of SEED_BLOCK_ROWS rows and SEED_BLOCK_PARTICLES
# particles, each from its own RNG stream seeded by (seed, row block, particle block): the
# answer then cannot depend on chunk_size (it would if a stream covered a whole user chunk).
SEED_BLOCK_ROWS = 32
SEED_BLOCK_PARTICLES = 1024
DEFAULT_MEMORY_BYTES = 1 << 30
# activations a model computes but never puts in its trace (hidden layers): a rough allowance
_ACTIVATION_FACTOR = 4
_PARTICLE_PLATE = "_num_particles_vectorized"
_MODEL_ERRORS = (RuntimeError, ValueError, IndexError, TypeError)


@dataclasses.dataclass
class LogMarginalEstimate:
    """Per-datapoint estimates of log p(x) and how much to trust them.

    log_px: [N] the estimates (nats), on x's device.
    ess: [N] effective sample size of the importance weights, (Σ_k w_k)² / Σ_k w_k², in [1, K]
        (NaN for "exact", which draws no samples).
    rows_per_call, particles_per_call: how the work was chunked (vectorised calls of that size).
    vectorized: False when the model could not be vectorised and particles were looped.
    """

    log_px: torch.Tensor
    ess: torch.Tensor
    method: str
    num_samples: int
    rows_per_call: int = None
    particles_per_call: int = None
    vectorized: bool = True

    @property
    def mean(self):
        """The mean of log p(x) over datapoints (a float)."""
        return self.log_px.mean().item()

    @property
    def stderr(self):
        """Standard error of ``mean`` over datapoints: std(log p(x_n)) / √N (0 for N = 1)."""
        n = self.log_px.numel()
        return self.log_px.std().item() / math.sqrt(n) if n > 1 else 0.0

    def __repr__(self):
        return (f"LogMarginalEstimate(method={self.method!r}, K={self.num_samples}, "
                f"N={self.log_px.numel()}, mean={self.mean:.4f} ± {self.stderr:.4f}, "
                f"median ESS={self.ess.median().item():.1f})")


def log_marginal(model, guide, x, *, method="iwae", num_samples=1000, plate_name="data",
                 chunk_size=None, seed=None, idx=None, memory_bytes=None, **model_kwargs):
    """Per-datapoint estimates of log p(x_n): the IWAE / importance-sampling estimator by default.

    Args:
        model, guide: Pyro programs called as ``model(x, **model_kwargs)``; every sample site lives
            in ``pyro.plate(plate_name)`` over the rows of x. The guide also gets ``idx`` (the rows'
            indices) when it accepts it, so per-datapoint guides read their own φ_n; ``num_data`` is
            never passed (no N / B scaling at evaluation). ``guide`` may be None for "prior",
            "uniform" and "exact".
        x: [N, ...] the data; the estimates follow its device.
        method: one of ``METHODS``:
            "prior": log (1/K) Σ_k p(x | z_k), z_k ~ p(z) (naive Monte Carlo);
            "uniform": log (1/K) Σ_k |Z| p(x, z_k), z_k uniform on a finite discrete latent space;
            "is" / "iwae": log (1/K) Σ_k p(x, z_k) / q(z_k | x), z_k ~ q(z | x) (the same number);
            "elbo": (1/K) Σ_k log p(x, z_k) / q(z_k | x);
            "exact": log Σ_z p(x, z) by enumerating discrete latents (K is ignored).
        num_samples: K ≥ 1.
        plate_name: the plate over datapoints.
        chunk_size: rows per vectorised call; None picks it from ``memory_bytes``. With a seed
            the rows are drawn in fixed blocks (``SEED_BLOCK_ROWS``) whatever chunk_size is, so the
            answer does not depend on it.
        seed: optional int; the same seed gives the same answer for any chunk_size. Without one,
            the global RNG is used (``pyro.set_rng_seed``).
        idx: optional [N] long, the rows' indices for a per-datapoint guide (default arange(N)).
        memory_bytes: rough budget per vectorised call (default 1 GiB); K is chunked too when K
            alone exceeds it.
        **model_kwargs: passed to model and guide; tensors whose first dim is N are sliced with x.

    Returns:
        [N] tensor on x's device. ``estimate_log_marginal`` also gives mean, stderr and ESS.
    """
    return estimate_log_marginal(
        model, guide, x, method=method, num_samples=num_samples, plate_name=plate_name,
        chunk_size=chunk_size, seed=seed, idx=idx, memory_bytes=memory_bytes, **model_kwargs
    ).log_px


@torch.no_grad()
def estimate_log_marginal(model, guide, x, *, method="iwae", num_samples=1000, plate_name="data",
                          chunk_size=None, seed=None, idx=None, memory_bytes=None, **model_kwargs):
    """``log_marginal`` returning a ``LogMarginalEstimate`` (per-datapoint values, mean, stderr, ESS)."""
    num_samples = _check_inputs(guide, x, method, num_samples, chunk_size, idx)
    num_rows = x.shape[0]
    device = x.device
    if idx is None:
        idx = torch.arange(num_rows, device=device)
    idx = idx.to(device)
    memory_bytes = DEFAULT_MEMORY_BYTES if memory_bytes is None else int(memory_bytes)
    if seed is not None:  # a seeded call leaves the global RNG as it found it
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return _estimate(model, guide, x, method, num_samples, plate_name, chunk_size, seed,
                             idx, memory_bytes, model_kwargs)
    return _estimate(model, guide, x, method, num_samples, plate_name, chunk_size, seed, idx,
                     memory_bytes, model_kwargs)


def _estimate(model, guide, x, method, num_samples, plate_name, chunk_size, seed, idx,
              memory_bytes, model_kwargs):
    num_rows, device = x.shape[0], x.device
    program = _Program(model, guide, x, method, plate_name, idx, model_kwargs)
    if method == "exact":
        rows_per_call = chunk_size or max(1, memory_bytes // max(program.bytes_per_unit, 1))
        particles_per_call = 1
    else:
        rows_per_call, particles_per_call = _plan(
            num_rows, num_samples, chunk_size, seed, memory_bytes, program.bytes_per_unit)

    log_px, ess = [], []
    for block, start in enumerate(range(0, num_rows, rows_per_call)):
        rows = slice(start, min(start + rows_per_call, num_rows))
        if method == "exact":
            log_px.append(program.exact(rows))
            ess.append(torch.full_like(log_px[-1], float("nan")))
            continue
        totals = _RunningWeights()
        for particle_block, first in enumerate(range(0, num_samples, particles_per_call)):
            count = min(particles_per_call, num_samples - first)
            _seed_block(seed, block, particle_block)
            totals.add(program.log_weights(rows, count))
        log_px.append(totals.elbo() if method == "elbo" else totals.log_mean_weight())
        ess.append(totals.ess())
    return LogMarginalEstimate(torch.cat(log_px), torch.cat(ess), method, num_samples,
                               rows_per_call, particles_per_call, program.vectorized)


# ----------------------------------------------------------------------------------------------
# inputs, plans, seeds


def _check_inputs(guide, x, method, num_samples, chunk_size, idx):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor [N, ...], got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have shape [N, ...] with N ≥ 1 rows, got {tuple(x.shape)}")
    if x.is_floating_point() and torch.isnan(x).any():
        bad = torch.isnan(x).reshape(x.shape[0], -1).any(-1).nonzero().flatten()
        raise ValueError(f"x contains NaN in {bad.numel()} rows (first: {bad[:5].tolist()}); "
                         "mask missing values in the model instead")
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples (K) must be an integer ≥ 1, got {num_samples!r}")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if method in GUIDE_METHODS and guide is None:
        raise ValueError(f"method {method!r} needs a guide q(z | x); use 'prior' without one")
    if idx is not None and tuple(idx.shape) != (x.shape[0],):
        raise ValueError(f"idx must have shape [{x.shape[0]}] to match x, got {tuple(idx.shape)}")
    return int(num_samples)


def _plan(num_rows, num_samples, chunk_size, seed, memory_bytes, bytes_per_unit):
    """Rows and particles per vectorised call so that rows × particles × bytes fits the budget."""
    units = max(1, memory_bytes // max(bytes_per_unit, 1))
    if seed is not None:
        rows = SEED_BLOCK_ROWS
        particles = max(1, min(num_samples, SEED_BLOCK_PARTICLES, units // rows))
        return rows, particles
    rows = chunk_size or max(1, min(num_rows, units // num_samples))
    particles = max(1, min(num_samples, units // rows))
    return rows, particles


def _seed_block(seed, block, particle_block):
    """Seed torch's RNG for one block from (seed, row block, particle block) (a no-op without seed)."""
    if seed is not None:
        state = np.random.SeedSequence([int(seed), block, particle_block]).generate_state(2)
        torch.manual_seed(int(state[0]) << 32 | int(state[1]))


class _RunningWeights:
    """log Σ_k w_k, log Σ_k w_k² and Σ_k log w_k over particle chunks, per datapoint."""

    def __init__(self):
        self.log_sum = self.log_sum_sq = self.sum_log = None
        self.count = 0

    def add(self, log_weights):  # [K', n]
        parts = (torch.logsumexp(log_weights, 0), torch.logsumexp(2 * log_weights, 0),
                 log_weights.sum(0))
        if self.log_sum is None:
            self.log_sum, self.log_sum_sq, self.sum_log = parts
        else:
            self.log_sum = torch.logaddexp(self.log_sum, parts[0])
            self.log_sum_sq = torch.logaddexp(self.log_sum_sq, parts[1])
            self.sum_log = self.sum_log + parts[2]
        self.count += log_weights.shape[0]

    def log_mean_weight(self):
        return self.log_sum - math.log(self.count)

    def elbo(self):
        return self.sum_log / self.count

    def ess(self):
        return (2 * self.log_sum - self.log_sum_sq).exp().nan_to_num(1.0).clamp(1.0, self.count)


# ----------------------------------------------------------------------------------------------
# traces -> per-datapoint log weights


def accepts(fn, name):
    """Whether callable ``fn`` takes keyword ``name`` (explicitly or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def sample_sites(trace):
    """The trace's sample sites that are real random variables (not a plate's subsample)."""
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


def latent_names(trace):
    return [name for name, site in sample_sites(trace).items() if not site["is_observed"]]


def plate_nesting(*traces):
    """max_plate_nesting: how many batch dims the programs' plates use (as Pyro's ELBOs infer it)."""
    dims = [frame.dim for trace in traces for site in sample_sites(trace).values()
            for frame in site["cond_indep_stack"] if frame.vectorized]
    return -min(dims) if dims else 0


def data_frame(site, plate_name):
    for frame in site["cond_indep_stack"]:
        if frame.name == plate_name:
            return frame
    return None


def check_data_plate(traces, plate_name):
    """Every sample site must sit in the data plate (else no per-datapoint decomposition exists)."""
    found, outside = set(), []
    for trace in traces:
        for name, site in sample_sites(trace).items():
            found.update(frame.name for frame in site["cond_indep_stack"])
            if data_frame(site, plate_name) is None:
                outside.append(name)
    if not any(data_frame(site, plate_name) is not None
               for trace in traces for site in sample_sites(trace).values()):
        plates = ", ".join(repr(p) for p in sorted(found)) or "none"
        raise ValueError(f"no plate named {plate_name!r} over datapoints in the model; plates "
                         f"found: {plates}. Put local sites in pyro.plate({plate_name!r}, N) or "
                         "pass plate_name=")
    if outside:
        raise ValueError(f"sites {sorted(set(outside))} are outside the data plate {plate_name!r}: "
                         "log p(x) does not split into per-datapoint terms with a global latent "
                         "(integrate it out in the model, or fix it as a parameter)")


def site_log_prob(site, log_prob, plate_name, nesting):
    """A site's log-prob summed over all plate dims except the data plate's: [..., n].

    ``log_prob`` is the unscaled log-density with the site's mask applied. Dims left of the
    plates (the particle dim -(nesting + 1), enumeration dims further left) are kept.
    """
    mask = site["mask"]
    if mask is not None:
        if isinstance(mask, bool):
            log_prob = log_prob if mask else torch.zeros_like(log_prob)
        else:
            log_prob = torch.where(mask, log_prob, torch.zeros_like(log_prob))
    data_dim = data_frame(site, plate_name).dim
    while log_prob.dim() < nesting:
        log_prob = log_prob.unsqueeze(0)
    sum_dims = [dim for dim in range(-nesting, 0) if dim != data_dim]
    if sum_dims:
        log_prob = log_prob.sum(sum_dims, keepdim=True)
    return log_prob.reshape(log_prob.shape[:-nesting] + (log_prob.shape[data_dim],))


def unscaled_log_prob(site):
    """log p of the site's value, without the plate's N / B scale or poutine.scale (annealing)."""
    if "unscaled_log_prob" not in site:
        site["unscaled_log_prob"] = site["fn"].log_prob(site["value"], *site["args"],
                                                        **site["kwargs"])
    return site["unscaled_log_prob"]


def log_joint(trace, plate_name, nesting, observed_only=False):
    """Σ over the trace's sample sites of log p, per datapoint: [..., n]."""
    total = 0.0
    for site in sample_sites(trace).values():
        if observed_only and not site["is_observed"]:
            continue
        total = total + site_log_prob(site, unscaled_log_prob(site), plate_name, nesting)
    return total


def vectorize(fn, num_particles, nesting, device):
    """``fn`` run under a plate of K particles at dim -(nesting + 1), as Pyro's vectorised ELBOs do."""
    def vectorized(*args, **kwargs):
        with pyro.plate(_PARTICLE_PLATE, num_particles, dim=-(nesting + 1), device=device):
            return fn(*args, **kwargs)
    return vectorized


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
        msg["infer"]["_uniform_log_q"] = torch.full(batch_shape, -math.log(size),
                                                    device=support.device)


class _Program:
    """A model/guide pair bound to x: checked once, then asked for log weights of row chunks."""

    def __init__(self, model, guide, x, method, plate_name, idx, model_kwargs):
        self.model, self.guide, self.x, self.method = model, guide, x, method
        self.plate_name, self.idx, self.model_kwargs = plate_name, idx, model_kwargs
        self.uses_guide = method in GUIDE_METHODS
        self.guide_takes_idx = self.uses_guide and accepts(guide, "idx")
        self.vectorized = True
        self._probe()

    def _args(self, rows):
        num_rows = self.x.shape[0]
        kwargs = {key: value[rows] if isinstance(value, torch.Tensor) and value.dim() > 0
                  and value.shape[0] == num_rows else value
                  for key, value in self.model_kwargs.items()}
        guide_kwargs = dict(kwargs, idx=self.idx[rows]) if self.guide_takes_idx else kwargs
        return self.x[rows], kwargs, guide_kwargs

    def _traces(self, rows, num_particles=None):
        """Guide and model traces of one chunk; vectorised over K particles when given."""
        x, kwargs, guide_kwargs = self._args(rows)
        model, guide = self.model, self.guide
        if num_particles is not None:
            model = vectorize(model, num_particles, self.nesting, x.device)
            guide = guide and vectorize(guide, num_particles, self.nesting, x.device)
        try:
            if self.method == "uniform":
                return None, poutine.trace(_UniformProposal()(model)).get_trace(x, **kwargs)
            if not self.uses_guide:
                return None, poutine.trace(model).get_trace(x, **kwargs)
            guide_trace = poutine.trace(guide).get_trace(x, **guide_kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                x, **kwargs)
            return guide_trace, model_trace
        except _MODEL_ERRORS as error:
            if num_particles is not None:
                raise
            raise self._shape_error(error, rows) from error

    def _shape_error(self, error, rows):
        shape = tuple(self.x[rows].shape)
        return ValueError(f"the model/guide failed on x of shape {tuple(self.x.shape)} (a chunk of "
                          f"shape {shape}): {type(error).__name__}: {error}")

    def _probe(self):
        rows = slice(0, min(self.x.shape[0], 2))
        guide_trace, model_trace = self._traces(rows)
        traces = [t for t in (guide_trace, model_trace) if t is not None]
        check_data_plate(traces, self.plate_name)
        if self.uses_guide:
            model_latents = set(latent_names(model_trace))
            guide_latents = set(latent_names(guide_trace))
            if model_latents != guide_latents:
                raise ValueError(
                    f"the guide's sites do not match the model's latent sites: missing from the "
                    f"guide {sorted(model_latents - guide_latents)}, in the guide but not latent "
                    f"in the model {sorted(guide_latents - model_latents)}")
        self.nesting = plate_nesting(*traces)
        if self.method == "exact":
            self.bytes_per_unit = self._bytes(traces, rows.stop) * 8
            return
        try:
            self._weights_from_traces(guide_trace, model_trace)
        except _MODEL_ERRORS as error:
            raise self._shape_error(error, rows) from error
        try:  # a vectorised probe: K = 2 particles
            log_weights = self._log_weights_vectorized(rows, 2)
            if log_weights.shape != (2, rows.stop):
                raise RuntimeError(f"log weights of shape {tuple(log_weights.shape)}")
            guide_trace, model_trace = self._last_traces
            traces = [t for t in (guide_trace, model_trace) if t is not None]
            self.bytes_per_unit = self._bytes(traces, 2 * rows.stop)
        except _MODEL_ERRORS as error:
            warnings.warn(f"the model/guide could not be vectorised over particles ({error}); "
                          "falling back to a loop over particles, which is slower", RuntimeWarning)
            self.vectorized = False
            self.bytes_per_unit = self._bytes(traces, rows.stop)

    @staticmethod
    def _bytes(traces, units):
        total = 0
        for trace in traces:
            for site in sample_sites(trace).values():
                fn = site["fn"]
                params = (fn.batch_shape + fn.event_shape).numel() * 2
                total += (site["value"].numel() + params) * site["value"].element_size()
        return max(1, _ACTIVATION_FACTOR * total // units)

    def _weights_from_traces(self, guide_trace, model_trace):
        if self.method == "prior":
            return log_joint(model_trace, self.plate_name, self.nesting, observed_only=True)
        log_weights = log_joint(model_trace, self.plate_name, self.nesting)
        if self.method == "uniform":
            for site in sample_sites(model_trace).values():
                if "_uniform_log_q" in site["infer"]:
                    log_weights = log_weights - site_log_prob(
                        site, site["infer"]["_uniform_log_q"], self.plate_name, self.nesting)
            return log_weights
        return log_weights - log_joint(guide_trace, self.plate_name, self.nesting)

    def _log_weights_vectorized(self, rows, num_particles):
        guide_trace, model_trace = self._traces(rows, num_particles)
        self._last_traces = guide_trace, model_trace
        log_weights = self._weights_from_traces(guide_trace, model_trace)
        num_rows = log_weights.shape[-1]
        return log_weights.reshape(-1, num_rows).expand(num_particles, num_rows)

    def log_weights(self, rows, num_particles):
        """log w_{k,n} = log p(x_n, z_k) - log q(z_k | x_n) for the chunk: [K, n]."""
        if self.vectorized:
            return self._log_weights_vectorized(rows, num_particles)
        return torch.stack([self._weights_from_traces(*self._traces(rows)).reshape(-1)
                            for _ in range(num_particles)])

    def exact(self, rows):
        """log Σ_z p(x_n, z) by parallel enumeration of every latent site: [n]."""
        x, kwargs, _ = self._args(rows)
        model = config_enumerate(self.model, "parallel")
        enumerated = poutine.enum(model, first_available_dim=-(self.nesting + 1))
        trace = poutine.trace(enumerated).get_trace(x, **kwargs)
        for name, site in sample_sites(trace).items():
            if site["is_observed"]:
                continue
            if site["infer"].get("enumerate") != "parallel":
                raise ValueError(f"method 'exact' needs every latent site discrete and "
                                 f"enumerable; site {name!r} is {type(site['fn']).__name__}")
            inner = [f.name for f in site["cond_indep_stack"]
                     if f.vectorized and f.name != self.plate_name]
            if inner:
                raise ValueError(f"method 'exact' enumerates latents directly in the data plate "
                                 f"only; site {name!r} is also in plates {inner}")
        joint = log_joint(trace, self.plate_name, self.nesting)  # [*enum dims, n]
        return joint.reshape(-1, joint.shape[-1]).logsumexp(0)


# ----------------------------------------------------------------------------------------------
# the IWAE training objective


class IWAE_ELBO(ELBO):
    """The importance-weighted bound as a training loss, per datapoint: -Σ_n s log (1/K) Σ_k w_{k,n}.

    Usable wherever a Pyro ELBO is (``fit(..., loss=IWAE_ELBO(K))``, ``SVI``): ``loss``,
    ``differentiable_loss`` and ``loss_and_grads``. log w_{k,n} is built from each site's unscaled,
    masked log-prob summed over the plates other than the data plate; the log-mean-exp over K is
    taken per datapoint and then multiplied by the sites' common scale s = N / B (from the data
    plate's subsampling or from ``fit``'s poutine.scale for models without ``num_data``), so a
    minibatch loss estimates the full-data loss (s log mean w, not log mean w^s). Sites with
    different scales (annealing) are refused.

    ``dreg=True`` uses the doubly-reparameterised gradient (Tucker et al. 2018) for the guide: the
    guide's distribution parameters are stopped in log q and the path gradient is weighted by the
    squared normalised weights w̃²; the model's parameters keep the usual w̃ weighting. Requires
    reparameterised guide sites (as does the plain estimator here).

    On Pyro's ``RenyiELBO(alpha=0)``: it also keeps the data plate's dim when *every* sample site is
    in that plate (it only sums plates not shared by all sites), so without subsampling it is the
    same per-datapoint IWAE bound. But (1) it uses the *scaled* log-probs, so with N / B scaling
    (or poutine.scale annealing) it computes log mean_k w^s instead of s log mean_k w — a
    different, Rényi-like objective — and (2) as soon as one site lies outside the data plate (a
    global latent) it sums the batch into one log weight per particle: a single bound over the
    whole minibatch. tests/test_estimators.py shows both.
    """

    def __init__(self, num_particles=10, dreg=False, plate_name="data", max_plate_nesting=None):
        if int(num_particles) != num_particles or num_particles < 1:
            raise ValueError(f"num_particles (K) must be an integer ≥ 1, got {num_particles!r}")
        super().__init__(num_particles=int(num_particles))
        self.dreg = dreg
        self.plate_name = plate_name
        self.max_plate_nesting = max_plate_nesting

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("IWAE_ELBO draws its K particles in one vectorised trace")

    def _nesting(self, model, guide, args, kwargs):
        if self.max_plate_nesting is None:
            devices = [a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda][:1]
            with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=devices):
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
                model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                    *args, **kwargs)
            check_data_plate([guide_trace, model_trace], self.plate_name)
            self.max_plate_nesting = plate_nesting(guide_trace, model_trace)
        return self.max_plate_nesting

    def _surrogate(self, model, guide, args, kwargs):
        """(per-datapoint bound [B], surrogate whose gradient is the estimator's, scale s)."""
        nesting = self._nesting(model, guide, args, kwargs)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        model = vectorize(model, self.num_particles, nesting, device)
        guide = vectorize(guide, self.num_particles, nesting, device)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs)
        check_data_plate([guide_trace, model_trace], self.plate_name)
        for name, site in sample_sites(guide_trace).items():
            if not site["fn"].has_rsample:
                raise NotImplementedError(f"IWAE_ELBO needs reparameterised guide sites; site "
                                          f"{name!r} ({type(site['fn']).__name__}) is not")
        scale = self._scale(guide_trace, model_trace)
        log_p = log_joint(model_trace, self.plate_name, nesting)
        log_q = log_joint(guide_trace, self.plate_name, nesting)
        size = log_p.shape[-1]
        log_weights = (log_p - log_q).reshape(-1, size).expand(self.num_particles, size)
        bound = torch.logsumexp(log_weights, 0) - math.log(self.num_particles)  # [B]
        if not self.dreg:
            return bound, bound, scale
        weights = torch.softmax(log_weights.detach(), 0)
        log_q_stopped = 0.0
        for site in sample_sites(guide_trace).values():
            stopped = detach(site["fn"]).log_prob(site["value"])
            log_q_stopped = log_q_stopped + site_log_prob(site, stopped, self.plate_name, nesting)
        values = {name: site["value"].detach() for name, site in sample_sites(guide_trace).items()}
        model_trace_fixed_z = poutine.trace(poutine.condition(model, data=values)).get_trace(
            *args, **kwargs)
        log_p_fixed_z = log_joint(model_trace_fixed_z, self.plate_name, nesting)
        path = (log_p - log_q_stopped).reshape(-1, size).expand(self.num_particles, size)
        log_p_fixed_z = log_p_fixed_z.reshape(-1, size).expand(self.num_particles, size)
        # encoder φ: Σ_k w̃_k² ∂ log w_k / ∂z ∂z/∂φ; decoder θ: Σ_k w̃_k ∇θ log p(x, z_k)
        surrogate = (weights**2 * path + (weights - weights**2) * log_p_fixed_z).sum(0)
        return bound, surrogate, scale

    @staticmethod
    def _scale(*traces):
        """s: the one scale of every site (N / B from the data plate or from fit's poutine.scale)."""
        scales = {name: float(site["scale"]) for trace in traces
                  for name, site in sample_sites(trace).items()}
        low, high = min(scales.values()), max(scales.values())
        if high - low > 1e-6 * high:
            raise ValueError(f"IWAE_ELBO needs the same scale at every site (N / B), got {scales}: "
                             "annealing one term has no per-datapoint importance-weighted meaning")
        return high

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """-Σ_n s · IWAE_K(x_n), differentiable (its gradient is DReG's when dreg=True)."""
        bound, surrogate, scale = self._surrogate(model, guide, args, kwargs)
        loss = -scale * bound.sum()
        surrogate_loss = -scale * surrogate.sum()
        return loss.detach() + surrogate_loss - surrogate_loss.detach()

    def loss(self, model, guide, *args, **kwargs):
        """-Σ_n s · IWAE_K(x_n) as a float."""
        with torch.no_grad():
            bound, _, scale = self._surrogate(model, guide, args, kwargs)
        return -scale * bound.sum().item()

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()
