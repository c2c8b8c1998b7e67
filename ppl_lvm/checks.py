"""fit's checks, each named: its arguments, the data's rows, the program's structure and per-row
parameters read before training, the first step (a guide missing a latent site, data of the wrong
dtype), and every epoch's values against their supports. A check raises an error that names what
to change; none changes what training computes.
"""
import contextlib
import math

import pyro
import torch

from ppl_lvm import densities, program
from ppl_lvm.optim import LR_SCHEDULES, is_local_param


def as_batch_tuple(data, device):
    """``data`` (a tensor [N, ...] or a tuple of them) as a tuple of tensors on ``device``."""
    tensors = tuple(data) if isinstance(data, (tuple, list)) else (data,)
    if not tensors or not all(torch.is_tensor(t) for t in tensors):
        raise TypeError("data must be a tensor [N, ...] or a tuple of tensors sharing N")
    if any(t.dim() == 0 for t in tensors):
        raise ValueError(f"data needs a first dim N (rows); got shapes {[tuple(t.shape) for t in tensors]}")
    num_data = tensors[0].shape[0]
    for t in tensors:
        if t.dim() == 0 or t.shape[0] != num_data:
            raise ValueError(f"all data tensors must share their first dim N={num_data}; "
                             f"got shapes {[tuple(t.shape) for t in tensors]}")
    if num_data == 0:
        raise ValueError("data is empty (N = 0)")
    for i, t in enumerate(tensors[1:], 1):  # e.g. labels: NaN there is bad data, not a divergence
        if t.is_floating_point() and not torch.isfinite(t).all():
            rows = (~torch.isfinite(t)).reshape(num_data, -1).any(-1).nonzero()[:5, 0].tolist()
            raise ValueError(f"data[{i}] (shape {tuple(t.shape)}) contains NaN or inf (first bad "
                             f"rows: {rows})")
    first = tensors[0]
    # (x, mask) with mask True = observed: NaN where a value is missing is how missing data
    # arrives; the model must keep it out of the likelihood (ppl_lvm.models.missing)
    mask = tensors[1] if len(tensors) > 1 and tensors[1].dtype == torch.bool and (
        tensors[1].shape == first.shape) else None
    rows = nonfinite_rows(first, mask) if first.is_floating_point() else []
    if rows:
        raise ValueError(f"data contains NaN or inf (first bad rows: {rows}); mask missing "
                         "values instead of passing them to the likelihood")
    return tuple(t.to(device) for t in tensors)


