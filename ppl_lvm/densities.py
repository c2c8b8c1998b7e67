"""The density kernel: per-datapoint log p(x_n, z_n) and log q(z_n | x_n) from one trace pair.

The lecture's estimators (importance sampling, the ELBO, IWAE, AIS, completion weights) all read
the same two numbers per datapoint and particle. This module is the one place that writes the trace
pair (the guide's trace, the model replayed on it) and the one place that sums a trace's
log-densities. Every sum is *proved complete* on every call: each site's log-density is placed
whole (on its rows when it sits in the data plate, among the global terms otherwise), and the row
terms summed over rows plus the global terms equal the trace's own ``log_prob_sum()``; a site that
cannot be placed is refused by name. Enumerated discrete latents are summed out with Pyro's own
tensor-contraction machinery (``pyro.ops.contract``), which also handles ``pyro.markov``'s recycled
dims. This module imports only ``ppl_lvm.program``.
"""
import dataclasses
import math
from collections import OrderedDict

import pyro.poutine as poutine
import torch
from pyro.distributions import Delta
from pyro.distributions.util import detach, scale_and_mask
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing

from ppl_lvm import program
from ppl_lvm.program import frame_of, sample_sites

class DensityError(ValueError):
    """The kernel cannot stand behind a number: the message names the site and why."""


# relative float tolerance of the completeness identity (float32 sums of many terms)
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------------------------
# the trace pair (written once, here)


def trace_pair(model, guide, args=(), kwargs=None, guide_kwargs=None, model_kwargs=None):
    """(guide trace, model trace replayed on the guide's values).

    ``guide`` None: (None, the model's own trace) — the prior as proposal. ``guide_kwargs`` /
    ``model_kwargs`` default to ``kwargs`` (a guide may take ``idx`` the model does not).
    """
    kwargs = kwargs or {}
    guide_kwargs = kwargs if guide_kwargs is None else guide_kwargs
    model_kwargs = kwargs if model_kwargs is None else model_kwargs
    if guide is None:
        return None, poutine.trace(model).get_trace(*args, **model_kwargs)
    guide_trace = poutine.trace(guide).get_trace(*args, **guide_kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **model_kwargs)
    return guide_trace, model_trace


def trace_given(fn, values, args=(), kwargs=None):
    """The trace of ``fn`` with the sites in ``values`` {site: value} fixed (``poutine.condition``)."""
    return poutine.trace(poutine.condition(fn, data=values)).get_trace(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------------------------
# one site's log-density, and its place


def site_log_prob(site):
    """log p of the site's value with its mask applied, without its scale: [*batch].

    A density is evaluated as the program defines it; the scale a site carries (N / B inside a
    minibatch loss, ``poutine.scale`` annealing) is a weight of a training loss, not part of
    log p, so it is left out here and applied by the loss that wants it.
    """
    if "unscaled_log_prob" not in site:
        site["unscaled_log_prob"] = site["fn"].log_prob(site["value"], *site["args"],
                                                        **site["kwargs"])
    return scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])


def evaluate_sites(trace):
    """Compute every sample site's log-density (under Pyro's validation this checks the values)."""
    for site in sample_sites(trace).values():
        site_log_prob(site)


def _reference_sum(site):
    """The trace's own sum for the site (``log_prob_sum``, as Pyro computes it), unscaled."""
    scale = site["scale"]
    if torch.is_tensor(scale) and scale.dim() > 0 or float(scale) == 0.0:
        return site_log_prob(site).sum()
    return _log_prob_sum(site) / float(scale)


