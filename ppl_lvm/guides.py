"""Guides for SVI, amortized or not: the lecture's φ_i per datapoint versus one encoder f_λ(x).

- ``LocalGuide``: a table of φ_i = (μ_i, log σ_i), one row per datapoint (non-amortized SVI);
  minibatches read and update only their rows (sparse gradients, lazy Adam).
- ``AmortizedGuide``: q(z | x) = N(f_λ(x)), any encoder module.
- ``SemiAmortizedGuide``: start at f_λ(x), then refine by S SVI steps (Kim et al. 2018).
- ``infer_local``: fit φ for new rows with θ fixed; ``amortization_gaps``: Cremer et al. (2018).
- ``score_function_infer``: REINFORCE with a baseline for discrete (non-reparameterisable) sites.
"""
import contextlib
import dataclasses
import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from torch.distributions import biject_to, constraints
from torch.nn import functional as F

from ppl_lvm.plate import data_plate
from ppl_lvm import program
from ppl_lvm.train import LOCAL_PREFIX, adam, bind_rows, svi_step

NEW_ROWS_HINT = "new rows need their own φ: use ppl_lvm.guides.infer_local"


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

    Call as ``guide(x, idx=None, num_data=None)``: x [B, ...]; idx [B] long, the rows' indices
    (may be omitted only when B == N).
    """

    def __init__(self, num_data, site_shapes, init_loc=0.0, init_scale=1.0, name="phi",
                 plate_name="data", plate_dim=None, event_dims=None, inner_plates=None,
                 supports=None):
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
        self.transforms = {s: _to_support(s, c) for s, c in (supports or {}).items()
                           if s in self.site_shapes}
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

    def __call__(self, x, *args, idx=None, num_data=None, **kwargs):
        pyro.module(self.name, self.encoder)
        loc, scale = self.encoder(x)
        with data_plate(x, idx, num_data):
            pyro.sample(self.site, dist.Normal(loc, scale).to_event(self.event_dim))


def log_joint(model, values, x, idx=None, num_data=None, model_args=(), **kwargs):
    """log p_θ(x_i, z_i) per datapoint, z given by ``values`` {site: [B, ...]}: returns [B].

    Unscaled by N / B (but masks apply). Every latent sample site of ``model`` must be in
    ``values``; the model's own sites are hidden from any enclosing trace. ``model_args``: the
    model's positional arguments after x (e.g. labels y [B]).
    """
    call_kwargs = dict(kwargs)
    if program.takes_rows(model):
        call_kwargs.update(idx=idx, num_data=num_data)
    with poutine.block():
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
            x, *model_args, **call_kwargs)
    batch_size = x.shape[0]
    total = x.new_zeros(batch_size)
    nesting = program.plate_nesting(trace)
    for name, site in program.sample_sites(trace).items():
        if not site["is_observed"]:
            raise ValueError(f"model has latent site {name!r} that the guide does not cover "
                             f"(covered: {list(values)})")
        log_prob = scale_and_mask(site["fn"].log_prob(site["value"]), 1.0, site["mask"])
        frame = next((f for f in site["cond_indep_stack"]
                      if f.vectorized and f.size == batch_size), None)
        if frame is not None:  # the data plate, wherever its dim: sum every other plate dim
            while log_prob.dim() < nesting:
                log_prob = log_prob.unsqueeze(0)
            log_prob = log_prob.movedim(frame.dim, 0)
            total = total + log_prob.reshape(batch_size, -1).sum(1)
        else:  # a site outside the data plate: constant in z_i, shared by all rows
            total = total + log_prob.sum() / batch_size
    return total


def refine(model, x, loc, scale, *, steps=10, lr=0.2, num_particles=8, site="z", idx=None,
           num_data=None, unroll=False, model_args=(), **kwargs):
    """Raise ELBO(μ, σ) = E_q[log p(x, z)] + H[q] per datapoint by ``steps`` SGD steps on (μ, log σ).

    loc, scale: [B, *shape] the starting φ (e.g. an encoder's output). Each step averages
    ``num_particles`` reparameterised samples z = μ + σ ε per row (the model sees the rows
    repeated) and uses the exact Normal entropy; the step size decays from lr to lr / 100 along a
    cosine so the last φ is not jittered by gradient noise. ``unroll=False``: the result carries
    gradients to loc/scale as if the refinement were the identity (first order); ``unroll=True``:
    gradients flow through the unrolled steps (Kim et al. 2018; a second-order backward).
    Returns (loc, scale) [B, *shape].
    """
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
                              model_args=repeated_args, **kwargs)
            objective = log_p.sum() / num_particles + log_scale_t.sum(event_dims).sum()
            grad_loc, grad_log_scale = torch.autograd.grad(objective, params, create_graph=unroll)
            step_size = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t / steps)))
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
            refinement into the encoder (see ``refine``).
    """

    def __init__(self, model, encoder, steps=10, lr=0.2, num_particles=8, site="z", event_dim=1,
                 unroll=False, name="encoder"):
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.model, self.encoder, self.steps, self.lr = model, encoder, steps, lr
        self.num_particles = num_particles
        self.site, self.event_dim, self.unroll, self.name = site, event_dim, unroll, name

    def __call__(self, x, *args, idx=None, num_data=None, **kwargs):
        pyro.module(self.name, self.encoder)
        loc, scale = self.encoder(x)
        if self.steps:
            loc, scale = refine(self.model, x, loc, scale, steps=self.steps, lr=self.lr,
                                num_particles=self.num_particles, site=self.site, idx=idx,
                                num_data=num_data, unroll=self.unroll, model_args=args, **kwargs)
        with data_plate(x, idx, num_data):
            pyro.sample(self.site, dist.Normal(loc, scale).to_event(self.event_dim))


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
def infer_local(model, x, *args, site_shapes=None, encoder=None, steps=200, lr=1e-2,
                batch_size=None, num_particles=1, loss=None, name="new", seed=0,
                globals_guide=None, num_steps=None, **model_kwargs):
    """Fit per-datapoint φ_i for rows ``x`` with θ fixed: q*(z_i) = argmax ELBO_i (the decoder frozen).

    A ``LocalGuide`` fitted on training rows has no φ for new rows; this fits them. Every parameter
    of the model stays as it is; only the new table changes.

    Args:
        model: the trained model (its params already in the param store / its modules).
        x: [M, ...] the new rows; ``*args``: the model's further positional arguments (labels,
            masks: tensors [M, ...] are per-row and follow x's rows); ``**model_kwargs`` alike.
        site_shapes: {site: shape}; by default read from the model's trace: every continuous latent
            site in its data plate (whatever their names). encoder: optional x -> (loc, scale) for
            a single latent site: rows start at the encoder's output (then q* is at least as good
            as the amortized q up to optimisation noise).
        steps (or ``num_steps``, the package-wide name): Adam steps per row; lr: their step size,
            decayed to lr / 100 along a cosine so the final φ is not jittered by gradient noise;
            batch_size: rows per step (default all).
        num_particles: samples per ELBO gradient (or give ``loss``, any Pyro ELBO, e.g. one with
            ``vectorize_particles=True``); name: the new table's name (any old table of that name
            is replaced).
        globals_guide: for a model with global latents outside the data plate: a guide whose
            ``median()`` fixes them (e.g. the trained autoguide).

    Returns:
        LocalGuide over the M rows (call it with ``idx=torch.arange(M)`` or all rows at once).
    """
    steps = steps if num_steps is None else num_steps
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
    with warnings.catch_warnings():
        # pyro.module warns about the parameters frozen here
        warnings.filterwarnings("ignore", message=".*not registered in the param store")
        try:
            for p in frozen + module_params:
                p.requires_grad_(False)
            for step in range(steps):
                optim.set_lr_factor(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
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
    return guide


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
    log_px, elbo_optimal, elbo_amortized: [N]; num_samples: K of the IWAE estimate of log p(x).
    """

    log_px: torch.Tensor
    elbo_optimal: torch.Tensor
    elbo_amortized: torch.Tensor
    num_samples: int

    @property
    def approximation_gap(self):
        """mean over datapoints of log p(x) - ELBO(q*) (a float, nats)."""
        return (self.log_px - self.elbo_optimal).mean().item()

    @property
    def amortization_gap(self):
        """mean over datapoints of ELBO(q*) - ELBO(q_amortized) (a float, nats)."""
        return (self.elbo_optimal - self.elbo_amortized).mean().item()

    @property
    def inference_gap(self):
        """mean of log p(x) - ELBO(q_amortized): the sum of the two gaps."""
        return (self.log_px - self.elbo_amortized).mean().item()

    def stderr(self, values):
        return values.std().item() / math.sqrt(values.numel()) if values.numel() > 1 else 0.0

    def summary(self):
        """A dict of floats: the three means, the two gaps and their standard errors."""
        return {"num_data": self.log_px.numel(), "num_samples": self.num_samples,
                "log_px": self.log_px.mean().item(),
                "elbo_optimal": self.elbo_optimal.mean().item(),
                "elbo_amortized": self.elbo_amortized.mean().item(),
                "approximation_gap": self.approximation_gap,
                "approximation_gap_stderr": self.stderr(self.log_px - self.elbo_optimal),
                "amortization_gap": self.amortization_gap,
                "amortization_gap_stderr": self.stderr(self.elbo_optimal - self.elbo_amortized),
                "inference_gap": self.inference_gap}

    def __str__(self):
        s = self.summary()
        return "\n".join([
            f"{s['num_data']} datapoints, log p(x) by IWAE with K={s['num_samples']}",
            f"  log p(x)                 {s['log_px']:10.2f} nats",
            f"  ELBO(q*)                 {s['elbo_optimal']:10.2f}",
            f"  ELBO(q amortized)        {s['elbo_amortized']:10.2f}",
            f"  approximation gap        {s['approximation_gap']:10.2f} ± {s['approximation_gap_stderr']:.2f}",
            f"  amortization gap         {s['amortization_gap']:10.2f} ± {s['amortization_gap_stderr']:.2f}",
        ])


def _encoder_of(guide):
    encoder = getattr(guide, "encoder", None)
    if encoder is None:
        encoder = getattr(getattr(guide, "__self__", None), "encoder", None)
    return encoder


@program.in_evaluation_mode
def amortization_gaps(model, guide, x, *args, encoder=None, site_shapes=None, num_samples=5000,
                      elbo_samples=100, local_steps=300, local_lr=1e-2, proposal="best",
                      seed=0, **model_kwargs):
    """Approximation and amortization gaps of a trained model on (held-out) rows x.

    Args:
        model: the trained model p_θ(x, z) (frozen here). guide: its amortized q(z | x) (e.g.
            ``vae.guide``, an ``AmortizedGuide`` or a ``SemiAmortizedGuide``).
        x: [N, D] rows (held-out data); ``*args``, ``**model_kwargs``: the model's further
            arguments (per-row tensors follow x's rows), passed to model and guide alike.
        encoder: x -> (loc, scale) to start q* from (default: ``guide.encoder`` or the encoder of
            the module a bound ``guide`` belongs to); site_shapes: needed without an encoder.
        num_samples: K for the IWAE estimate of log p(x) (large: 5000 in Cremer et al.).
        elbo_samples: samples per datapoint for the two ELBO estimates.
        local_steps, local_lr: the optimisation of q* = per-datapoint φ_i (``infer_local``).
        proposal: "best": log p(x) per datapoint is the larger of the IWAE estimates with q* and
            with q_amortized as proposals (both are lower bounds in expectation); "optimal" or
            "amortized": only that one.
        seed: seeds q*'s optimisation and the estimators.

    Returns:
        ``Gaps`` (per datapoint values; ``summary()``, ``approximation_gap``, ``amortization_gap``).
    """
    from ppl_lvm.estimators import log_marginal

    if proposal not in ("best", "optimal", "amortized"):
        raise ValueError(f"proposal must be 'best', 'optimal' or 'amortized', got {proposal!r}")
    encoder = encoder if encoder is not None else _encoder_of(guide)
    if args:
        raise ValueError("amortization_gaps passes the model's further arguments by keyword "
                         "(log_marginal calls model(x, **model_kwargs)); name them, e.g. y=y")
    optimal = infer_local(model, x, site_shapes=site_shapes, encoder=encoder, steps=local_steps,
                          lr=local_lr, name="gaps", seed=seed, **model_kwargs)
    rows = torch.arange(x.shape[0], device=x.device)
    elbo_optimal = log_marginal(model, optimal, x, method="elbo", num_samples=elbo_samples,
                                seed=seed, idx=rows, **model_kwargs)
    elbo_amortized = log_marginal(model, guide, x, method="elbo", num_samples=elbo_samples,
                                  seed=seed + 1, **model_kwargs)
    estimates = []
    if proposal in ("best", "optimal"):
        estimates.append(log_marginal(model, optimal, x, method="iwae", num_samples=num_samples,
                                      seed=seed + 2, idx=rows, **model_kwargs))
    if proposal in ("best", "amortized"):
        estimates.append(log_marginal(model, guide, x, method="iwae", num_samples=num_samples,
                                      seed=seed + 3, **model_kwargs))
    log_px = torch.stack(estimates).max(0).values
    return Gaps(log_px, elbo_optimal, elbo_amortized, num_samples)


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