def nonfinite_rows(x, mask=None, limit=5, chunk_elements=1 << 20):
    """The first ``limit`` rows of ``x`` [N, ...] holding NaN or inf (where ``mask`` is True, if
    given), checked ``chunk_elements`` at a time: the check never holds a mask of all of x
    (``torch.isfinite`` also makes a float temporary of its input's size: [100,000, 784] peaked
    526 MB above the data in one piece, 164 MB in chunks of 2^24 elements, ~10 MB in 2^20)."""
    rows_per_chunk = max(1, chunk_elements // max(1, x[0].numel()))
    found = []
    for start in range(0, x.shape[0], rows_per_chunk):
        bad = ~torch.isfinite(x[start:start + rows_per_chunk])
        if mask is not None:
            bad &= mask[start:start + rows_per_chunk]
        if bad.any():
            rows = bad.reshape(len(bad), -1).any(-1).nonzero()[:limit - len(found), 0] + start
            found += rows.tolist()
            if len(found) >= limit:
                break
    return found


def take_rows(tensors, idx, transform=None):
    """The minibatch ``tuple(t[idx] for t in tensors)``, passed through ``transform`` if given."""
    batch = tuple(t[idx] for t in tensors)
    if transform is None:
        return batch
    return tuple(transform(*batch)) if len(batch) > 1 else (transform(*batch),)



def check_devices(device):
    store = pyro.get_param_store()
    for name in store.keys():
        value = store.get_param(name)
        if value.device.type != device.type:
            raise RuntimeError(
                f"device mismatch: parameter {name!r} lives on {value.device} but fit runs on "
                f"{device}; create parameters on x.device (e.g. x.new_zeros(...)) or move the "
                "module that owns it with .to(device)")



class FitValidationError(ValueError):
    """A distribution's parameter or an observed value left its support (named by site and epoch)."""


def check_program_values(model, guide, batch, kwargs, epoch):
    """Trace model and guide on one batch with Pyro's validation on: every distribution's
    parameters and every observed value must satisfy their constraints. A failure names the site.

    ``fit`` runs this at every epoch end, so a run whose validation is off after the first epoch
    still stops, naming the site, when e.g. a probability built in the model leaves [0, 1].
    """
    def traces():
        with torch.no_grad(), program.sandbox(batch[0].device):
            guide_trace, model_trace = densities.trace_pair(model, guide, batch, kwargs)
            densities.evaluate_sites(model_trace)  # validation checks each log-density
        return guide_trace, model_trace

    try:
        with pyro.validation_enabled(True):
            traces()
    except ValueError as error:
        with pyro.validation_enabled(False):
            found = traces()
        for role, trace in zip(("guide", "model"), found):
            for name, site in program.sample_sites(trace).items():
                problem = program.invalid_values(site, respect_user=False)
                if problem:
                    raise FitValidationError(
                        f"after epoch {epoch}, {role} site {name!r}: {problem}") from error
        raise FitValidationError(f"after epoch {epoch}, Pyro's validation failed on one batch: "
                                 f"{str(error).strip().splitlines()[0]}") from error



@contextlib.contextmanager
def first_step_checks(first, tensors):
    """On the first step: a guide without a site for one of the model's latent sites is an error
    before training, not Pyro's warning after it; integer or bool data that the model cannot
    take is named as the data's dtype."""
    import warnings

    if not first:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Found vars in model but not guide")
        try:
            yield
        except UserWarning as warning:
            sites = str(warning).partition("guide:")[2].strip() or str(warning)
            raise ValueError(f"the guide has no sample site for the model's latent site(s) "
                             f"{sites}: every latent site of the model needs one in the guide (or "
                             "enumeration, with TraceEnum_ELBO)") from None
        except (RuntimeError, NotImplementedError) as error:
            raise dtype_error(tensors, error) from error


def dtype_error(tensors, error):
    """``error`` itself, or for integer or bool data a ValueError naming the data's dtype."""
    dtype = tensors[0].dtype
    if dtype.is_floating_point or not any(w in str(error) for w in ("type", "Long", "Bool", "Int")):
        return error
    return ValueError(f"data is {dtype}, and the model failed on it "
                      f"({str(error).strip().splitlines()[0][:160]}): pass floats, e.g. x.float()")



def check_types(**values):
    """Integers must be ints (not bools, not floats); lr a finite real > 0."""
    for name, value in values.items():
        if name == "lr":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0 <= value < math.inf):
                raise ValueError(f"lr must be a finite number > 0, got {value!r}")
        elif (value is not None or name != "checkpoint_every") and (
                isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


def check_fit_args(epochs, batch_size, checkpoint_every, inner_steps, validate, resume,
                    checkpoint_dir, eval_every, lr_schedule, inner_tol):
    if not (lr_schedule is None or callable(lr_schedule) or lr_schedule in LR_SCHEDULES):
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, a callable(step, "
                         f"total_steps) or None; got {lr_schedule!r}")
    if inner_tol is not None and not inner_tol >= 0:
        raise ValueError(f"inner_tol must be >= 0 or None, got {inner_tol!r}")
    if epochs < 0 or batch_size < 1 or (checkpoint_every is not None and checkpoint_every < 1):
        raise ValueError(f"need epochs >= 0, batch_size >= 1 and checkpoint_every >= 1; got "
                         f"{epochs}, {batch_size}, {checkpoint_every}")
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    if not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be an integer >= 1, got {eval_every!r}")
    if validate not in (True, False, "first_epoch"):
        raise ValueError(f"validate must be True, False or 'first_epoch', got {validate!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")


def check_autoguide_rows(guide, structure, batch_size, num_data):
    """Refuse minibatches for an autoguide that holds per-row parameters of local latent sites.

    Such a guide (``AutoNormal`` on ``pyro.plate("data", len(x))``) makes one parameter per row of
    the first batch it sees and has no way to know which rows a minibatch holds. Checked after the
    first step, from the prototype trace the autoguide made (tracing its model beforehand would run
    the user's ``init_loc_fn`` an extra time).
    """
    from pyro.infer.autoguide import AutoGuide, AutoGuideList

    if batch_size >= num_data or not structure.local_latents:
        return
    parts = list(guide) if isinstance(guide, AutoGuideList) else [guide]
    for part in parts:
        prototype = getattr(part, "prototype_trace", None)
        if not isinstance(part, AutoGuide) or program.takes_rows(part) or prototype is None:
            continue
        local = [n for n in structure.local_latents if n in prototype.nodes]
        if local:
            part.prototype_trace = None  # set up afresh on its next call (e.g. a full-batch fit)
            raise ValueError(
                f"the guide {type(part).__name__} holds per-row parameters for the local latent "
                f"sites {local} of the data plate {structure.plate_name!r}, so it cannot follow "
                f"minibatches (batch_size={batch_size} < N={num_data}): train with "
                f"batch_size={num_data} (full batch), or use an amortized guide or "
                "ppl_lvm.LocalGuide for the local sites")


def check_loss_rows(loss, model, guide, batch_size, num_data):
    """Refuse a torch.jit-traced ELBO (``JitTrace_ELBO``...) for a program that takes the rows'
    indices: the trace freezes the first batch's ``idx``, so a per-datapoint guide's later
    minibatches would read and update the first batch's φ rows only."""
    if batch_size < num_data and type(loss).__name__.startswith("Jit") and (
            program.takes_rows(model) or program.takes_rows(guide)):
        raise ValueError(f"{type(loss).__name__} freezes the first minibatch's row indices (idx), "
                         "so a per-datapoint guide would only ever update those rows: use its "
                         "non-Jit ELBO (e.g. Trace_ELBO), fit(compile=True), or a full batch")


def read_structure(model, tensors, transform, kwargs, plate_name=None):
    """The program's structure (``ppl_lvm.program.inspect_program``), read from its traces on its
    first three (transformed) rows, or on all rows where the program refuses so few (an author's
    own shape check, a plate that subsamples itself: ``pyro.plate("data", N, subsample_size=B)``)."""
    num_data = len(tensors[0])
    rows = torch.arange(min(num_data, 3), device=tensors[0].device)
    try:
        return program.inspect_program(model, *take_rows(tensors, rows, transform),
                                       plate_name=plate_name, allow_subsample=True,
                                       **_kwargs_of(kwargs, rows))
    except Exception as error:
        if num_data <= 3 or "plates found" in str(error):  # the package's own finding: final
            raise
    rows = torch.arange(num_data, device=tensors[0].device)
    return program.inspect_program(model, *take_rows(tensors, rows, transform),
                                   plate_name=plate_name, allow_subsample=True,
                                   **_kwargs_of(kwargs, rows))


def _kwargs_of(kwargs, rows):
    """The model's keywords for ``rows``: ``kwargs(rows)`` (fit's per-row slicing) or a dict."""
    return kwargs(rows) if callable(kwargs) else kwargs


def check_guide_rows(guide, tensors, kwargs, transform, batch_size, num_data):
    """Refuse minibatches for a guide that holds a parameter with one row per datapoint (e.g.
    ``pyro.param("alpha_q", torch.ones(x.size(0), k))`` as in Pyro's ``sparse_gamma_def.py``):
    indexed by position, it would give each minibatch the rows of another. Read from the params the
    guide creates on 2 and 3 rows in a sandbox (on all rows if the guide refuses so few); a guide
    that names ``idx`` finds its own rows, and autoguides are checked by ``check_autoguide_rows``.
    """
    from pyro.nn import PyroModule

    if batch_size >= num_data or program.takes_rows(guide) or isinstance(
            getattr(guide, "__self__", guide), PyroModule):  # PyroParams live on the module
        return
    sizes = (2, 3) if num_data >= 3 else (1, 2)
    try:
        shapes = {}
        for n in sizes:
            rows = torch.arange(n, device=tensors[0].device)
            shapes[n] = program.params_of(guide, *take_rows(tensors, rows, transform),
                                          **_kwargs_of(kwargs, rows))
    except Exception:  # the author's own checks (e.g. assert x.shape[0] == N): probe all rows
        try:
            rows = torch.arange(num_data, device=tensors[0].device)
            shapes = {num_data: program.params_of(guide, *take_rows(tensors, rows, transform),
                                                  **_kwargs_of(kwargs, rows))}
        except Exception:
            return  # the first step will say what is wrong
    found = program.per_row_params(shapes, num_data)
    if found:
        name, shape = next(iter(found.items()))
        raise ValueError(
            f"the guide's parameter {name!r} (shape {list(shape)} for {max(shapes)} rows) holds "
            f"one row per datapoint, so it cannot follow minibatches (batch_size={batch_size} < "
            f"N={num_data}): train with batch_size={num_data} (full batch; rows keep their "
            "order), or use ppl_lvm.LocalGuide or an amortized guide for the local sites")


def check_eval_data(eval_tensors, tensors):
    """Held-out rows must have the training rows' shape after N."""
    if eval_tensors is not None and [t.shape[1:] for t in eval_tensors] != [
            t.shape[1:] for t in tensors]:
        raise ValueError(f"eval_data has shapes {[tuple(t.shape) for t in eval_tensors]} but data "
                         f"has {[tuple(t.shape) for t in tensors]}: rows must match after N")


def per_row_kwargs(model_kwargs, per_row, num_data, device, eval_data=None):
    """``(model_kwargs, per_row)`` checked: ``per_row`` as a tuple of names of ``model_kwargs``,
    each a tensor with the data's N rows first (moved to ``device``)."""
    model_kwargs = dict(model_kwargs or {})
    per_row = (per_row,) if isinstance(per_row, str) else tuple(per_row or ())
    for name in per_row:
        value = model_kwargs.get(name)
        if name not in model_kwargs:
            raise ValueError(f"per_row names {name!r}, which is not among model_kwargs "
                             f"{sorted(model_kwargs)}")
        if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != num_data:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"per-row keyword {name!r} must be a tensor with the data's "
                             f"{num_data} rows first, got {shape}")
        model_kwargs[name] = value.to(device)
    if per_row and eval_data is not None:
        raise ValueError(f"eval_data with per-row keywords {list(per_row)}: their rows are the "
                         "training data's; pass eval_data as a tuple (x, y) holding its own")
    return model_kwargs, per_row


def check_trains_something(optim_given, lr, local_lr):
    """After the first step: the default optimiser at lr 0 must have a φ table to train."""
    if optim_given is None and lr == 0 and (local_lr == 0 or not any(
            is_local_param(n) for n in pyro.get_param_store().keys())):
        raise ValueError(f"lr={lr!r} trains nothing: θ stays fixed and there is "
                         "no per-datapoint φ table for local_lr to train; give "
                         "lr > 0")