def fold(site, log_prob, plate_name, nesting):
    """A site's log-prob [..., *plates] summed over every plate dim but the data plate's: [..., n].

    Dims left of the plates (the particle dim -(nesting + 1), enumeration dims further left) are
    kept. Refuses a site whose tensor has no real data-plate dim (it would be counted once per
    row) or whose sum the fold does not preserve.
    """
    frame = frame_of(site, plate_name)
    while log_prob.dim() < nesting:
        log_prob = log_prob.unsqueeze(0)
    data_dim = frame.dim
    length = program.plate_length(site, frame)
    if log_prob.shape[data_dim] != length:
        raise DensityError(
            f"site {site['name']!r} is in the data plate {plate_name!r} ({length} rows) but its "
            f"log-density has shape {tuple(log_prob.shape)}: it would be counted once per row")
    sum_dims = [dim for dim in range(-nesting, 0) if dim != data_dim]
    folded = log_prob.sum(sum_dims, keepdim=True) if sum_dims else log_prob
    return folded.reshape(folded.shape[:-nesting] + (length,))


@dataclasses.dataclass
class Terms:
    """One trace's log-density, placed: ``rows`` [*prefix, n] (sites in the data plate, summed
    over the other plates) and ``global_terms`` {site: [*prefix]} (sites outside it; ``globals``
    their sum), where prefix is
    the particle dim when the trace was vectorised. ``sites``: the sites summed into ``rows``."""

    rows: torch.Tensor
    global_terms: dict
    sites: tuple

    @property
    def globals(self):
        """The terms outside the data plate, summed: [*prefix] (a 0-dim zero when there are none)."""
        if not self.global_terms:
            return torch.zeros(()) if not torch.is_tensor(self.rows) else self.rows.new_zeros(())
        return sum(self.global_terms.values())

    @property
    def global_total(self):
        return sum(self.global_terms.values()) if self.global_terms else 0.0


def split(trace, plate_name, nesting=None, sites=None, check=True, scaled=True, num_rows=None):
    """Place every sample site of ``trace``: rows [*prefix, n] and global terms (see ``Terms``).

    ``sites``: a filter (name, site) -> bool (e.g. observed sites only, for the prior proposal);
    the completeness check then covers the chosen sites. The identity
    Σ rows + Σ globals = trace's log_prob_sum() (over the chosen sites) is checked on every call;
    ValueError names the site that breaks it. ``scaled=False``: each site's scale (N / B, a
    ``poutine.scale``) divided out — the model's log-density as the estimators read it; the
    identity then holds against each site's log_prob_sum / scale.
    """
    nesting = program.plate_nesting(trace) if nesting is None else nesting
    # the identity reads tensors as numbers, which a graph being recorded cannot; the recorded
    # step replays the placement that its first, eager, call checked (ppl_lvm.compiled)
    check = check and not program.is_recording()
    rows, globals_, placed, checks = 0.0, {}, [], []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or (sites is not None and not sites(name, site)):
            continue
        if program.site_is_subsample(site):
            continue  # a plate's index site: log-density 0
        log_prob = site_log_prob(site)
        if scaled and not _unit_scale(site):
            log_prob = scale_and_mask(log_prob, site["scale"], None)
        frame = frame_of(site, plate_name)
        if frame is None:
            term = log_prob.reshape(log_prob.shape[:max(log_prob.dim() - nesting, 0)] + (-1,))
            globals_[name] = term.sum(-1)
            got = globals_[name]
        else:
            term = fold(site, log_prob, plate_name, nesting)
            rows = rows + term
            placed.append(name)
            got = term
        if check:  # the site's own sum (as the trace's log_prob_sum takes it) against its place
            checks.append((name, got.detach().sum(), log_prob.detach().sum(),
                           log_prob.detach().abs().sum()))
    if not torch.is_tensor(rows):  # no site in the data plate: zero per row
        rows = _plate_rows(trace, plate_name) if num_rows is None else torch.zeros(num_rows)
    if checks:
        placed_total = rows.detach().sum() + sum(g.detach().sum() for g in globals_.values())
        numbers = torch.stack([torch.stack(c[1:]) for c in checks]).double().tolist()  # one sync
        for (name, *_), (got, expected, magnitude) in zip(checks, numbers):
            _check_equal(got, expected, magnitude, name)
        _check_equal(float(placed_total), sum(n[1] for n in numbers),
                     sum(n[2] for n in numbers), "the trace's total")
    return Terms(rows, globals_, tuple(placed))


