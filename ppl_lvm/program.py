"""What a Pyro program is, read from its traces: the one place where ppl_lvm learns a user's model.

Every tool of the package (``fit``, the guides, the estimators, completion) asks this module
instead of assuming conventions: which plate runs over the rows of the data (the *data plate*, any
name, any dim), which sample sites are local (inside it) and which global, which are observed, which
arguments are per-row, and how to call the function (with ``idx``/``num_data`` only when it names
them). Probing is free of side effects: RNG state and the param store are left as they were.
This module imports nothing of the package.
"""
import contextlib
import dataclasses
import functools
import inspect

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.util import site_is_subsample
from pyro.poutine.messenger import Messenger

ROW_KEYWORDS = ("idx", "num_data")
# per-datapoint φ_i tables (``ppl_lvm.guides.LocalGuide``) live in the param store under this
# prefix: the trainer and the strategies that shard rows tell local parameters from global by it
LOCAL_PREFIX = "local$$$"


# ----------------------------------------------------------------------------------------------
# calling convention


def names_keywords(fn, *names):
    """Whether ``fn``'s signature names every keyword in ``names`` explicitly (not via ``**kwargs``).

    A function that only forwards ``**kwargs`` (a Pyro autoguide, a model that ignores them) is not
    given ``idx``/``num_data``: it would pass them on to a model that does not take them.
    """
    try:
        return _names_keywords_cached(fn, names)
    except TypeError:  # an unhashable callable
        return _names_keywords(fn, names)


@functools.lru_cache(maxsize=512)
def _names_keywords_cached(fn, names):
    return _names_keywords(fn, names)


def _names_keywords(fn, names):
    if isinstance(fn, torch.nn.Module):  # its __call__ is (*args, **kwargs); forward says what it takes
        fn = fn.forward
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params and params[name].kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) for name in names)


def per_row_entries(per_row, num_positional):
    """``per_row`` (None, one entry or several) as a tuple of entries, each a position (int) among
    the ``num_positional`` arguments after x or a keyword name (str); anything else is refused in
    one line. The one reading of ``per_row`` for the estimators and AIS."""
    entries = () if per_row is None else (
        (per_row,) if isinstance(per_row, (str, int)) else tuple(per_row))
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            raise ValueError(f"per_row entries are positions (int) of the arguments after x or "
                             f"keyword names (str), got {entry!r}")
        if isinstance(entry, int) and not 0 <= entry < num_positional:
            raise ValueError(f"per_row names position {entry}, but only {num_positional} "
                             "arguments follow x")
    return entries


def args_as_keywords(fn, args):
    """The model's further positional arguments ``args`` (after x) as keywords, by the names in
    ``fn``'s signature: for the entry points that pass them by keyword (AIS), so that every entry
    point takes them positionally as well. Raises ValueError when a position has no name (a
    ``*args`` model, positional-only parameters, more arguments than parameters)."""
    if not args:
        return {}
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        params = []
    named = [p for p in params if p.kind == p.POSITIONAL_OR_KEYWORD][1:1 + len(args)]
    if len(named) < len(args):
        raise ValueError(
            f"the model's further arguments were given by position ({len(args)} after x) but its "
            f"signature names only {len(named)} such parameter(s) after x: pass them by keyword")
    return {p.name: value for p, value in zip(named, args)}


def takes_rows(fn):
    """Whether ``fn`` takes ``idx`` [B] and ``num_data`` N (``ppl_lvm.data_plate``'s convention)."""
    return names_keywords(fn, *ROW_KEYWORDS)


class ScaleDataPlate(Messenger):
    """Multiplies the log-density of every sample site inside the data plate by ``scale`` (N / B).

    Sites outside it (global latents, their priors) keep scale 1, so a minibatch loss is an
    unbiased estimate of the full-data loss. ``plate_name`` None: the plate whose size equals the
    minibatch's row count ``batch_size`` (used only where the structure was not read first).
    """

    def __init__(self, scale, plate_name=None, batch_size=None):
        super().__init__()
        self.scale, self.plate_name, self.batch_size = scale, plate_name, batch_size

    def _in_data_plate(self, msg):
        for frame in msg["cond_indep_stack"]:
            if self.plate_name is not None:
                if frame.name == self.plate_name:
                    return True
            elif frame.vectorized and frame.size == self.batch_size:
                return True
        return False

    def _process_message(self, msg):
        if msg["type"] == "sample" and self._in_data_plate(msg):
            msg["scale"] = self.scale * msg["scale"]


