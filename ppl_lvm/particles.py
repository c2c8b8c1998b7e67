"""Particles: a program run under a plate of K particles, seeded in fixed blocks, chunked to a
memory budget, and the running summary of the log weights they give (``LogMarginalEstimate``).

The pieces every estimator of log p(x) shares (importance sampling here and in
``ppl_lvm.estimators``, AIS in ``ppl_lvm.ais``): one place, below both, so neither imports the other
in a circle.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import numpy as np
import pyro
import torch
import torch.distributions.lowrank_multivariate_normal
import torch.distributions.multivariate_normal
import torch.distributions.normal
import torch.distributions.studentT

from ppl_lvm.program import sample_sites
from ppl_lvm.psis import pareto_khat, tail_size

# With a seed, rows are drawn in fixed blocks of SEED_BLOCK_ROWS rows and SEED_BLOCK_PARTICLES
# particles, each from its own RNG stream seeded by (seed, row block, particle block), one block per
# vectorised call whatever chunk_size and memory_bytes say: the answer then depends only on
# (seed, rows, K), not on the chunking, the memory budget or the device's default budget.
SEED_BLOCK_ROWS = 32
SEED_BLOCK_PARTICLES = 128
# per vectorised call. On the CPU a small budget is faster: every chunk of a large one maps and
# unmaps fresh memory (K = 1000 on 300 MNIST images: 1 GiB 5.8 s, 64 MiB 3.4 s, system time 2.4 s
# -> 0.03 s); on a GPU large calls amortise the kernel launches.
DEFAULT_MEMORY_BYTES = 1 << 30
CPU_MEMORY_BYTES = 64 << 20


def default_memory_bytes(device):
    """The default budget per vectorised call on ``device`` (64 MiB on the CPU, 1 GiB on a GPU)."""
    return CPU_MEMORY_BYTES if torch.device(device).type == "cpu" else DEFAULT_MEMORY_BYTES
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
    globals: how global latents were handled: None (the model has none), "median" (fixed at the
        guide's median: log p(x_n | globals)) or "sample:S" (log (1/S) Σ_s p(x_n | g_s), g_s ~ q).
    mc_stderr: [N] the Monte Carlo standard error of each estimate from its own K weights (the
        delta method on the log of the mean weight: sqrt(var(w) / K) / mean(w) =
        sqrt((K / ESS - 1) / (K - 1)); for "elbo" std(log w) / √K; 0 for "exact"). It says how far
        a rerun with another seed would move log p(x_n); ``stderr`` is the spread over datapoints.
    khat: [N] Pareto k̂ of the importance weights (PSIS, ``ppl_lvm.psis``): below 0.5 fine,
        0.5-0.7 slow convergence, above 0.7 the estimate cannot be trusted (``unreliable``);
        inf where no tail can be fitted (K < ~25, or 4 or fewer weights above the cutoff: tied
        or constant weights, as arviz).
    compiled: under ``compile=``, one line on the compiled path (graphs recorded and the time it
        took, graphs taken from an earlier call, chunks on a graph and eager, or why it ran
        eagerly); None without.
    """

    log_px: torch.Tensor
    ess: torch.Tensor
    method: str
    num_samples: int
    rows_per_call: int | None = None
    particles_per_call: int | None = None
    vectorized: bool = True
    globals: str | None = None
    khat: torch.Tensor | None = None
    mc_stderr: torch.Tensor | None = None
    compiled: str | None = None

    @property
    def unreliable(self) -> torch.Tensor:
        """[N] bool: Pareto k̂ > 0.7, where the importance-weighted estimate cannot be trusted
        (Vehtari et al.). Where k̂ could not be fitted (NaN for "exact", inf for K < ~25) this
        says nothing: False."""
        if self.khat is None:
            return torch.zeros_like(self.log_px, dtype=torch.bool)
        return torch.isfinite(self.khat) & (self.khat > 0.7)  # inf: no tail to tell from

    @property
    def mean(self) -> float:
        """The mean of log p(x) over datapoints (a float)."""
        return self.log_px.mean().item()

    @property
    def stderr(self) -> float:
        """Standard error of ``mean`` over datapoints: std(log p(x_n)) / √N (0 for N = 1)."""
        n = self.log_px.numel()
        return self.log_px.std().item() / math.sqrt(n) if n > 1 else 0.0

    @property
    def mean_mc_stderr(self) -> float | None:
        """The Monte Carlo standard error of ``mean`` (rows are estimated independently):
        sqrt(Σ_n mc_stderr_n²) / N; None where the estimator gave none."""
        if self.mc_stderr is None:
            return None
        return (self.mc_stderr.double() ** 2).sum().sqrt().item() / self.log_px.numel()

    def __repr__(self):
        given = "" if self.globals is None else f", globals={self.globals!r}"
        khat = "" if self.khat is None or not torch.isfinite(self.khat).any() else (
            f", k̂ > 0.7 for {int(self.unreliable.sum())}/{self.log_px.numel()}")
        mc = "" if self.mc_stderr is None else f" (Monte Carlo ± {self.mean_mc_stderr:.4f})"
        return (f"LogMarginalEstimate(method={self.method!r}, K={self.num_samples}, "
                f"N={self.log_px.numel()}, mean={self.mean:.4f} ± {self.stderr:.4f} over "
                f"datapoints{mc}, "
                f"median ESS={self.ess.median().item():.1f}{khat}{given})")