def _unit_scale(site):
    scale = site["scale"]
    return not torch.is_tensor(scale) and float(scale) == 1.0 or (
        torch.is_tensor(scale) and scale.dim() == 0 and float(scale) == 1.0)


def _plate_rows(trace, plate_name):
    """The data plate's length in a trace with no site in it (read off its subsample site)."""
    site = trace.nodes.get(plate_name)
    if site is not None and site["type"] == "sample" and torch.is_tensor(site["value"]):
        return torch.zeros(site["value"].shape[0], device=site["value"].device)
    raise DensityError(f"the trace has no site in the data plate {plate_name!r}")


def _log_prob_sum(site):
    if "log_prob_sum" not in site:
        log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        site["log_prob_sum"] = scale_and_mask(log_prob, site["scale"], site["mask"]).sum()
    return site["log_prob_sum"]


def _check_equal(got, expected, magnitude, name):
    got, expected = float(got.detach() if torch.is_tensor(got) else got), float(
        expected.detach() if torch.is_tensor(expected) else expected)
    if math.isnan(got) and math.isnan(expected):
        return
    if got == expected:  # both -inf, or exact
        return
    tolerance = TOLERANCE * max(magnitude, abs(expected), 1.0)
    if not abs(got - expected) <= tolerance:
        raise DensityError(f"site {name!r}: its log-density could not be placed on the rows of the "
                         f"data plate (placed {got:.6g}, the trace has {expected:.6g}); the "
                         "estimate would count it wrongly")


# ----------------------------------------------------------------------------------------------
# per-datapoint log weights


def refuse_joint_guide(guide_trace, plate_name, fixed=()):
    """A guide whose density is joint over rows (an auxiliary latent outside the data plate, as in
    AutoDiagonalNormal / AutoMultivariateNormal / AutoLowRankMultivariateNormal) or a point mass
    (AutoDelta, a Delta site) is no proposal for per-datapoint log p(x_n): refused by name.

    Returns the names of the guide's auxiliary sites outside the data plate that serve only the
    ``fixed`` global latents (e.g. AutoNormal over the globals): their terms are q(globals), no
    part of a datapoint's weight.
    """
    sites = sample_sites(guide_trace)
    outside_aux = [n for n, s in sites.items() if not s["is_observed"]
                   and s["infer"].get("is_auxiliary") and frame_of(s, plate_name) is None]
    inside_aux = [n for n, s in sites.items() if not s["is_observed"]
                  and s["infer"].get("is_auxiliary") and frame_of(s, plate_name) is not None]
    for name, site in sites.items():
        if site["is_observed"] or name in fixed or site["infer"].get("is_auxiliary"):
            continue
        if not any(isinstance(d, Delta) for d in program._unwrap(site["fn"])):
            continue
        if frame_of(site, plate_name) is not None and outside_aux:
            raise DensityError(
                f"guide site {outside_aux[0]!r} lies outside the data plate {plate_name!r} and "
                f"gives the local site {name!r} its density: the guide is joint over all rows "
                "(e.g. AutoDiagonalNormal / AutoMultivariateNormal / AutoLowRankMultivariateNormal "
                "over local latents), so there is no per-datapoint log q(z_n | x_n); use "
                "ppl_lvm.joint_log_marginal for the whole-data bound, or a guide with one factor "
                "per row (AutoNormal, an encoder, LocalGuide)")
        if not inside_aux and not outside_aux:
            raise DensityError(
                f"guide site {name!r} is a Delta (a point mass, e.g. AutoDelta): as a proposal it "
                "gives no importance weights for log p(x); use a guide with a density (AutoNormal, "
                "an encoder) or fix the site with globals= when it is a global latent")
    if outside_aux and not fixed:
        raise DensityError(
            f"guide site {outside_aux[0]!r} lies outside the data plate {plate_name!r}: the "
            "guide's density is joint over all rows, so there is no per-datapoint "
            "log q(z_n | x_n); use ppl_lvm.joint_log_marginal for the whole-data bound")
    return tuple(outside_aux)