def bind(fn, idx, num_data, plate_name=None):
    """``fn`` for one minibatch of rows ``idx`` [B] out of N = ``num_data``.

    A function that names ``idx`` and ``num_data`` gets them (its ``data_plate`` subsamples and
    scales by N / B); any other (``pyro.plate("data", len(x))`` as in Pyro's examples, an
    autoguide) runs under ``ScaleDataPlate``: only its sites inside the data plate are scaled.
    """
    if takes_rows(fn):
        return functools.partial(_call_with_rows, fn, idx, num_data)
    batch_size = len(idx)
    if int(num_data) == batch_size or batch_size == 0:
        return fn
    return ScaleDataPlate(num_data / batch_size, plate_name, batch_size)(fn)


def scale_rows(fn, scale, plate_name=None, batch_size=None):
    """``fn`` with its data-plate sites scaled by ``scale`` and no ``idx``/``num_data`` passed
    (evaluation in chunks of new rows); a no-op for ``scale`` 1."""
    return fn if scale == 1 else ScaleDataPlate(scale, plate_name, batch_size)(fn)


def _call_with_rows(fn, idx, num_data, *args, **kwargs):
    return fn(*args, idx=idx, num_data=num_data, **kwargs)


# whether a step is being recorded as a graph now (set by ppl_lvm.compiled)
RECORDING = [False]


def is_recording():
    """Whether a step is being recorded now (``ppl_lvm.compiled``): checks that read a tensor as a
    Python number (an index range check, the kernel's sums) are skipped then; the eager first
    step ran them, and the graph's own ops still raise on bad input."""
    return RECORDING[0]


# ----------------------------------------------------------------------------------------------
# side-effect-free probing


@contextlib.contextmanager
def sandbox(*devices):
    """Run a probe with no lasting effect: RNG forked, enclosing handlers blocked, and every
    param that the probe creates removed from the param store again."""
    store = pyro.get_param_store()
    before = set(store.keys())
    cuda = [d for d in devices if isinstance(d, torch.device) and d.type == "cuda"]
    with torch.random.fork_rng(devices=cuda), poutine.block():
        try:
            yield
        finally:
            for name in set(store.keys()) - before:
                del store[name]


@contextlib.contextmanager
def evaluation_mode(*programs):
    """Run every torch module that the program calls in eval mode, and restore each one's mode.

    Evaluation (the estimators, AIS, completion, ``ppl-lvm evaluate``) must score a network with
    BatchNorm's running statistics and without Dropout, and must not move BatchNorm's running
    statistics, whatever mode the user left the network in. A global forward pre-hook
    (``torch.nn.modules.module.register_module_forward_pre_hook``) puts a module, and every module
    inside it, in eval mode on its first call, however the program holds it (an attribute, a
    closure, a global); on exit each module that was switched gets ``training=True`` back, also
    after an exception. ``programs`` (the model, the guide): modules that are these callables or
    own them as bound methods are switched up front as well, so a program that reads
    ``self.training`` outside a forward sees eval mode too. Usable as a decorator.

    Limits: a module whose mode is read before its first call (or read by a function that is not
    its ``forward`` and not one of ``programs``' owners), a scripted module (``torch.jit``, which
    bypasses hooks) and ``F.dropout(..., training=True)`` written in the program are not seen.
    """
    switched = []

    def switch(module):
        for sub in module.modules():
            if sub.training:
                sub.training = False
                switched.append(sub)

    def pre_hook(module, inputs):
        if module.training:
            switch(module)

    for fn in programs:
        owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            switch(owner)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()
        for module in switched:
            module.training = True


def in_evaluation_mode(fn):
    """Decorator: ``fn`` runs under ``evaluation_mode``, its callable leading positional
    arguments (the model, the guide) passed as its ``programs``."""
    @functools.wraps(fn)
    def evaluating(*args, **kwargs):
        with evaluation_mode(*[a for a in args[:2] if callable(a) and not torch.is_tensor(a)]):
            return fn(*args, **kwargs)
    return evaluating


