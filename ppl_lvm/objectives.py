"""Training objectives beyond Pyro's own: the importance-weighted bound (IWAE), optionally with the
doubly-reparameterised gradient (DReG), as a loss per datapoint that minibatches estimate unbiasedly.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.infer import ELBO

from ppl_lvm import densities, program
from ppl_lvm.particles import _MODEL_ERRORS, vectorize
from ppl_lvm.program import sample_sites


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
    different objective, larger by the power-mean inequality, so its minibatch loss is not an
    estimate of the full-data IWAE loss — and (2) as soon as one site lies outside the data plate (a
    global latent) it sums the batch into one log weight per particle: a single bound over the
    whole minibatch. tests/test_estimators.py shows both.
    """

    def __init__(self, num_particles: int = 10, dreg: bool = False, plate_name: str | None = None,
                 max_plate_nesting: int | None = None) -> None:
        if int(num_particles) != num_particles or num_particles < 1:
            raise ValueError(f"num_particles (K) must be an integer ≥ 1, got {num_particles!r}")
        super().__init__(num_particles=int(num_particles))
        self.dreg = dreg
        self.plate_name = plate_name
        self.max_plate_nesting = max_plate_nesting
        self.vectorized = None  # None: not tried yet; False: particles are looped

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("IWAE_ELBO draws its K particles in one vectorised trace")

    def _setup(self, model, guide, args, kwargs):
        """Read the data plate and the plate nesting once from a (side-effect-free) trace pair."""
        if self.max_plate_nesting is not None and self.plate_name is not None:
            return
        device = next((a.device for a in args if torch.is_tensor(a)), None)
        with program.sandbox(device), torch.no_grad():
            guide_trace, model_trace = densities.trace_pair(model, guide, args, kwargs)
        if self.plate_name is None:
            self.plate_name = program.row_plate(model_trace, program.num_rows_of(args))
        structure = program.structure_of(model_trace, self.plate_name)
        if structure.global_sites:
            raise ValueError(
                f"sites {sorted(structure.global_sites)} are outside the data plate "
                f"{self.plate_name!r}: the IWAE bound is per datapoint, and a global latent has no "
                "per-datapoint weight (train it with Trace_ELBO, or fix it as a parameter)")
        program.check_pair(structure, guide_trace)
        if self.max_plate_nesting is None:
            self.max_plate_nesting = program.plate_nesting(guide_trace, model_trace)

    def _trace_pairs(self, model, guide, args, kwargs):
        """[(guide trace, model trace)]: one pair vectorised over the K particles, or K pairs when
        the program cannot be vectorised (e.g. it reads a batch shape); returns (pairs, model)."""
        nesting = self.max_plate_nesting
        device = next((a.device for a in args if torch.is_tensor(a)), None)
        if self.vectorized is not False:
            vectorized_model = vectorize(model, self.num_particles, nesting, device)
            vectorized_guide = vectorize(guide, self.num_particles, nesting, device)
            try:
                guide_trace, model_trace = densities.trace_pair(vectorized_model,
                                                                vectorized_guide, args, kwargs)
                size = program.num_rows_of(args)
                densities.row_log_weights(model_trace, guide_trace, self.plate_name, size, nesting)
                self.vectorized = True
                return [(guide_trace, model_trace)], vectorized_model
            except densities.DensityError:
                raise
            except _MODEL_ERRORS as error:
                if self.vectorized:  # it worked before: a real error
                    raise
                warnings.warn(f"IWAE_ELBO could not vectorise the model/guide over particles "
                              f"({error}); looping over the K particles, which is slower",
                              RuntimeWarning)
                self.vectorized = False
        pairs = []
        for _ in range(self.num_particles):
            pairs.append(densities.trace_pair(model, guide, args, kwargs))
        return pairs, model

    def _stack(self, values, size):
        stacked = torch.cat([v.reshape(-1, size) for v in values], 0)
        if stacked.shape[0] != self.num_particles:
            raise RuntimeError(f"{stacked.shape[0]} particles' terms where {self.num_particles} "
                               "were drawn")
        return stacked

    def _surrogate(self, model, guide, args, kwargs, gradient=True):
        """(per-datapoint bound [B], surrogate whose gradient is the estimator's, scale s)."""
        self._setup(model, guide, args, kwargs)
        plate, nesting = self.plate_name, self.max_plate_nesting
        pairs, particle_model = self._trace_pairs(model, guide, args, kwargs)
        for name, site in sample_sites(pairs[0][0]).items():
            if not site["fn"].has_rsample:
                raise NotImplementedError(f"IWAE_ELBO needs reparameterised guide sites; site "
                                          f"{name!r} ({type(site['fn']).__name__}) is not")
        scale = self._scale(*pairs[0])
        size = program.num_rows_of(args)
        terms = [densities.row_terms(m, g, plate, size, nesting) for g, m in pairs]
        log_p = self._stack([p for p, _ in terms], size)
        log_q = self._stack([q for _, q in terms], size)
        log_weights = log_p - log_q  # [K, B]
        bound = torch.logsumexp(log_weights, 0) - math.log(self.num_particles)  # [B]
        if not (self.dreg and gradient):
            return bound, bound, scale
        weights = torch.softmax(log_weights.detach(), 0)
        log_q_stopped, log_p_fixed_z = [], []
        for guide_trace, model_trace in pairs:
            log_q_stopped.append(densities.row_terms(model_trace, guide_trace, plate, size, nesting,
                                                     stop_guide_params=True)[1])
            values = {n: s["value"].detach() for n, s in sample_sites(guide_trace).items()}
            fixed = densities.trace_given(particle_model, values, args, kwargs)
            log_p_fixed_z.append(densities.row_terms(fixed, None, plate, size, nesting)[0])
        path = log_p - self._stack(log_q_stopped, size)
        log_p_fixed_z = self._stack(log_p_fixed_z, size)
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

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any],
                            *args: Any, **kwargs: Any) -> torch.Tensor:
        """-Σ_n s · IWAE_K(x_n), differentiable (its gradient is DReG's when dreg=True)."""
        bound, surrogate, scale = self._surrogate(model, guide, args, kwargs)
        loss = -scale * bound.sum()
        surrogate_loss = -scale * surrogate.sum()
        return loss.detach() + surrogate_loss - surrogate_loss.detach()

    def loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
             **kwargs: Any) -> float:
        """-Σ_n s · IWAE_K(x_n) as a float."""
        with torch.no_grad():
            bound, _, scale = self._surrogate(model, guide, args, kwargs, gradient=False)
        return -scale * bound.sum().item()

    def loss_and_grads(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
                       **kwargs: Any) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()