def row_log_weights(model_trace, guide_trace, plate_name, num_rows, nesting=None, fixed=(),
                    observed_only=False):
    """log w_{k,n} = log p(x_n, z_{k,n}) - log q(z_{k,n} | x_n): [K, n] from one trace pair.

    model_trace: the model replayed on the guide (vectorised over K particles or not);
    guide_trace: None for the prior as proposal (``observed_only``: w = p(x_n | z)).
    fixed: global sites held at given values (``globals=``); they play no part in a datapoint's
    term. Any other term outside the data plate has no per-datapoint share and is refused by name.
    Model sites marked for enumeration that the guide does not sample are summed out exactly.
    """
    log_p, log_q = row_terms(model_trace, guide_trace, plate_name, num_rows, nesting, fixed,
                             observed_only)
    return log_p if log_q is None else log_p - log_q


def row_terms(model_trace, guide_trace, plate_name, num_rows, nesting=None, fixed=(),
              observed_only=False, stop_guide_params=False):
    """(log p(x_n, z_{k,n}) [K, n], log q(z_{k,n} | x_n) [K, n] or None): ``row_log_weights``'s
    two halves. ``stop_guide_params``: log q with the guide's distribution parameters detached
    (the path-derivative term of DReG)."""
    traces = [t for t in (guide_trace, model_trace) if t is not None]
    nesting = program.plate_nesting(*traces) if nesting is None else nesting
    enumerated = [n for n, s in sample_sites(model_trace).items()
                  if s["infer"].get("_enumerate_dim") is not None and not s["is_observed"]]
    if enumerated:
        log_p = enumerated_rows(model_trace, plate_name, fixed=fixed)
    else:
        keep = (lambda n, s: s["is_observed"]) if observed_only else None
        model_terms = split(model_trace, plate_name, nesting, sites=keep, scaled=False)
        refuse_globals(model_terms.global_terms, model_trace, plate_name, fixed, "model")
        log_p = model_terms.rows
        for site in sample_sites(model_trace).values():  # a proposal drawn inside the model
            proposal = site["infer"].get("proposal_log_prob")
            if proposal is not None:
                log_p = log_p - fold(site, proposal, plate_name, nesting)
    if not torch.is_tensor(log_p):
        raise DensityError(f"no site of the model lies in the data plate {plate_name!r}")
    log_p = _to_matrix(log_p, num_rows, plate_name)
    if guide_trace is None:
        return log_p, None
    serving_fixed = refuse_joint_guide(guide_trace, plate_name, fixed)
    if plate_name not in program.plates_of(guide_trace) and plate_name not in guide_trace.nodes:
        # a guide of the global latents only: q has no per-row factor
        guide_terms = split(guide_trace, plate_name, nesting, scaled=False,
                            num_rows=num_rows)
    else:
        guide_terms = split(guide_trace, plate_name, nesting, scaled=False)
    refuse_globals(guide_terms.global_terms, guide_trace, plate_name, tuple(fixed) + serving_fixed,
                    "guide")
    log_q = guide_terms.rows
    if stop_guide_params:
        log_q = 0.0
        for name in guide_terms.sites:
            site = guide_trace.nodes[name]
            stopped = scale_and_mask(detach(site["fn"]).log_prob(site["value"]), 1.0, site["mask"])
            log_q = log_q + fold(site, stopped, plate_name, nesting)
    if not torch.is_tensor(log_q) or not guide_terms.sites:
        log_q = torch.zeros_like(log_p)  # a guide with no local site: log q(z_n | x_n) = 0
    log_q = _to_matrix(log_q, num_rows, plate_name)
    if log_q.shape != log_p.shape:
        raise DensityError(f"the guide's terms have shape {tuple(log_q.shape)} and the model's "
                           f"{tuple(log_p.shape)}: the two traces disagree on the particles")
    return log_p, log_q