def trace_of(fn, *args, **kwargs):
    """``poutine.trace(fn).get_trace(*args, **kwargs)`` inside ``sandbox``, with no gradients."""
    devices = [a.device for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
    with sandbox(*devices[:1]), torch.no_grad():
        return poutine.trace(fn).get_trace(*args, **kwargs)


def params_of(fn, *args, **kwargs):
    """{name: shape} of every param that one call of ``fn`` reads (created in a sandbox: the
    param store is left as it was)."""
    trace = trace_of(fn, *args, **kwargs)
    return {name: tuple(site["value"].shape) for name, site in trace.nodes.items()
            if site["type"] == "param"}


def per_row_params(shapes, num_rows):
    """The params that hold one row per datapoint, from ``shapes`` = {rows passed: ``params_of``
    at that many rows}: those whose shape follows the number of rows passed, and those whose first
    dim is the data's N = ``num_rows`` (a table of all rows, indexed by position). Params of a
    ``pyro.module`` (names with "$$$") are a network's weights, never per-row. Returns {name: shape
    at the most rows passed}."""
    found = {}
    most = shapes[max(shapes)]
    for name, shape in most.items():
        if "$$$" in name:
            continue
        follows = len({s.get(name) for s in shapes.values()}) > 1
        if follows or (len(shape) and shape[0] == num_rows):
            found[name] = shape
    return found


def sample_sites(trace):
    """The trace's sample sites that are random variables (not a plate's subsample site)."""
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


def _unwrap(fn):
    """The distribution and those it wraps (Independent, masked, expanded), outermost first."""
    while fn is not None:
        yield fn
        fn = getattr(fn, "base_dist", None)


def user_disabled_validation(fn):
    """Whether the program built this distribution with ``validate_args=False`` on purpose."""
    return any(d.__dict__.get("_validate_args") is False for d in _unwrap(fn)
               if isinstance(d, torch.distributions.Distribution))


def invalid_values(site, respect_user=True):
    """What is wrong with a sample site's distribution parameters or observed value, or None.

    The checks of torch's ``validate_args`` (each parameter in its ``arg_constraints``, an
    observed value in the ``support``), done after the fact so the message names the site;
    skipped where the program asked for ``validate_args=False``.
    """
    fn = site["fn"]
    if respect_user and user_disabled_validation(fn):
        return None
    for d in _unwrap(fn):
        for param, constraint in getattr(d, "arg_constraints", {}).items():
            value = d.__dict__.get(param)
            if not torch.is_tensor(value) or constraint is None:
                continue
            try:
                ok = constraint.check(value)
            except (NotImplementedError, RuntimeError):
                continue
            if not bool(ok.all()):
                bad = value[~ok] if ok.shape == value.shape else value
                return (f"{type(d).__name__} parameter {param!r} left {constraint} "
                        f"({int((~ok).sum())} bad values, e.g. {bad.flatten()[:3].tolist()})")
    if site["is_observed"]:
        ok = fn.support.check(site["value"])
        if not bool(ok.all()):
            return (f"{int((~ok).sum())} observed values lie outside the support {fn.support} "
                    f"of {type(fn).__name__}")
    return None


def plate_nesting(*traces):
    """max_plate_nesting: how many batch dims the programs' plates use (as Pyro's ELBOs infer it)."""
    dims = [frame.dim for trace in traces for site in sample_sites(trace).values()
            for frame in site["cond_indep_stack"] if frame.vectorized]
    return -min(dims) if dims else 0


def frame_of(site, plate_name):
    """The site's frame of the plate named ``plate_name`` (None when the site is outside it)."""
    for frame in site["cond_indep_stack"]:
        if frame.name == plate_name:
            return frame
    return None


def plates_of(trace):
    """{plate name: its frame} for every vectorised plate that some sample site sits in."""
    return {frame.name: frame for site in sample_sites(trace).values()
            for frame in site["cond_indep_stack"] if frame.vectorized}


# ----------------------------------------------------------------------------------------------
# per-row arguments


def num_rows_of(args):
    """N: the leading size of the first tensor argument (the data's rows)."""
    for value in args:
        if torch.is_tensor(value) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("the program's arguments hold no tensor [N, ...] of rows")


def is_per_row(value, num_rows):
    """Whether an argument is per-row: a tensor whose first dim is N (sliced with the rows)."""
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == num_rows


def take(args, kwargs, rows, num_rows, per_row=None):
    """The positional and keyword arguments restricted to ``rows`` (per-row ones only).

    per_row: the positions (in ``args``) and keyword names that are per-row; the others are passed
    whole. None: every tensor whose first dim is N (a guess, kept for callers that declare
    nothing)."""
    if per_row is not None:
        declared = set(per_row)
        return (tuple(a[rows] if i in declared else a for i, a in enumerate(args)),
                {k: (v[rows] if k in declared else v) for k, v in kwargs.items()})

    def pick(value):
        return value[rows] if is_per_row(value, num_rows) else value
    return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}


