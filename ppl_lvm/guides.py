"""Guides for SVI, amortized or not: the lecture's φ_i per datapoint versus one encoder f_λ(x).

- ``LocalGuide``: a table of φ_i = (μ_i, log σ_i), one row per datapoint (non-amortized SVI);
  minibatches read and update only their rows (sparse gradients, lazy Adam).
- ``AmortizedGuide``: q(z | x) = N(f_λ(x)), any encoder module.
- ``SemiAmortizedGuide``: start at f_λ(x), then refine by S SVI steps (Kim et al. 2018).
- ``infer_local``: fit φ for new rows with θ fixed; ``amortization_gaps``: Cremer et al. (2018).
- ``score_function_infer``: REINFORCE with a baseline for discrete (non-reparameterisable) sites.
"""
import dataclasses
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from torch.nn import functional as F

from ppl_lvm.plate import data_plate
from ppl_lvm.train import LOCAL_PREFIX, accepts, adam, bind_rows, svi_step

NEW_ROWS_HINT = "new rows need their own φ: use ppl_lvm.guides.infer_local"


def _shape(size):
    return torch.Size((size,) if isinstance(size, int) else tuple(size))


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

    Call as ``guide(x, idx=None, num_data=None)``: x [B, ...]; idx [B] long, the rows' indices
    (may be omitted only when B == N).
    """

    def __init__(self, num_data, site_shapes, init_loc=0.0, init_scale=1.0, name="phi"):
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
        self.name = name
        self.param_name = LOCAL_PREFIX + name
        self._slices, start = {}, 0
        for site, shape in self.site_shapes.items():
            size = shape.numel()
            self._slices[site] = (slice(start, start + size), slice(start + size, start + 2 * size))
            start += 2 * size
        self.width = start

    def __repr__(self):
        return (f"LocalGuide(num_data={self.num_data}, site_shapes="
                f"{ {k: tuple(v) for k, v in self.site_shapes.items()} }, name={self.name!r})")

    def _initial_table(self, device):
        table = torch.full((self.num_data, self.width), self.init_loc, device=device)
        for _, scale_cols in self._slices.values():
            table[:, scale_cols] = math.log(self.init_scale)
        return table

    def table(self, device=None):
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
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_data):
            raise IndexError(f"this local guide was fitted on {self.num_data} rows; idx reaches "
                             f"{int(idx.max())}: {NEW_ROWS_HINT}")
        return idx.to(x.device)

    def __call__(self, x, idx=None, num_data=None, **kwargs):
        rows = self._rows(x, idx, num_data)
        phi = F.embedding(rows, self.table(x.device), sparse=True)  # [B, width]
        with data_plate(x, rows, self.num_data):
            for site, shape in self.site_shapes.items():
                loc_cols, scale_cols = self._slices[site]
                loc = phi[:, loc_cols].reshape(-1, *shape)
                scale = phi[:, scale_cols].reshape(-1, *shape).exp()
                pyro.sample(site, dist.Normal(loc, scale).to_event(len(shape)))

    @torch.no_grad()
    def loc(self, site=None):
        """μ_i of ``site`` for all rows: [N, *shape] (a copy)."""
        site = self._site(site)
        return self.table()[:, self._slices[site][0]].reshape(self.num_data, *self.site_shapes[site]).clone()

    @torch.no_grad()
    def scale(self, site=None):
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
    def initialize(self, loc, scale, site=None, rows=None):
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

    def __init__(self, encoder, site="z", event_dim=1, name="encoder"):
        self.encoder, self.site, self.event_dim, self.name = encoder, site, event_dim, name

    def __call__(self, x, idx=None, num_data=None, **kwargs):
        pyro.module(self.name, self.encoder)
        loc, scale = self.encoder(x)
        with data_plate(x, idx, num_data):
            pyro.sample(self.site, dist.Normal(loc, scale).to_event(self.event_dim))


def log_joint(model, values, x, idx=None, num_data=None, **kwargs):
    """log p_θ(x_i, z_i) per datapoint, z given by ``values`` {site: [B, ...]}: returns [B].

    Unscaled by N / B (but masks apply). Every latent sample site of ``model`` must be in
    ``values``; the model's own sites are hidden from any enclosing trace.
    """
    call_kwargs = dict(kwargs)
    if accepts(model, "idx") and accepts(model, "num_data"):
        call_kwargs.update(idx=idx, num_data=num_data)
    with poutine.block():
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(x, **call_kwargs)
    batch_size = x.shape[0]
    total = x.new_zeros(batch_size)
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        if not site["is_observed"]:
            raise ValueError(f"model has latent site {name!r} that the guide does not cover "
                             f"(covered: {list(values)})")
        log_prob = scale_and_mask(site["fn"].log_prob(site["value"]), 1.0, site["mask"])
        if log_prob.dim() and log_prob.shape[-1] == batch_size:
            total = total + log_prob.reshape(-1, batch_size).sum(0)
        else:  # a site outside the data plate: constant in z_i, shared by all rows
            total = total + log_prob.sum() / batch_size
    return total


def refine(model, x, loc, scale, *, steps=10, lr=0.05, site="z", idx=None, num_data=None,
           unroll=False, **kwargs):
    """Raise ELBO(μ, σ) = E_q[log p(x, z)] + H[q] per datapoint by ``steps`` Adam steps on (μ, log σ).

    loc, scale: [B, *shape] the starting φ (e.g. an encoder's output). Each step uses one
    reparameterised sample z = μ + σ ε per row and the exact Normal entropy. ``unroll=False``: the
    result carries gradients to loc/scale as if the refinement were the identity (first order);
    ``unroll=True``: gradients flow through the unrolled steps (Kim et al. 2018; costs a
    second-order backward). Returns (loc, scale) [B, *shape].
    """
    event_dims = tuple(range(1, loc.dim()))
    with torch.enable_grad():
        start_loc, start_log_scale = loc, scale.log()
        if unroll:
            params = [start_loc, start_log_scale]
        else:
            params = [start_loc.detach().requires_grad_(), start_log_scale.detach().requires_grad_()]
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for t in range(1, steps + 1):
            z = params[0] + params[1].exp() * torch.randn_like(params[0])
            objective = (log_joint(model, {site: z}, x, idx, num_data, **kwargs).sum()
                         + params[1].sum(event_dims).sum())
            grads = torch.autograd.grad(objective, params, create_graph=unroll)
            new_params, new_moments = [], []
            for p, g, (m, v) in zip(params, grads, moments):
                m = beta1 * m + (1 - beta1) * g
                v = beta2 * v + (1 - beta2) * g * g
                step = lr * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
                new_params.append(p + step)
                new_moments.append((m, v))
            params, moments = new_params, new_moments
            if not unroll:
                params = [p.detach().requires_grad_() for p in params]
                moments = [(m.detach(), v.detach()) for m, v in moments]
    if unroll:
        return params[0], params[1].exp()
    loc_out = start_loc + (params[0] - start_loc).detach()
    log_scale_out = start_log_scale + (params[1] - start_log_scale).detach()
    return loc_out, log_scale_out.exp()


class SemiAmortizedGuide:
    """Semi-amortized q: φ_i starts at the encoder's f_λ(x_i) and is refined by S SVI steps.

    Kim et al. (2018): the encoder gives a good start, a few per-datapoint steps close part of the
    amortization gap. Usable in ``fit`` (the decoder learns from the refined q) and at test time
    (as a guide for ``log_marginal``). Each call runs ``refine`` (S model evaluations).

    Args:
        model: the Pyro model whose log p(x, z) the refinement climbs (all its latent sites must be
            ``site``). encoder: x -> (loc, scale). steps: S. lr: the refinement's Adam step size.
        unroll: backpropagate through the refinement into the encoder (see ``refine``).
    """

    def __init__(self, model, encoder, steps=10, lr=0.05, site="z", event_dim=1, unroll=False,
                 name="encoder"):
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.model, self.encoder, self.steps, self.lr = model, encoder, steps, lr
        self.site, self.event_dim, self.unroll, self.name = site, event_dim, unroll, name

    def __call__(self, x, idx=None, num_data=None, **kwargs):
        pyro.module(self.name, self.encoder)
        loc, scale = self.encoder(x)
        if self.steps:
            loc, scale = refine(self.model, x, loc, scale, steps=self.steps, lr=self.lr,
                                site=self.site, idx=idx, num_data=num_data, unroll=self.unroll,
                                **kwargs)
        with data_plate(x, idx, num_data):
            pyro.sample(self.site, dist.Normal(loc, scale).to_event(self.event_dim))


def _site_shapes_of(encoder, x, site):
    with torch.no_grad():
        loc, _ = encoder(x[:1])
    return {site: tuple(loc.shape[1:])}


def infer_local(model, x, *, site_shapes=None, encoder=None, steps=200, lr=1e-2, batch_size=None,
                num_particles=1, name="new", seed=0, progress=False, **model_kwargs):
    """Fit per-datapoint φ_i for rows ``x`` with θ fixed: q*(z_i) = argmax ELBO_i (the decoder frozen).

    A ``LocalGuide`` fitted on training rows has no φ for new rows; this fits them. Every parameter
    of the model stays as it is; only the new table changes.

    Args:
        model: the trained model (its params already in the param store / its modules).
        x: [M, ...] the new rows. site_shapes: {site: shape}; inferred from ``encoder`` if omitted.
        encoder: optional x -> (loc, scale): rows start at the encoder's output (recommended: then
            q* is at least as good as the amortized q up to optimisation noise).
        steps: Adam steps per row; lr: their step size; batch_size: rows per step (default all).
        num_particles: samples per ELBO gradient; name: the new table's name (any old table of
            that name is replaced).

    Returns:
        LocalGuide over the M rows (call it with ``idx=torch.arange(M)`` or all rows at once).
    """
    if site_shapes is None:
        if encoder is None:
            raise ValueError("give site_shapes (e.g. {'z': 20}) or an encoder to read them from")
        site_shapes = _site_shapes_of(encoder, x, "z")
    num_rows = x.shape[0]
    guide = LocalGuide(num_rows, site_shapes, name=name)
    store = pyro.get_param_store()
    if guide.param_name in store:
        del store[guide.param_name]
    guide.table(x.device)
    if encoder is not None:
        with torch.no_grad():
            for start in range(0, num_rows, 1024):
                loc, scale = encoder(x[start:start + 1024])
                guide.initialize(loc, scale, rows=slice(start, start + 1024))
    batch_size = batch_size or num_rows
    optim = adam(local_lr=lr)
    elbo = pyro.infer.Trace_ELBO(num_particles=num_particles)
    only_this_table = lambda param_name: param_name == guide.param_name  # noqa: E731
    # θ needs no gradients here: switch them off so each step only pays for φ's
    frozen = [store._params[n] for n in store.keys()
              if n != guide.param_name and store._params[n].requires_grad]
    modules = [m for m in (getattr(model, "__self__", None), encoder) if isinstance(m, torch.nn.Module)]
    module_params = [p for m in modules for p in m.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed)
    try:
        for p in frozen + module_params:
            p.requires_grad_(False)
        for _ in range(steps):
            order = torch.randperm(num_rows, generator=generator).to(x.device)
            for start in range(0, num_rows, batch_size):
                idx = order[start:start + batch_size]
                svi_step(bind_rows(model, idx, num_rows), bind_rows(guide, idx, num_rows), optim,
                         elbo, (x[idx],), model_kwargs, param_filter=only_this_table)
    finally:
        for p in frozen + module_params:
            p.requires_grad_(True)
    return guide