def _to_matrix(log_w, num_rows, plate_name="data"):
    """[*prefix, n] -> [K, n] without inventing particles: a prefix of size 1 means one draw."""
    if log_w.shape[-1] != num_rows:
        raise DensityError(
            f"the data plate {plate_name!r} has {log_w.shape[-1]} entries where {num_rows} rows "
            "of x were passed: it does not run over x's first dim (pass the data with its rows "
            "first, or name the plate that does with plate_name=)")
    return log_w.reshape(-1, num_rows)


def refuse_globals(globals_, trace, plate_name, fixed, role):
    for name, term in globals_.items():
        site = trace.nodes[name]
        if name in fixed or program.site_is_subsample(site):
            continue
        if not torch.is_tensor(term) or not bool((term != 0).any()):
            continue  # masked out, or a term identically zero
        fn = site["fn"]
        if type(fn).__name__ == "Unit" or "Unit" in [type(d).__name__ for d in program._unwrap(fn)]:
            what = "a pyro.factor"
        elif site["is_observed"]:
            what = "an observed site"
        else:
            what = "a global latent"
        raise DensityError(
            f"{role} site {name!r} ({what}) lies outside the data plate {plate_name!r}: its term "
            "belongs to no single datapoint, so log p(x) does not split into per-datapoint terms"
            + (" (pass globals='median', 'sample' or a dict to fix global latents)"
               if what == "a global latent" else
               "; ppl_lvm.joint_log_marginal estimates the whole-data log p(x_1..N)"))


# ----------------------------------------------------------------------------------------------
# enumeration: discrete latents summed out exactly


def enumerated_rows(model_trace, plate_name, fixed=()):
    """log Σ_{z_enum} p(x_n, z_n) per row, [*prefix, n], for a model trace run under
    ``poutine.enum``: Pyro's contraction (``pyro.ops.contract.contract_to_tensor``) sums the
    enumerated dims, recycled ones under ``pyro.markov`` included, and multiplies the plates other
    than the data plate (and a particle plate) out. Enumerated sites use their unmasked log-prob
    (their values sum to one), other sites the masked one, as Pyro's TraceEnum_ELBO does."""
    model_trace.compute_log_prob()
    model_trace.pack_tensors()
    data_symbol = model_trace.plate_to_symbol[plate_name]
    tree, outside, target = OrderedDict(), [], {data_symbol}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or program.site_is_subsample(site):
            continue
        ordinal = frozenset(model_trace.plate_to_symbol[f.name]
                            for f in site["cond_indep_stack"] if f.vectorized)
        if frame_of(site, plate_name) is None:
            if name not in fixed:
                outside.append(name)
            continue
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.name == "_num_particles_vectorized":
                target.add(model_trace.plate_to_symbol[frame.name])
        site_packed = site["packed"]
        if site["infer"].get("_enumerate_dim") is not None and not site["is_observed"]:
            term = site_packed["unscaled_log_prob"]
        else:
            term = packed.scale_and_mask(site_packed["unscaled_log_prob"],
                                         mask=site_packed["mask"])
        tree.setdefault(ordinal, []).append(term)
    if outside:
        refuse_globals({n: torch.ones(()) for n in outside}, model_trace, plate_name, fixed,
                        "model")
    sum_dims = set().union(*[set(t._pyro_dims) for terms in tree.values() for t in terms]) & {
        s["infer"]["_dim_to_symbol"][s["infer"]["_enumerate_dim"]]
        for s in sample_sites(model_trace).values()
        if s["infer"].get("_enumerate_dim") is not None}
    dim_to_size = {}
    for terms in tree.values():
        for term in terms:
            dim_to_size.update(zip(term._pyro_dims, term.shape))
    for site in sample_sites(model_trace).values():
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.name in model_trace.plate_to_symbol:
                dim_to_size.setdefault(model_trace.plate_to_symbol[frame.name],
                                       program.plate_length(site, frame))
    result = contract_to_tensor(tree, sum_dims, target_ordinal=frozenset(target),
                                ring=LogRing(dim_to_size=dim_to_size))
    result = packed.unpack(result, model_trace.symbol_to_dim)
    site = next(s for s in sample_sites(model_trace).values()
                if frame_of(s, plate_name) is not None)
    frame = frame_of(site, plate_name)
    num_rows = program.plate_length(site, frame)
    while result.dim() < -frame.dim:
        result = result.unsqueeze(0)
    result = result.expand(result.shape[:frame.dim] + (num_rows,) + result.shape[result.dim() + frame.dim + 1:])
    result = result.movedim(frame.dim, -1)
    return result.reshape(-1, num_rows)