# ----------------------------------------------------------------------------------------------
# the structure


@dataclasses.dataclass(frozen=True)
class Structure:
    """A program's structure, read from its traces.

    plate_name, plate_dim: the plate over the rows of the data and its dim (e.g. "data", -1).
    nesting: how many batch dims its plates use (Pyro's max_plate_nesting).
    local_sites, global_sites: sample sites inside / outside the data plate.
    observed_sites, latent_sites: sample sites with / without ``obs``.
    event_shapes: {latent local site: the shape of one row's value, [*inner plates, *event]}.
    takes_rows: the function names ``idx`` and ``num_data`` (``ppl_lvm.data_plate``).
    subsample_size: B when the program subsamples its own data plate
        (``pyro.plate("data", N, subsample_size=B)``: each call scores B random rows, scaled by
        N / B), else None.
    """

    plate_name: str
    plate_dim: int
    nesting: int
    local_sites: tuple
    global_sites: tuple
    observed_sites: tuple
    latent_sites: tuple
    event_shapes: dict
    takes_rows: bool
    subsample_size: int = None

    @property
    def local_latents(self):
        return tuple(n for n in self.latent_sites if n in self.local_sites)

    @property
    def global_latents(self):
        return tuple(n for n in self.latent_sites if n in self.global_sites)


def _call_rows(fn, args, kwargs, rows, num_rows, full_size=None, per_row=None):
    args, kwargs = take(args, kwargs, rows, num_rows, per_row)
    if takes_rows(fn):
        idx = torch.arange(num_rows)[rows]
        device = next((a.device for a in args if torch.is_tensor(a)), None)
        kwargs = dict(kwargs, idx=idx.to(device) if device is not None else idx,
                      num_data=num_rows if full_size is None else full_size)
    return trace_of(fn, *args, **kwargs)


def trace_rows(fn, args, kwargs, size=2):
    """A trace of ``fn`` on its first ``size`` rows (per-row arguments sliced), or on all rows where
    the program refuses so few (an author's ``assert x.shape[0] == N``): a probe never turns the
    author's own check into a crash of the package."""
    num_rows = num_rows_of(args)
    if size < num_rows:
        try:
            return _call_rows(fn, args, kwargs, slice(0, size), num_rows)
        except Exception:
            pass
    return _call_rows(fn, args, kwargs, slice(0, num_rows), num_rows)


def plate_length(site, frame):
    """The length of ``frame``'s dim at ``site``: its size, or for a plate given no size
    (``pyro.plate("data")``, as in Pyro's SS-VAE example) the site's batch length there."""
    if frame.size is not None and frame.size > 0:
        return frame.size
    batch_shape = site["fn"].batch_shape
    return batch_shape[frame.dim] if len(batch_shape) >= -frame.dim else 1


def _row_plates(trace, size):
    """Names of the plates whose batch length equals ``size`` (the rows passed)."""
    return {frame.name for site in sample_sites(trace).values()
            for frame in site["cond_indep_stack"]
            if frame.vectorized and size in (plate_length(site, frame),
                                             getattr(frame, "full_size", None))}


def row_plate(trace, num_rows):
    """The name of the one plate of ``trace`` as long as the rows passed (ValueError otherwise)."""
    candidates = _row_plates(trace, num_rows)
    if len(candidates) > 1 and "data" in candidates:
        candidates = {"data"}
    if len(candidates) != 1:
        listing = ", ".join(f"{n!r} (dim {f.dim}, size {f.size})"
                            for n, f in plates_of(trace).items())
        raise ValueError(f"{'several plates' if candidates else 'no plate'} run over the "
                         f"{num_rows} rows passed; plates found: {listing or 'none'}; pass "
                         "plate_name=")
    return candidates.pop()