def _plan(num_rows, num_samples, chunk_size, seed, memory_bytes, bytes_per_unit, row_bound=False):
    """Rows and particles per vectorised call so that rows × particles × bytes fits the budget.

    row_bound: the guide holds one parameter per row of x (an autoguide over local sites), so
    every call takes all rows and only the particles are chunked.
    """
    units = max(1, memory_bytes // max(bytes_per_unit, 1))
    if seed is not None:
        # one seed block per call, whatever the budget: the draws must not depend on it (a block
        # larger than a tiny budget is taken whole: "memory_bytes" is a rough budget)
        rows = num_rows if row_bound else SEED_BLOCK_ROWS
        return rows, max(1, min(num_samples, SEED_BLOCK_PARTICLES))
    if row_bound:
        return num_rows, max(1, min(num_samples, units // num_rows))
    rows = chunk_size or max(1, min(num_rows, units // num_samples))
    particles = max(1, min(num_samples, units // rows))
    return rows, particles


def _seed_block(seed, block, particle_block):
    """Seed torch's RNG for one block from (seed, row block, particle block) (a no-op without seed)."""
    if seed is not None:
        state = np.random.SeedSequence([int(seed), block, particle_block]).generate_state(2)
        seed_all(int(state[0]) << 32 | int(state[1]))


@functools.lru_cache(maxsize=1)
def _accelerators():
    """Whether an accelerator's generator exists besides the CPU's (CUDA, MPS, XPU, MTIA)."""
    checks = (torch.cuda, getattr(torch.backends, "mps", None), getattr(torch, "xpu", None),
              getattr(torch, "mtia", None))
    for module in checks:
        try:
            if module is not None and module.is_available():
                return True
        except Exception:  # a backend that cannot even say: seed it the slow, safe way
            return True
    return False


def seed_all(seed):
    """``torch.manual_seed(seed)``, without its cost on a CPU-only machine: there it also queues a
    lazy seeding of every absent accelerator, which records a Python stack each time (about 1 ms,
    a quarter of a K = 1 estimate made of one call per 32-row seed block). The CPU's generator
    ends in the same state either way."""
    if _accelerators():
        torch.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(seed)


# the modules whose rsample draws ε ~ N(0, I) through torch.distributions.utils._standard_normal,
# each under its own name: Normal (and so LogNormal, Pyro's Normal and its autoguides),
# MultivariateNormal, LowRankMultivariateNormal, StudentT
_NORMAL_MODULES = (torch.distributions.normal, torch.distributions.multivariate_normal,
                   torch.distributions.lowrank_multivariate_normal, torch.distributions.studentT)
_standard_normal = torch.distributions.utils._standard_normal


def _standard_normal_from_cpu(shape, dtype, device):
    """ε ~ N(0, I) [*shape] drawn by the CPU's generator, then moved to ``device``: the numbers a
    CPU run draws, on any device."""
    if torch._C._get_tracing_state():
        return _standard_normal(shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device="cpu").normal_().to(device)


# torch's samplers that distributions call by name (``torch.bernoulli(...)`` is looked up at each
# call, so a patch of the attribute reaches them): Bernoulli, Categorical and OneHotCategorical
# (multinomial), Uniform (rand), Normal.sample (normal), Gamma, Chi2 (_standard_gamma), Dirichlet
# and Beta (_sample_dirichlet), Poisson, Binomial; and rand/randn/randint/randperm called
# directly (the estimators' uniform proposal, a subsampling plate's randperm)
_SAMPLERS = ("bernoulli", "multinomial", "normal", "rand", "randn", "randint", "randperm",
             "rand_like", "randn_like", "_standard_gamma", "_sample_dirichlet", "poisson",
             "binomial")
_TORCH_SAMPLERS = {name: getattr(torch, name) for name in _SAMPLERS}


def _draw_on_cpu(sampler, args, kwargs):
    """``sampler(*args, **kwargs)`` drawn by the CPU's generator (its tensor arguments moved to the
    CPU, a ``device=`` replaced by the CPU) and moved to the device it would have drawn on."""
    if (kwargs.get("generator") is not None or kwargs.get("out") is not None
            or torch._C._get_tracing_state()):
        return sampler(*args, **kwargs)  # an explicit generator or output decides the device
    tensors = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
    device = kwargs.get("device")
    if device is None:
        device = tensors[0].device if tensors else torch.get_default_device()
    if sampler.__name__.endswith("_like"):  # only its shape, dtype and strides count
        args = (torch.empty_like(args[0], device="cpu"),) + tuple(args[1:])
    args = tuple(a.cpu() if torch.is_tensor(a) else a for a in args)
    kwargs = {k: v.cpu() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    if not tensors or "device" in kwargs:
        kwargs["device"] = "cpu"
    return sampler(*args, **kwargs).to(device)


def _sampler_from_cpu(name):
    sampler = _TORCH_SAMPLERS[name]

    @functools.wraps(sampler)
    def from_cpu(*args, **kwargs):
        return _draw_on_cpu(sampler, args, kwargs)
    return from_cpu


_SAMPLERS_FROM_CPU = {name: _sampler_from_cpu(name) for name in _SAMPLERS}


@contextlib.contextmanager
def noise_from_cpu(device):
    """Within: seeded draws on ``device`` come from the CPU's generator (seeded by
    ``_seed_block``, as on the CPU) and are moved there, so that a seeded estimate on a GPU uses
    the noise of the same estimate on the CPU and the two agree up to float error (a discrete draw
    may still differ where a probability computed on the device differs in its last bit).

    Routed (each draws exactly the numbers, in the order, of a CPU run): the reparameterised
    Normal family (Normal, LogNormal, HalfNormal, MultivariateNormal, LowRankMultivariateNormal,
    StudentT's normal part, Pyro's Normal autoguides) through ``_standard_normal``; and every
    call of ``torch.bernoulli``, ``multinomial``, ``normal``, ``rand``, ``randn``, ``randint``,
    ``randperm``, ``rand_like``, ``randn_like``, ``_standard_gamma``, ``_sample_dirichlet``,
    ``poisson`` and ``binomial`` without an explicit ``generator=`` or ``out=``: Bernoulli,
    Categorical, OneHotCategorical, Uniform, Normal.sample, Gamma, Chi2, StudentT, Dirichlet, Beta,
    Poisson, Binomial, the estimators' uniform proposal (``torch.randint``), a subsampling plate
    (``torch.randperm``) and completion's Metropolis draws (``torch.rand_like``). Not routed
    (still drawn by the device's own generator, so such a site makes a seeded answer
    device-dependent, and every draw after it on another stream): samplers that fill a tensor in
    place (Exponential, Laplace, Geometric, Cauchy, Gumbel: ``exponential_``, ``uniform_``,
    ``cauchy_``), relaxed (Gumbel-softmax) distributions, and anything drawn with its own device
    generator or under JIT tracing.

    A no-op on the CPU (its draws are already those, at no cost). Re-entrant; the patches of
    torch's Normal modules and samplers are undone on exit.
    """
    if torch.device(device).type == "cpu" or _NORMAL_MODULES[0]._standard_normal is not _standard_normal:
        yield
        return
    for module in _NORMAL_MODULES:
        module._standard_normal = _standard_normal_from_cpu
    for name, sampler in _SAMPLERS_FROM_CPU.items():
        setattr(torch, name, sampler)
    try:
        yield
    finally:
        for module in _NORMAL_MODULES:
            module._standard_normal = _standard_normal
        for name, sampler in _TORCH_SAMPLERS.items():
            setattr(torch, name, sampler)


class _RunningWeights:
    """log Σ_k w_k, log Σ_k w_k² and Σ_k log w_k over particle chunks, per datapoint, and the
    largest M + 1 log weights for the Pareto k̂ (``ppl_lvm.psis``)."""

    def __init__(self, num_samples=None):
        self.log_sum = self.log_sum_sq = self.sum_log = self.sum_log_sq = None
        self.count = 0
        self.num_samples = num_samples
        self.keep = None if num_samples is None else tail_size(num_samples) + 1
        self.top = None

    def add_top(self, log_weights):
        if self.keep is None:
            return
        top = log_weights if self.top is None else torch.cat([self.top, log_weights], 0)
        self.top = top.topk(min(self.keep, top.shape[0]), dim=0).values

    def khat(self):
        """[N] Pareto k̂ of the weights (inf where K is too small for a tail fit)."""
        return pareto_khat(self.top, num_samples=self.num_samples).to(self.top.dtype)

    def add(self, log_weights):  # [K', n]
        self.add_top(log_weights)
        parts = (torch.logsumexp(log_weights, 0), torch.logsumexp(2 * log_weights, 0),
                 log_weights.sum(0), log_weights.double().pow(2).sum(0))
        if self.log_sum is None:
            self.log_sum, self.log_sum_sq, self.sum_log, self.sum_log_sq = parts
        else:
            self.log_sum = torch.logaddexp(self.log_sum, parts[0])
            self.log_sum_sq = torch.logaddexp(self.log_sum_sq, parts[1])
            self.sum_log = self.sum_log + parts[2]
            self.sum_log_sq = self.sum_log_sq + parts[3]
        self.count += log_weights.shape[0]

    def log_mean_weight(self):
        return self.log_sum - math.log(self.count)

    def elbo(self):
        return self.sum_log / self.count

    def ess(self):
        return (2 * self.log_sum - self.log_sum_sq).exp().nan_to_num(1.0).clamp(1.0, self.count)

    def stderr(self):
        """[N] Monte Carlo standard error of log mean_k w_k by the delta method,
        sqrt(var(w) / K) / mean(w) = sqrt((K Σw² / (Σw)² - 1) / (K - 1)) (NaN for K = 1)."""
        if self.count < 2:
            return torch.full_like(self.log_sum, math.nan)
        ratio = (self.log_sum_sq.double() - 2 * self.log_sum.double()).exp()  # Σw² / (Σw)² = 1 / ESS
        return ((self.count * ratio - 1) / (self.count - 1)).clamp(min=0).sqrt().to(self.log_sum.dtype)

    def elbo_stderr(self):
        """[N] Monte Carlo standard error of the ELBO estimate mean_k log w_k: std(log w) / √K."""
        if self.count < 2:
            return torch.full_like(self.sum_log, math.nan)
        mean = self.sum_log.double() / self.count
        variance = (self.sum_log_sq - self.count * mean ** 2) / (self.count - 1)
        return (variance.clamp(min=0) / self.count).sqrt().to(self.sum_log.dtype)


def trace_bytes(traces):
    """Bytes of the traces' sample values and (roughly) their distributions' parameters."""
    total = 0
    for trace in traces:
        for site in sample_sites(trace).values():
            fn = site["fn"]
            params = (fn.batch_shape + fn.event_shape).numel() * 2
            total += (site["value"].numel() + params) * site["value"].element_size()
    return total


def vectorize(fn, num_particles, nesting, device):
    """``fn`` run under a plate of K particles at dim -(nesting + 1), as Pyro's vectorised ELBOs do."""
    def vectorized(*args, **kwargs):
        with pyro.plate(_PARTICLE_PLATE, num_particles, dim=-(nesting + 1), device=device):
            return fn(*args, **kwargs)
    return vectorized