def exact_rows(model, args, kwargs, plate_name, nesting, fixed=(), num_rows=None):
    """log p(x_n) = log Σ_z p(x_n, z) [n] by enumerating every latent site of ``model`` in parallel."""
    from pyro.infer import config_enumerate  # noqa: PLC0415 (a leaf import from Pyro)

    enumerated = poutine.enum(config_enumerate(model, "parallel"),
                              first_available_dim=-(nesting + 1))
    trace = poutine.trace(enumerated).get_trace(*args, **kwargs)
    for name, site in sample_sites(trace).items():
        if site["is_observed"]:
            continue
        if site["infer"].get("_enumerate_dim") is None:
            raise DensityError(f"method 'exact' needs every latent site discrete and enumerable; "
                             f"site {name!r} is {type(site['fn']).__name__}")
    rows = enumerated_rows(trace, plate_name, fixed=fixed)
    if num_rows is not None:
        return _to_matrix(rows, num_rows, plate_name).reshape(-1)
    return rows.reshape(-1)


def enumerated_joint_log_weight(model, guide, args, kwargs, nesting):
    """log Σ_{z_enum} p(x_1..N, z_enum, z_q) - log q(z_q | x): one draw z_q ~ q, the model's
    latents marked for enumeration that q leaves out summed exactly. Pyro's TraceEnum_ELBO with
    one particle computes exactly this (its contraction handles plates and ``pyro.markov``)."""
    from pyro.infer import TraceEnum_ELBO  # noqa: PLC0415

    elbo = TraceEnum_ELBO(num_particles=1, max_plate_nesting=nesting)
    return torch.tensor(-elbo.loss(model, guide, *args, **kwargs))


# ----------------------------------------------------------------------------------------------
# whole-data terms


def joint_log_weight(model_trace, guide_trace, plate_name=None, share=1.0, observed_only=False):
    """log p(x, z) - log q(z | x) of one (unvectorised) trace pair over its rows: a scalar.

    Every site counted once (each site's own ``log_prob_sum``, its scale divided out), global
    latents, factors and joint guides included. ``share``: the trace covers a chunk holding this
    share of all rows; the terms outside the data plate ``plate_name`` (counted once for the whole
    data) then enter with weight ``share``, so the chunks' values add up to the whole data's.
    """
    def total(trace, skip_observed, skip_latent=False):
        if trace is None:
            return 0.0
        if plate_name is None or share == 1.0:
            return sum(_reference_sum(s) for s in sample_sites(trace).values()
                       if not (skip_observed and s["is_observed"])
                       and not (skip_latent and not s["is_observed"]))
        terms = split(trace, plate_name, scaled=False,
                      sites=lambda n, s: not (skip_observed and s["is_observed"]))
        rows = terms.rows.sum() if torch.is_tensor(terms.rows) else 0.0
        return rows + share * sum(g.sum() for g in terms.global_terms.values())
    return total(model_trace, False, observed_only) - total(guide_trace, True)