def inspect_program(fn, *args, plate_name=None, per_row=None, allow_subsample=False,
                    **kwargs):
    """Read ``fn``'s structure by tracing it on a few rows of its arguments (no side effects).

    Args:
        fn: a Pyro model (or guide), called as ``fn(*args, **kwargs)``; ``idx``/``num_data`` are
            passed only if it names them.
        *args, **kwargs: its arguments as for the full data: tensors whose first dim is N (the first
            tensor's) are per-row and are sliced.
        plate_name: the data plate's name, if known; by default it is the plate whose size follows
            the number of rows passed (probed with 2 and 3 rows; where the program does not run
            on so few rows, e.g. it asserts its data's size or subsamples its own plate, it is
            read from one trace on all rows).
        per_row: positions in ``args`` and keyword names that are per-row (the others are
            passed whole); None: tensors whose first dim is N.
        allow_subsample: a program that subsamples its own data plate scores B random rows per
            call; only training (``fit``) uses it as it is, so by default it is refused
            (``SubsampledPlate``, naming the plate; the estimators then score it B given rows
            at a time).

    Returns:
        ``Structure``. Raises ValueError naming the plates found when no (or no unique) plate runs
        over the rows.
    """
    num_rows = num_rows_of(args)
    sizes = sorted({min(num_rows, 2), min(num_rows, 3)})
    try:
        traces = [_call_rows(fn, args, kwargs, slice(0, size), num_rows, per_row=per_row)
                  for size in sizes]
    except Exception:  # noqa: BLE001 (the author's own checks: read the program on real rows)
        if sizes == [num_rows]:
            raise
        sizes = [num_rows]
        traces = [_call_rows(fn, args, kwargs, slice(0, num_rows), num_rows, per_row=per_row)]
    trace = traces[-1]
    found = plates_of(trace)
    if plate_name is None:
        candidates = set.intersection(*[_row_plates(t, s) for t, s in zip(traces, sizes)])
        if len(candidates) > 1:
            # a plate that every observed site sits in is the one over the data's rows
            observed = [s for s in sample_sites(trace).values() if s["is_observed"]]
            shared = {c for c in candidates if observed and all(frame_of(s, c) for s in observed)}
            candidates = shared if len(shared) == 1 else candidates
        if len(candidates) > 1 and "data" in candidates:
            candidates = {"data"}
        if len(candidates) != 1:
            listing = ", ".join(f"{n!r} (dim {f.dim}, size {f.size})" for n, f in found.items())
            what = "several plates" if candidates else "no plate"
            raise ValueError(
                f"{_name(fn)}: {what} run over the rows of the data ({sizes[-1]} rows passed); "
                f"plates found: {listing or 'none'}. Put the per-datapoint sites in "
                "pyro.plate('data', len(x)) or pass plate_name=")
        plate_name = candidates.pop()
    elif plate_name not in found:
        listing = ", ".join(repr(n) for n in found) or "none"
        raise ValueError(f"{_name(fn)}: no plate named {plate_name!r}; plates found: {listing}")
    structure = structure_of(trace, plate_name, takes_rows(fn))
    if structure.takes_rows:  # its plate follows the idx / num_data the probe passed, not its own
        structure = dataclasses.replace(structure, subsample_size=None)
    if structure.subsample_size is not None and not (allow_subsample or _SUBSAMPLES_GIVEN):
        raise SubsampledPlate(_name(fn), plate_name, structure.subsample_size,
                              plates_of(trace)[plate_name].full_size)
    return structure


class SubsampledPlate(ValueError):
    """The program subsamples its own data plate (``pyro.plate(name, N, subsample_size=B)``): each
    call scores B random rows. Per-datapoint tools refuse it (or score it B given rows at a time,
    with ``given_subsample``); ``fit`` trains it as it is."""

    def __init__(self, fn_name, plate_name, subsample_size, num_rows):
        self.plate_name, self.subsample_size, self.num_rows = plate_name, subsample_size, num_rows
        super().__init__(
            f"{fn_name}: the data plate {plate_name!r} subsamples itself (subsample_size="
            f"{subsample_size} of {num_rows} rows), so each call scores a random subset of the "
            "rows; per-datapoint estimates need every row: score with a copy of the model without "
            "subsample_size (ppl_lvm.fit trains it as it is)")


_SUBSAMPLES_GIVEN = []  # non-empty inside subsamples_given(): inspect_program accepts the plate


@contextlib.contextmanager
def subsamples_given():
    """Inside it, ``inspect_program`` reads a self-subsampling plate without refusing it: the
    caller runs the program under ``given_subsample``, B rows of its choosing at a time."""
    _SUBSAMPLES_GIVEN.append(True)
    try:
        yield
    finally:
        _SUBSAMPLES_GIVEN.pop()


