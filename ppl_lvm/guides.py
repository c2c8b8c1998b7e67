"""Guides for SVI, amortized or not: the lecture's φ_i per datapoint versus one encoder f_λ(x).

- ``LocalGuide``: a table of φ_i = (μ_i, log σ_i), one row per datapoint (non-amortized SVI);
  minibatches read and update only their rows (sparse gradients, lazy Adam).
- ``AmortizedGuide``: q(z | x) = N(f_λ(x)), any encoder module.
- ``SemiAmortizedGuide``: start at f_λ(x), then refine by S SVI steps (Kim et al. 2018).
- ``refine`` and ``solve_local``: the per-row steps the semi-amortized and local guides take.
  Recipes that train a guide (``infer_local``, ``amortization_gaps``) are in ``ppl_lvm.recipes``.
- ``score_function_infer``: REINFORCE with a baseline for discrete (non-reparameterisable) sites.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch.distributions import biject_to, constraints
from torch.nn import functional as F

from ppl_lvm.plate import data_plate
from ppl_lvm.optim import lr_factor
from ppl_lvm import compiled, densities, program, progress
from ppl_lvm.program import LOCAL_PREFIX

NEW_ROWS_HINT = "new rows need their own φ: use ppl_lvm.infer_local"


def _shape(size):
    return torch.Size((size,) if isinstance(size, int) else tuple(size))


def _to_support(site, support):
    """The elementwise bijection from the real line onto ``support`` (None for the real line), or
    ValueError naming the site when a Normal cannot be carried there elementwise."""
    base = support
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    if base is constraints.real:
        return None
    if base.is_discrete or base.event_dim != 0:
        raise ValueError(
            f"site {site!r} has support {support}, which a per-datapoint Normal cannot reach "
            "elementwise: give it a guide of its own (or enumerate it, if discrete)")
    return biject_to(base)


class LocalGuide:
    """Per-datapoint mean-field Normal guide: q(z_i) = N(μ_i, diag σ_i²), a table row per datapoint.

    The table [N, 2 * Σ_sites numel] lives in the param store as ``"local$$$" + name``, so ``fit``
    treats it as local φ (``inner_steps``, lazy Adam at ``local_lr``) and checkpoints it. Rows are
    read with a sparse embedding lookup: a step reads and changes only the batch's rows, and costs
    the same for any N.

    Args:
        num_data: N, the number of datapoints (rows) the table covers.
        site_shapes: {site name: event shape (int or tuple)} of the model's latent sites in the
            "data" plate, e.g. ``{"z": 20}``; each becomes Normal(μ_i, σ_i).to_event(len(shape)).
        init_loc, init_scale: every row's starting μ and σ (σ > 0); ``initialize`` sets rows from
            an encoder instead.
        name: distinguishes several tables in one param store (e.g. training vs new rows).
        plate_name, plate_dim: the model's plate over the rows, its name and dim (``infer_local``
            reads them); event_dims: {site: how many right dims of its shape are event dims}
            (default: all); inner_plates: {site: [(name, size, dim)] of the model's other plates
            around it}, entered so that the guide's values line up with the model's.
        supports: {site: the model's support of it} (``infer_local`` reads them): a site whose
            support is not the real line (a Gamma, LogNormal or Exponential site: positive; a Beta:
            the unit interval) gets the Normal pushed through ``biject_to(support)`` (e.g. a
            log-normal for a positive site), so every value it proposes is one the model accepts.
            A support that is not elementwise (a simplex, a correlation matrix) or is discrete is
            refused, naming the site.
        refine_after_fit: at the end of ``fit``, with θ fixed at its final value, take every
            row's φ_i to its q* (``solve_local``: per-row natural-gradient Newton steps until the
            residual is below 1e-3, at most 200 steps); ``fit`` then reports the per-row
            convergence (``FitResult.local_convergence``) and warns when rows did not converge.
            Minibatch SGD on φ_i alone stalls far from q* (each row is updated once per epoch with
            a noisy gradient); after the refinement the final φ_i are the lecture's
            argmax_φ ELBO(θ, φ) for the θ that training produced. False: only measure them.

    Call as ``guide(x, idx=None, num_data=None)``: x [B, ...]; idx [B] long, the rows' indices
    (may be omitted only when B == N).
    """

    def __init__(self, num_data: int, site_shapes: dict[str, int | Sequence[int]],
                 init_loc: float = 0.0, init_scale: float = 1.0, name: str = "phi",
                 plate_name: str = "data", plate_dim: int | None = None,
                 event_dims: dict[str, int] | None = None,
                 inner_plates: dict[str, Sequence[tuple[str, int, int]]] | None = None,
                 refine_after_fit: bool = True,
                 supports: dict[str, constraints.Constraint] | None = None) -> None:
        if num_data < 1:
            raise ValueError(f"num_data must be >= 1, got {num_data}")
        if not site_shapes:
            raise ValueError("site_shapes must name at least one latent site, e.g. {'z': 20}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        if "$$$" in name:
            raise ValueError(f"name must not contain '$$$', got {name!r}")
        self.num_data = int(num_data)
        self.site_shapes = {site: _shape(shape) for site, shape in site_shapes.items()}
        self.init_loc, self.init_scale = float(init_loc), float(init_scale)
        self.name, self.plate_name, self.plate_dim = name, plate_name, plate_dim
        self.event_dims = {s: len(shape) for s, shape in self.site_shapes.items()}
        self.event_dims.update(event_dims or {})
        self.inner_plates = {s: list(p) for s, p in (inner_plates or {}).items()}
        # {site: biject_to its support} for the sites whose support is not the real line
        transforms = {s: _to_support(s, c) for s, c in (supports or {}).items()
                      if s in self.site_shapes}
        self.transforms = {s: t for s, t in transforms.items() if t is not None}
        self.param_name = LOCAL_PREFIX + name
        self._slices, start = {}, 0
        for site, shape in self.site_shapes.items():
            size = shape.numel()
            self._slices[site] = (slice(start, start + size), slice(start + size, start + 2 * size))
            start += 2 * size
        self.width = start
        self.refine_after_fit = bool(refine_after_fit)
        self.convergence = self.converged = None

    def after_fit(self, model: Callable[..., Any], data: Sequence[torch.Tensor],
                  model_kwargs: dict[str, Any] | None = None, tol: float = 1e-3,
                  max_steps: int = 200, seed: int = 0) -> LocalConvergence | None:
        """Called by ``fit`` at its end with the training rows ``data`` (a tuple of tensors [N, ...],
        as the model takes them): q* of every row by ``solve_local`` (``refine_after_fit``) or
        only a measurement (``local_convergence``). Sets and returns ``self.convergence``."""
        x, args = data[0], tuple(data[1:])
        kwargs = dict(model_kwargs or {})
        rows = torch.arange(self.num_data, device=x.device)
        if self.transforms:  # solve_local works in the Normal's own space, not through biject_to
            self.convergence = self.converged = None
            return None
        if self.refine_after_fit:
            self.convergence = solve_local(model, self, x, *args, rows=rows, max_steps=max_steps,
                                           tol=tol, seed=seed, **kwargs)
        else:
            self.convergence = local_convergence(model, self, x, *args, rows=rows, tol=tol,
                                                 seed=seed, **kwargs)
        self.converged = self.convergence.converged
        return self.convergence

    def __repr__(self):
        return (f"LocalGuide(num_data={self.num_data}, site_shapes="
                f"{ {k: tuple(v) for k, v in self.site_shapes.items()} }, name={self.name!r})")

    def _initial_table(self, device):
        table = torch.full((self.num_data, self.width), self.init_loc, device=device)
        for _, scale_cols in self._slices.values():
            table[:, scale_cols] = math.log(self.init_scale)
        return table

    def table(self, device: str | torch.device | None = None) -> torch.Tensor:
        """The φ table [N, width] from the param store (created at the initial values if absent)."""
        device = device or torch.device("cpu")
        return pyro.param(self.param_name, lambda: self._initial_table(device))

    def _rows(self, x, idx, num_data):
        if num_data is not None and int(num_data) != self.num_data:
            raise ValueError(f"this local guide was fitted on {self.num_data} rows but is called "
                             f"with num_data={num_data}; {NEW_ROWS_HINT}")
        if idx is None:
            if x.shape[0] != self.num_data:
                raise ValueError(f"this local guide was fitted on {self.num_data} rows; got "
                                 f"{x.shape[0]} rows without idx (pass idx [B], the rows' "
                                 f"indices); {NEW_ROWS_HINT}")
            return torch.arange(self.num_data, device=x.device)
        if idx.shape != (x.shape[0],):
            raise ValueError(f"idx must have shape [{x.shape[0]}], got {tuple(idx.shape)}")
        if idx.numel() and not compiled.is_recording() and (
                int(idx.min()) < 0 or int(idx.max()) >= self.num_data):
            raise IndexError(f"this local guide was fitted on {self.num_data} rows; idx reaches "
                             f"{int(idx.max())}: {NEW_ROWS_HINT}")
        return idx.to(x.device)

    def __call__(self, x, *args, idx=None, num_data=None, **kwargs):
        rows = self._rows(x, idx, num_data)
        phi = F.embedding(rows, self.table(x.device), sparse=True)  # [B, width]
        with data_plate(x, rows, self.num_data, name=self.plate_name, dim=self.plate_dim):
            for site, shape in self.site_shapes.items():
                loc_cols, scale_cols = self._slices[site]
                loc = phi[:, loc_cols].reshape(-1, *shape)
                scale = phi[:, scale_cols].reshape(-1, *shape).exp()
                with contextlib.ExitStack() as plates:
                    for plate_name, size, plate_dim in self.inner_plates.get(site, ()):
                        plates.enter_context(pyro.plate(plate_name, size, dim=plate_dim))
                    q = dist.Normal(loc, scale)
                    if self.transforms.get(site) is not None:
                        q = dist.TransformedDistribution(q, self.transforms[site])
                    pyro.sample(site, q.to_event(self.event_dims[site]))

    @torch.no_grad()
    def loc(self, site: str | None = None) -> torch.Tensor:
        """μ_i of ``site`` for all rows: [N, *shape] (a copy)."""
        site = self._site(site)
        return self.table()[:, self._slices[site][0]].reshape(self.num_data, *self.site_shapes[site]).clone()

    @torch.no_grad()
    def scale(self, site: str | None = None) -> torch.Tensor:
        """σ_i of ``site`` for all rows: [N, *shape]."""
        site = self._site(site)
        return self.table()[:, self._slices[site][1]].reshape(self.num_data, *self.site_shapes[site]).exp()

    def _site(self, site):
        if site is None:
            if len(self.site_shapes) != 1:
                raise ValueError(f"name the site: one of {list(self.site_shapes)}")
            return next(iter(self.site_shapes))
        if site not in self.site_shapes:
            raise KeyError(f"unknown site {site!r}; this guide holds {list(self.site_shapes)}")
        return site

    @torch.no_grad()
    def initialize(self, loc: torch.Tensor, scale: torch.Tensor, site: str | None = None,
                   rows: torch.Tensor | slice | None = None) -> LocalGuide:
        """Set μ_i, σ_i of ``rows`` (default: all) to loc, scale [R, *shape] (e.g. an encoder's)."""
        site = self._site(site)
        shape = self.site_shapes[site]
        table = self.table(loc.device)
        rows = slice(None) if rows is None else rows
        loc_cols, scale_cols = self._slices[site]
        count = table[rows].shape[0]
        table[rows, loc_cols] = loc.reshape(count, shape.numel()).to(table)
        table[rows, scale_cols] = scale.reshape(count, shape.numel()).log().to(table)
        return self


class AmortizedGuide:
    """q(z | x) = N(μ_λ(x), diag σ_λ(x)²): one encoder f_λ for all datapoints (amortized SVI).

    Args:
        encoder: an nn.Module, x [B, ...] -> (loc [B, *shape], scale [B, *shape]), scale > 0
            (e.g. ``ppl_lvm.models.vae.Encoder``).
        site: the latent site's name; event_dim: how many right dims of loc are the event.
        name: the encoder's name in the param store.
    """

    def __init__(self, encoder: torch.nn.Module, site: str = "z", event_dim: int = 1,
                 name: str = "encoder") -> None:
        self.encoder, self.site, self.event_dim, self.name = encoder, site, event_dim, name

    def __call__(self, x, *args, idx=None, num_data=None, **kwargs):
        pyro.module(self.name, self.encoder)
        loc, scale = self.encoder(x)
        with data_plate(x, idx, num_data):
            pyro.sample(self.site, dist.Normal(loc, scale).to_event(self.event_dim))


def log_joint(model: Callable[..., Any], values: dict[str, torch.Tensor], x: torch.Tensor,
              idx: torch.Tensor | None = None, num_data: int | None = None,
              model_args: Sequence[Any] = (), plate_name: str | None = None,
              **kwargs: Any) -> torch.Tensor:
    """log p_θ(x_i, z_i) per datapoint, z given by ``values`` {site: [B, ...]}: returns [B].

    Unscaled by N / B (but masks apply), through the density kernel (``ppl_lvm.densities``).
    Every latent sample site of ``model`` must be in ``values``; the model's own sites are hidden
    from any enclosing trace. ``model_args``: the model's positional arguments after x (e.g.
    labels y [B]). ``plate_name``: the data plate, as ``data_plate_name`` reads it from the
    program's structure (every caller in the package passes it); by default the one plate as long
    as x, a size match that a second plate of the same size (features, say) defeats. A term
    outside the data plate (an observed global, a factor) is constant in every z_i: it is shared
    equally by the rows, so the rows still sum to log p(x, z).
    """
    call_kwargs = dict(kwargs)
    if program.takes_rows(model):
        call_kwargs.update(idx=idx, num_data=num_data)
    with poutine.block():
        trace = densities.trace_given(model, values, (x,) + tuple(model_args), call_kwargs)
    for name, site in program.sample_sites(trace).items():
        if not site["is_observed"]:
            raise ValueError(f"model has latent site {name!r} that the guide does not cover "
                             f"(covered: {list(values)})")
    batch_size = x.shape[0]
    plate_name = plate_name or program.row_plate(trace, batch_size)
    terms = densities.split(trace, plate_name, scaled=False)
    rows = terms.rows.reshape(-1, batch_size).sum(0) if torch.is_tensor(terms.rows) else (
        x.new_zeros(batch_size))
    return rows + terms.global_total / batch_size


def data_plate_name(model: Callable[..., Any], x: torch.Tensor, model_args: Sequence[Any] = (),
                    **kwargs: Any) -> str:
    """The name of ``model``'s data plate, read from its structure (``program.inspect_program``:
    the plate whose size follows the rows, probed on 2 and 3 of them) rather than by a size match
    on one trace, which a second plate as long as the batch would fool. x: [B, ...]."""
    return program.inspect_program(model, x, *model_args, allow_subsample=True,
                                   **kwargs).plate_name


def refine(model: Callable[..., Any], x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
           *, steps: int = 10, lr: float = 0.2, num_particles: int = 8, site: str = "z",
           idx: torch.Tensor | None = None, num_data: int | None = None, unroll: bool = False,
           model_args: Sequence[Any] = (), plate_name: str | None = None,
           **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Raise ELBO(μ, σ) = E_q[log p(x, z)] + H[q] per datapoint by ``steps`` SGD steps on (μ, log σ).

    loc, scale: [B, *shape] the starting φ (e.g. an encoder's output). Each step averages
    ``num_particles`` reparameterised samples z = μ + σ ε per row (the model sees the rows
    repeated) and uses the exact Normal entropy; the step size decays from lr to lr / 100 along a
    cosine so the last φ is not jittered by gradient noise. ``unroll=False``: the result carries
    gradients to loc/scale as if the refinement were the identity (first order); ``unroll=True``:
    gradients flow through the unrolled steps (Kim et al. 2018; a second-order backward).
    plate_name: the model's data plate (default: read by ``data_plate_name``, a few cheap model
    calls; ``SemiAmortizedGuide`` reads it once). Returns (loc, scale) [B, *shape].
    """
    if plate_name is None:
        plate_name = data_plate_name(model, x, model_args, **kwargs)
    event_dims = tuple(range(1, loc.dim()))
    batch_size = x.shape[0]
    repeated_x = x.repeat(num_particles, *([1] * (x.dim() - 1)))
    repeated_idx = None if idx is None else idx.repeat(num_particles)
    repeated_args = tuple(a.repeat(num_particles, *([1] * (a.dim() - 1)))
                          if program.is_per_row(a, batch_size) else a for a in model_args)
    kwargs = {k: v.repeat(num_particles, *([1] * (v.dim() - 1)))
              if program.is_per_row(v, batch_size) else v for k, v in kwargs.items()}
    with torch.enable_grad():
        start_loc, start_log_scale = loc, scale.log()
        if unroll:
            params = [start_loc, start_log_scale]
        else:
            params = [start_loc.detach().requires_grad_(), start_log_scale.detach().requires_grad_()]
        for t in range(steps):
            loc_t, log_scale_t = params
            noise = torch.randn((num_particles,) + loc_t.shape, dtype=loc.dtype, device=loc.device)
            z = (loc_t + log_scale_t.exp() * noise).reshape(num_particles * batch_size, *loc.shape[1:])
            log_p = log_joint(model, {site: z}, repeated_x, repeated_idx, num_data,
                              model_args=repeated_args, plate_name=plate_name, **kwargs)
            objective = log_p.sum() / num_particles + log_scale_t.sum(event_dims).sum()
            grad_loc, grad_log_scale = torch.autograd.grad(objective, params, create_graph=unroll)
            step_size = lr * lr_factor("cosine", t, steps)
            # natural gradient of a Normal (Fisher: 1/σ² for μ, 2 for log σ); clipped so a far too
            # wide start cannot overshoot: μ moves at most 2σ, log σ at most 1 per step
            variance = (2 * log_scale_t).exp().detach()
            loc_step = (step_size * variance * grad_loc).clamp(-2 * variance.sqrt(), 2 * variance.sqrt())
            log_scale_step = (step_size * grad_log_scale / 2).clamp(-1.0, 1.0)
            params = [loc_t + loc_step, log_scale_t + log_scale_step]
            if not unroll:
                params = [p.detach().requires_grad_() for p in params]
    if unroll:
        return params[0], params[1].exp()
    loc_out = start_loc + (params[0] - start_loc).detach()
    log_scale_out = start_log_scale + (params[1] - start_log_scale).detach()
    return loc_out, log_scale_out.exp()


# ----------------------------------------------------------------------------------------------
# per-datapoint φ_i that converge and say so


@dataclasses.dataclass
class LocalConvergence:
    """How far each row's φ_i = (μ_i, log σ_i) is from a stationary point of its ELBO.

    residual: [M] the largest natural-gradient component of the row, in units that do not depend
        on the model's scale: |σ ∂ELBO/∂μ| (how many σ the mean would still move) and
        |∂ELBO/∂log σ| / 2 (how much log σ would still move), max over coordinates; at q* both
        are 0. converged: [M] bool, residual < tol. num_steps: [M] steps each row took.
    elbo: [M] the row's ELBO at the end (the estimate the solver climbed; nats).
    """

    converged: torch.Tensor
    residual: torch.Tensor
    num_steps: torch.Tensor
    elbo: torch.Tensor
    tol: float

    @property
    def fraction(self) -> float:
        """The fraction of rows that converged (a float)."""
        return self.converged.float().mean().item()

    def __str__(self):
        return (f"{int(self.converged.sum())}/{self.converged.numel()} rows converged "
                f"(natural-gradient residual < {self.tol:g}; worst {self.residual.max().item():.2g}, "
                f"median {self.residual.median().item():.2g}; steps ≤ {int(self.num_steps.max())})")


def _table_columns(guide):
    """Column indices of every site's μ and log σ in the table, in one flat order: ([W], [W])."""
    loc_cols, scale_cols = [], []
    for site in guide.site_shapes:
        loc_slice, scale_slice = guide._slices[site]
        loc_cols.extend(range(loc_slice.start, loc_slice.stop))
        scale_cols.extend(range(scale_slice.start, scale_slice.stop))
    return torch.tensor(loc_cols), torch.tensor(scale_cols)


def _standard_points(num_pairs, num_rows, width, generator, dtype, device):
    """Antithetic, whitened standard normal points ε [2m, B, W] per row: their mean is exactly 0
    and their covariance exactly I, so E_q[f(μ + σ ε)] is exact for any quadratic f (a Gaussian
    posterior's log-joint) and an unbiased-to-second-order Monte Carlo average otherwise."""
    noise = torch.randn(num_pairs, num_rows, width, generator=generator, dtype=torch.float64)
    second_moment = torch.einsum("mbi,mbj->bij", noise, noise) / num_pairs  # [B, W, W]
    root = torch.linalg.cholesky(second_moment + 1e-12 * torch.eye(width, dtype=torch.float64))
    white = torch.linalg.solve_triangular(root, noise.permute(1, 2, 0), upper=False)  # [B, W, m]
    white = white.permute(2, 0, 1)
    return torch.cat([white, -white]).to(dtype=dtype, device=device)


class _LocalProblem:
    """ELBO_i(μ_i, log σ_i) = E_ε[log p(x_i, μ_i + σ_i ε)] + Σ log σ_i + const over fixed points ε
    (``_standard_points``), its gradient and the Price estimate of the Hessian's diagonal, for a
    LocalGuide's sites of a model with θ fixed. Rows are independent: every quantity is [B, W]."""

    def __init__(self, model, guide, x, args, kwargs, takes_idx):
        self.model, self.guide, self.x, self.args, self.kwargs = model, guide, x, args, kwargs
        self.takes_idx = takes_idx
        self.plate_name = data_plate_name(model, x, args, **kwargs)
        self.num_rows = x.shape[0]
        self.loc_cols, self.scale_cols = _table_columns(guide)

    def values(self, z, count):
        """{site: [S·B, *shape]} from z [S, B, W] (particle-major, as x.repeat lays out rows)."""
        out, start = {}, 0
        for site, shape in self.guide.site_shapes.items():
            size = shape.numel()
            out[site] = z[..., start:start + size].reshape(count, *shape)
            start += size
        return out

    def evaluate(self, rows, loc, log_scale, points, idx=None):
        """At φ [B, W] of ``rows`` [B] with points [S, B, W]: (elbo [B], grad_loc [B, W],
        grad_log_scale [B, W], precision [B, W, W] = -E_q[∂² log p / ∂z ∂zᵀ] by Price's theorem,
        E_q[∇² f] = E[∇f(z) εᵀ] diag(1 / σ), symmetrised)."""
        num_points, batch = points.shape[:2]
        args, kwargs = program.take((self.x,) + self.args, self.kwargs, rows, self.num_rows)
        repeat = lambda v: v.repeat(num_points, *([1] * (v.dim() - 1)))  # noqa: E731
        args = tuple(repeat(a) if program.is_per_row(a, batch) else a for a in args)
        kwargs = {k: repeat(v) if program.is_per_row(v, batch) else v for k, v in kwargs.items()}
        idx = repeat(rows if idx is None else idx) if self.takes_idx else None
        scale = log_scale.exp()
        with torch.enable_grad():
            z = (loc + scale * points).detach().requires_grad_()
            log_p = log_joint(self.model, self.values(z, num_points * batch), args[0], idx, None,
                              model_args=args[1:], plate_name=self.plate_name,
                              **kwargs).reshape(num_points, batch)
            (grad_z,) = torch.autograd.grad(log_p.sum(), z)
        grad_loc = grad_z.mean(0)
        eg = (points * grad_z).mean(0)  # = E[ε ∂log p/∂z] = σ E[∂² log p/∂z²] (Price)
        hessian = torch.einsum("sbi,sbj->bij", grad_z, points) / num_points / scale[:, None, :]
        precision = -(hessian + hessian.transpose(-1, -2)) / 2
        elbo = log_p.detach().mean(0) + log_scale.sum(-1)
        return elbo, grad_loc, scale * eg + 1.0, precision

    @staticmethod
    def residual(log_scale, grad_loc, grad_log_scale):
        return torch.maximum(log_scale.exp() * grad_loc.abs(),
                             grad_log_scale.abs() / 2).amax(-1)


def solve_local(model: Callable[..., Any], guide: LocalGuide, x: torch.Tensor, *args: Any,
                rows: torch.Tensor | None = None, max_steps: int = 200, tol: float = 1e-3,
                num_particles: int = 32, seed: int = 0, rows_per_call: int | None = None,
                **model_kwargs: Any) -> LocalConvergence:
    """Fit the Normal φ_i of ``guide`` (a ``LocalGuide``) for ``rows`` with θ fixed, each row until
    its natural-gradient residual is below ``tol`` (or ``max_steps``): the mean-field q*.

    Each row's step is a damped Newton step in the Normal family's natural geometry: σ_i² ←
    1 / (-E_q[∂² log p / ∂z²]) (Price's theorem: the Hessian's diagonal from the same samples as
    the gradient) and μ_i ← μ_i + σ_i² E_q[∂ log p / ∂z]; a row's step is halved until its ELBO
    rises (and grows back after a success), so every row climbs monotonically. The expectations
    use fixed antithetic whitened points per row (mean exactly 0, covariance exactly I, ≥ 2W of
    them): for a Gaussian posterior they are exact and the fixed point is q* itself.

    Args:
        model: p_θ(x, z), θ fixed (its latent sites in the data plate must all be the guide's).
        guide: a ``LocalGuide``; its table rows ``rows`` are updated in place.
        x: [M, ...] the rows' data (``*args``/``**model_kwargs``: the model's further arguments;
            per-row tensors follow x). rows: [M] the table rows of x's rows (default arange(M)).
        max_steps: a cap per row; tol: the residual (see ``LocalConvergence``) a row must reach.
        num_particles: points per row (at least 2W, W = the number of latent coordinates).
        rows_per_call: rows per model evaluation (default: ~4096 / points).

    Returns:
        ``LocalConvergence`` over the M rows.
    """
    num_rows = x.shape[0]
    device = x.device
    rows = torch.arange(num_rows, device=device) if rows is None else rows.to(device)
    table = guide.table(device)
    problem = _LocalProblem(model, guide, x, args, model_kwargs, program.takes_rows(model))
    width = len(problem.loc_cols)
    num_pairs = max(num_particles // 2, width)
    rows_per_call = rows_per_call or max(1, 4096 // (2 * num_pairs))
    generator = torch.Generator().manual_seed(seed)
    out = {name: [] for name in ("converged", "residual", "steps", "elbo")}
    loc_cols, scale_cols = problem.loc_cols.to(device), problem.scale_cols.to(device)
    for start in progress.chunks(num_rows, rows_per_call, "q*(z | x) per row (natural gradient)"):
        local = torch.arange(start, min(start + rows_per_call, num_rows), device=device)
        with torch.no_grad():
            phi = table[rows[local]].detach()
        loc, log_scale = phi[:, loc_cols].clone(), phi[:, scale_cols].clone()
        points = _standard_points(num_pairs, len(local), width, generator, loc.dtype, device)
        state = problem.evaluate(local, loc, log_scale, points, rows[local])
        step = torch.ones(len(local), device=device)
        steps = torch.zeros(len(local), dtype=torch.long, device=device)
        residual = problem.residual(log_scale, state[1], state[2])
        for _ in range(max_steps):
            # a margin below tol, so a fresh measurement (local_convergence) agrees
            active = (residual >= tol / 4) & (step > 1e-6)
            if not active.any():
                break
            a = active.nonzero().flatten()
            elbo, grad_loc, grad_log_scale, precision = (s[a] for s in state)
            beta = step[a, None]
            # mean-field fixed point σ_j² = 1 / Λ_jj where the Price Hessian's diagonal is
            # negative, else the natural-gradient step (Fisher 2 for log σ); at most a factor e
            diagonal = precision.diagonal(dim1=-2, dim2=-1)
            target = torch.where(diagonal > 0, -0.5 * diagonal.clamp(min=1e-30).log(),
                                 log_scale[a] + grad_log_scale / 2)
            new_log_scale = log_scale[a] + (beta * (target - log_scale[a])).clamp(-1.0, 1.0)
            variance = (2 * new_log_scale).exp()
            # μ: a Newton step Λ⁻¹ E_q[∇ log p] (exact in one step for a Gaussian posterior, however
            # correlated) where Λ is positive definite, else the natural-gradient step σ² ∇
            root, info = torch.linalg.cholesky_ex(precision)
            newton = torch.cholesky_solve(grad_loc[..., None], root).squeeze(-1)
            direction = torch.where((info == 0)[:, None] & torch.isfinite(newton), newton,
                                    variance * grad_loc)
            limit = 3 * torch.maximum(variance.sqrt(), log_scale[a].exp())
            new_loc = loc[a] + (beta * direction).clamp(-limit, limit)
            proposal = problem.evaluate(local[a], new_loc, new_log_scale, points[:, a],
                                        rows[local[a]])
            # a rise, up to the rounding of the ELBO's dtype (near q* a step changes it by less)
            rounding = 16 * torch.finfo(elbo.dtype).eps * (elbo.abs() + 1)
            better = proposal[0] >= elbo - rounding
            steps[a] += 1
            keep = a[better]
            loc[keep], log_scale[keep] = new_loc[better], new_log_scale[better]
            for s, p in zip(state, proposal):
                s[keep] = p[better]
            step[keep] = (2 * step[keep]).clamp(max=1.0)
            step[a[~better]] /= 4
            residual = problem.residual(log_scale, state[1], state[2])
        with torch.no_grad():
            table[rows[local][:, None], loc_cols[None, :]] = loc.to(table.dtype)
            table[rows[local][:, None], scale_cols[None, :]] = log_scale.to(table.dtype)
        out["converged"].append(residual < tol)
        out["residual"].append(residual)
        out["steps"].append(steps)
        out["elbo"].append(state[0])
    return LocalConvergence(torch.cat(out["converged"]), torch.cat(out["residual"]),
                            torch.cat(out["steps"]), torch.cat(out["elbo"]), tol)


def local_convergence(model: Callable[..., Any], guide: LocalGuide, x: torch.Tensor,
                      *args: Any, rows: torch.Tensor | None = None, tol: float = 1e-3,
                      num_particles: int = 64, seed: int = 0,
                      **model_kwargs: Any) -> LocalConvergence:
    """Measure (without changing) how converged a ``LocalGuide``'s φ_i are on x's rows: the
    natural-gradient residual of each row's ELBO from ``num_particles`` fresh antithetic whitened
    points (exact for a Gaussian posterior). Returns ``LocalConvergence`` (num_steps 0)."""
    num_rows = x.shape[0]
    device = x.device
    rows = torch.arange(num_rows, device=device) if rows is None else rows.to(device)
    problem = _LocalProblem(model, guide, x, args, model_kwargs, program.takes_rows(model))
    width = len(problem.loc_cols)
    num_pairs = max(num_particles // 2, width)
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, 4096 // (2 * num_pairs))
    residuals, elbos = [], []
    with torch.no_grad():
        table = guide.table(device).detach()
    for start in range(0, num_rows, chunk):
        local = torch.arange(start, min(start + chunk, num_rows), device=device)
        phi = table[rows[local]]
        loc = phi[:, problem.loc_cols.to(device)]
        log_scale = phi[:, problem.scale_cols.to(device)]
        points = _standard_points(num_pairs, len(local), width, generator, loc.dtype, device)
        elbo, grad_loc, grad_log_scale, _ = problem.evaluate(local, loc, log_scale, points,
                                                             rows[local])
        residuals.append(problem.residual(log_scale, grad_loc, grad_log_scale))
        elbos.append(elbo)
    residual = torch.cat(residuals)
    return LocalConvergence(residual < tol, residual, torch.zeros_like(residual, dtype=torch.long),
                            torch.cat(elbos), tol)


class SemiAmortizedGuide:
    """Semi-amortized q: φ_i starts at the encoder's f_λ(x_i) and is refined by S SVI steps.

    Kim et al. (2018): the encoder gives a good start, a few per-datapoint steps close part of the
    amortization gap. Usable in ``fit`` (the decoder learns from the refined q) and at test time
    (as a guide for ``log_marginal``). Each call runs ``refine`` (S model evaluations).

    Args:
        model: the Pyro model whose log p(x, z) the refinement climbs (all its latent sites must be
            ``site``). encoder: x -> (loc, scale). steps: S. lr: the refinement's Adam step size.
        num_particles: samples per refinement step (single-sample steps are too noisy to help
            much). unroll: backpropagate through the
            refinement into the encoder (see ``refine``). plate_name: the model's data plate
            (default: read from the model's structure at the first call, ``data_plate_name``).
    """

    def __init__(self, model: Callable[..., Any], encoder: torch.nn.Module, steps: int = 10,
                 lr: float = 0.2, num_particles: int = 8, site: str = "z", event_dim: int = 1,
                 unroll: bool = False, name: str = "encoder",
                 plate_name: str | None = None) -> None:
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.model, self.encoder, self.steps, self.lr = model, encoder, steps, lr
        self.num_particles = num_particles
        self.site, self.event_dim, self.unroll, self.name = site, event_dim, unroll, name
        self.plate_name = plate_name

    def __call__(self, x, *args, idx=None, num_data=None, **kwargs):
        pyro.module(self.name, self.encoder)
        loc, scale = self.encoder(x)
        if self.steps:
            if self.plate_name is None:
                self.plate_name = data_plate_name(self.model, x, args, **kwargs)
            loc, scale = refine(self.model, x, loc, scale, steps=self.steps, lr=self.lr,
                                num_particles=self.num_particles, site=self.site, idx=idx,
                                num_data=num_data, unroll=self.unroll, model_args=args,
                                plate_name=self.plate_name, **kwargs)
        with data_plate(x, idx, num_data):
            pyro.sample(self.site, dist.Normal(loc, scale).to_event(self.event_dim))


def score_function_infer(baseline="decaying_average", beta=0.9, value=None, module=None,
                         module_input=None):
    """The ``infer=`` dict of a non-reparameterisable (discrete) guide site for REINFORCE.

    Score-function gradients, ∇φ E_q[f(z)] = E_q[f(z) ∇φ log q_φ(z)], are what Pyro's
    ``TraceGraph_ELBO`` uses at sites whose distribution has no rsample (Categorical,
    Bernoulli). Their variance falls when a baseline b is subtracted from f (the expectation is
    unchanged since E_q[∇φ log q_φ(z)] = 0):
        "decaying_average": b = exponential moving average of f with factor ``beta``;
        "value": b = ``value`` (a tensor shaped like the site's batch, e.g. from your own net);
        "module": b = ``module(module_input)``, an nn.Module fitted to f by the ELBO's extra
            squared loss (Pyro's nn_baseline);
        None: plain REINFORCE.

    Example: ``pyro.sample("c", dist.Categorical(weights), infer=score_function_infer())`` in the
    guide, and ``fit(..., loss=TraceGraph_ELBO())``. Pyro keeps the decaying average per position
    in the minibatch, so use a batch size that divides N (every batch then has the same shape).
    """
    if baseline is None or baseline == "none":
        return {}
    if baseline == "decaying_average":
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        return {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": beta}}
    if baseline == "value":
        if value is None:
            raise ValueError("baseline='value' needs value=")
        return {"baseline": {"baseline_value": value}}
    if baseline == "module":
        if module is None or module_input is None:
            raise ValueError("baseline='module' needs module= and module_input=")
        return {"baseline": {"nn_baseline": module, "nn_baseline_input": module_input}}
    raise ValueError(f"unknown baseline {baseline!r}; choose 'decaying_average', 'value', "
                     "'module' or None")