class given_subsample(Messenger):
    """Run a program that subsamples its own plate ``plate_name`` on the rows ``idx`` [B] instead
    of a random draw (its ``_Subsample`` site set, as Pyro's SVI replays the guide's draw into the
    model), with the plate's N / B scale undone on the sites inside it: each row's terms count
    once, as in a program without subsampling. ``idx`` must hold the plate's subsample_size rows
    (Pyro checks it)."""

    def __init__(self, plate_name, idx):
        super().__init__()
        self.plate_name, self.idx = plate_name, idx

    def _process_message(self, msg):
        if msg["type"] != "sample":
            return
        if msg["name"] == self.plate_name and site_is_subsample(msg):
            msg["value"] = self.idx
            return
        for frame in msg["cond_indep_stack"]:
            if frame.name == self.plate_name and frame.full_size and frame.size:
                msg["scale"] = msg["scale"] * frame.size / frame.full_size


def structure_of(trace, plate_name, rows_keywords=False):
    """``Structure`` of one trace whose data plate is named ``plate_name``."""
    sites = sample_sites(trace)
    local, global_, observed, latent, shapes = [], [], [], [], {}
    plate_dim = None
    for name, site in sites.items():
        frame = frame_of(site, plate_name)
        (local if frame is not None else global_).append(name)
        (observed if site["is_observed"] else latent).append(name)
        if frame is not None:
            plate_dim = frame.dim
            if not site["is_observed"]:
                value = site["value"]
                # the value is [*batch, *event]; the plate's dim counts from the right of batch
                batch_dims = value.dim() - len(site["fn"].event_shape)
                shapes[name] = tuple(value.shape[max(batch_dims + frame.dim + 1, 0):])
    if plate_dim is None:
        plate_dim = plates_of(trace)[plate_name].dim
    return Structure(plate_name, plate_dim, plate_nesting(trace), tuple(local), tuple(global_),
                     tuple(observed), tuple(latent), shapes, rows_keywords,
                     subsample_size_of(trace, plate_name))


def subsample_size_of(trace, plate_name):
    """B when the plate ``plate_name`` of ``trace`` draws a random subsample of B < N of its
    indices (the program wrote ``pyro.plate(plate_name, N, subsample_size=B)``), else None. A plate
    given its indices (``subsample=idx``, as ``ppl_lvm.data_plate`` does for the rows passed) does
    not subsample on its own."""
    site = trace.nodes.get(plate_name)
    if site is None or site["type"] != "sample" or not site_is_subsample(site):
        return None
    size, subsample_size = site["fn"].size, site["fn"].subsample_size
    return subsample_size if subsample_size is not None and 0 < subsample_size < size else None


def check_pair(model_structure, guide_trace, fn_names=("model", "guide"), dims_only=False,
               enumerated=()):
    """The guide must cover the model's latent sites (but those in ``enumerated``, which the
    model's enumeration sums out) and put them in the same data plate, at the same dim
    (``dims_only``: check the dims of the sites both have). Returns the guide's ``Structure``."""
    model_name, guide_name = fn_names
    # an autoguide's auxiliary sites (e.g. AutoNormal's "z_unconstrained") are the guide's own
    guide_latents = {n for n, s in sample_sites(guide_trace).items()
                     if not s["is_observed"] and not s["infer"].get("is_auxiliary")}
    model_latents = set(model_structure.latent_sites) - set(enumerated)
    if not dims_only and guide_latents != model_latents:
        raise ValueError(
            f"the guide's sites do not match the model's latent sites: missing from the guide "
            f"{sorted(model_latents - guide_latents)}, in the guide but not latent in the model "
            f"{sorted(guide_latents - model_latents)}")
    plate = model_structure.plate_name
    for name in model_structure.local_latents:
        if name in enumerated or dims_only and name not in guide_latents:
            continue
        frame = frame_of(guide_trace.nodes[name], plate)
        if frame is None:
            plates = [f.name for f in guide_trace.nodes[name]["cond_indep_stack"]]
            raise ValueError(f"site {name!r} is in the data plate {plate!r} of the {model_name} "
                             f"but not in the {guide_name} (its plates there: {plates})")
        if frame.dim != model_structure.plate_dim:
            raise ValueError(
                f"the data plate {plate!r} is at dim {model_structure.plate_dim} in the "
                f"{model_name} but at dim {frame.dim} in the {guide_name} (site {name!r}): the two "
                "would broadcast against each other; give the plate the same dim= in both")
    if plate not in plates_of(guide_trace):  # a guide of the global latents only
        return None
    return structure_of(guide_trace, plate)


def _name(fn):
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{name}()"
