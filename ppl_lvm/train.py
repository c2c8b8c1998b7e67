"""fit(): stochastic variational inference for any Pyro model/guide pair over a "data" plate.

Each step draws a minibatch of B rows, calls ``model(*batch, idx=idx, num_data=N)`` (and the guide
alike) so local sites are scaled by N / B and per-datapoint guides can find their φ_i, and takes one
optimiser step on -ELBO. Checkpoints hold everything needed to continue bit for bit: the param store,
the optimiser's state, every RNG's state and the step.
"""
import contextlib
import dataclasses
import math
import time
import warnings
from pathlib import Path

import pyro
import pyro.optim
import pyro.poutine as poutine
import pyro.infer.util
import torch
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from ppl_lvm import compiled as compiling
from ppl_lvm import distributed as ddp
from ppl_lvm import densities, program
from ppl_lvm.checkpoint import (  # noqa: F401  (re-exported: public names)
    DivergenceError, DivergenceGuard, _rng_state, _set_rng_state, check_resumable, data_fingerprint,
    load_checkpoint, load_params, params_finite, save_checkpoint)

CHECKPOINT_NAME = "checkpoint.pt"
SHARD_NAME = "local-rank{rank}-of-{world}.pt"
# per-datapoint φ_i tables (ppl_lvm.guides.LocalGuide) live in the param store under this prefix
LOCAL_PREFIX = ddp.LOCAL_PREFIX


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns.

    losses: per step, the minibatch loss per datapoint (-ELBO / N, nats; the minibatch estimate).
    epoch_losses: per epoch, the mean of that epoch's step losses.
    eval_epochs, eval_elbos: the epochs at which held-out data was evaluated and its ELBO per
        datapoint (nats).
    inner_gains: with ``inner_steps`` > 0, per step, how much the inner loop over the batch's φ_i
        raised its ELBO per datapoint (the first inner step's loss minus the θ step's; nats).
    local_convergence: for a guide with per-datapoint φ_i (``LocalGuide``), the per-row
        convergence of φ at the end (``ppl_lvm.guides.LocalConvergence``), else None.
    """

    losses: list = dataclasses.field(default_factory=list)
    epoch_losses: list = dataclasses.field(default_factory=list)
    eval_epochs: list = dataclasses.field(default_factory=list)
    eval_elbos: list = dataclasses.field(default_factory=list)
    step: int = 0
    wall_time: float = 0.0
    checkpoint: str = None
    inner_gains: list = dataclasses.field(default_factory=list)
    local_convergence: object = None
    compiled: str = None  # with fit(compile=...): graphs, compile time, steps on each path


def accepts(fn, name):
    """Whether callable ``fn`` names keyword ``name`` explicitly (``**kwargs`` does not count:
    an autoguide that forwards its keywords to the model must not be given ``idx``)."""
    return program.names_keywords(fn, name)


def bind_rows(fn, idx, num_data, plate_name=None):
    """``fn`` for one minibatch: given ``idx``/``num_data`` if it names them, else its sites in the
    data plate (``plate_name``; by default the plate as long as the minibatch) scaled by N / B.

    Global sites (outside the data plate) are never scaled, so the minibatch loss estimates the
    full-data loss without bias for any program (see ``ppl_lvm.program.bind``).
    """
    return program.bind(fn, idx, num_data, plate_name)


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


def _owners(*fns):
    """nn.Modules whose bound methods are ``fns`` (e.g. ``vae.model``): fit moves them to the device."""
    modules = []
    for fn in fns:
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module) and all(owner is not m for m in modules):
            modules.append(owner)
    return modules


def _check_devices(device):
    store = pyro.get_param_store()
    for name in store.keys():
        value = store.get_param(name)
        if value.device.type != device.type:
            raise RuntimeError(
                f"device mismatch: parameter {name!r} lives on {value.device} but fit runs on "
                f"{device}; create parameters on x.device (e.g. x.new_zeros(...)) or move the "
                "module that owns it with .to(device)")


def register_params(model, guide, batch, loss=None, kwargs=None):
    """Run model and guide once so every parameter exists in the param store (no step taken)."""
    loss = loss or Trace_ELBO()
    with torch.no_grad():
        loss.loss(model, guide, *batch, **(kwargs or {}))


def svi_step(model, guide, optim, loss, batch, kwargs=None, grad_hook=None, param_filter=None):
    """One SVI step (what ``pyro.infer.SVI.step`` does), with two seams.

    ``grad_hook(params)`` runs after the gradients are computed and before the update (e.g. an
    all-reduce across ranks); ``param_filter(name) -> bool`` restricts which parameters are
    updated (e.g. only the local φ_i, with θ held fixed). Returns the loss (a float).
    """
    kwargs = kwargs or {}
    with poutine.trace(param_only=True) as param_capture:
        value = loss.loss_and_grads(model, guide, *batch, **kwargs)
    sites = param_capture.trace.nodes
    params = {name: site["value"].unconstrained() for name, site in sites.items()}
    if param_filter is not None:
        frozen = [p for name, p in params.items() if not param_filter(name)]
        params = {name: p for name, p in params.items() if param_filter(name)}
        _clear_grads(frozen)
    if grad_hook is not None:
        grad_hook(params)
    optim(params.values())
    _clear_grads(params.values())
    return torch_item(value)


def _clear_grads(params):
    # None rather than zeros (pyro.infer.util.zero_grads): no allocation, and the next backward
    # starts a fresh gradient either way
    for param in params:
        param.grad = None


def is_local_param(name):
    """Whether param store entry ``name`` is a per-datapoint φ table (not a global θ)."""
    return name.startswith(LOCAL_PREFIX)


class LazyAdam:
    """fit's default optimiser: Adam for θ, lazy (sparse) Adam at ``local_lr`` for local φ tables.

    Called like a ``pyro.optim.PyroOptim`` (``optim(params)`` steps exactly the params given, e.g.
    only φ or only θ) with the same per-parameter-name ``get_state``/``set_state`` for checkpoints.
    Dense parameters share one multi-tensor ``torch.optim.Adam`` (one call per step, not one per
    parameter); a parameter with sparse gradients (a per-datapoint table [N, ...]) gets
    ``torch.optim.SparseAdam``, which reads and writes only the rows in the batch: a step costs
    the same for any N and rows outside the batch never drift, momentum included.
    The dense Adam is torch's fused kernel (one pass over each parameter and its moments) where
    the parameters' device and dtype have one: measured on a 784-400-20 VAE, one CPU thread, it
    steps in ~0.75 ms where the multi-tensor and per-parameter loops take 2-10 ms.
    """

    fused = True  # the dense Adam's fused kernel where supported (else the multi-tensor one)

    def __init__(self, lr=1e-3, local_lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.local_lr, self.betas, self.eps = lr, local_lr, tuple(betas), eps
        self._dense = {}    # lr -> torch.optim.Adam over every dense param with that lr
        self._sparse = {}   # param -> torch.optim.SparseAdam
        self._known = set()
        self._waiting = {}  # param name -> saved state, consumed when the param first shows up

    def _add(self, param):
        name = pyro.get_param_store().param_name(param) or ""
        lr = self.local_lr if name.startswith(LOCAL_PREFIX) else self.lr
        saved = self._waiting.pop(name, None)
        if param.grad is not None and param.grad.is_sparse:
            optimizer = self._sparse[param] = torch.optim.SparseAdam(
                [param], lr=lr, betas=self.betas, eps=self.eps)
        else:
            if lr not in self._dense:
                self._dense[lr] = _dense_adam(param, lr, self.betas, self.eps, self.fused)
            else:
                self._dense[lr].param_groups[0]["params"].append(param)
            optimizer = self._dense[lr]
        if saved is not None:
            optimizer.state[param] = {key: value.clone() if torch.is_tensor(value) else value
                                      for key, value in saved.items()}
            step = optimizer.state[param].get("step")
            if optimizer.defaults.get("fused") and torch.is_tensor(step):
                # the fused kernel keeps the step count beside the parameter, in float32
                optimizer.state[param]["step"] = step.to(param.device, torch.float32)
        self._known.add(param)

    def __call__(self, params):
        params = [p for p in params if p.grad is not None]
        for param in params:
            if param not in self._known:
                self._add(param)
        given = set(params)
        for param, optimizer in self._sparse.items():
            if param in given:
                optimizer.step()
        for optimizer in self._dense.values():
            group = optimizer.param_groups[0]["params"]
            # params not given this step are held fixed: Adam skips those without a gradient
            held = [(p, p.grad) for p in group if p not in given and p.grad is not None]
            for p, _ in held:
                p.grad = None
            if len(held) < len(group):
                optimizer.step()
            for p, grad in held:
                p.grad = grad

    def set_lr_factor(self, factor):
        """Multiply every step size by ``factor`` (relative to the initial lr), e.g. for a decay."""
        for optimizer in self._optimizers():
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor

    def _optimizers(self):
        yield from self._dense.values()
        yield from self._sparse.values()

    def get_state(self):
        """{param name: its Adam state (step, exp_avg, exp_avg_sq)}, like ``PyroOptim.get_state``."""
        store = pyro.get_param_store()
        state = dict(self._waiting)
        for optimizer in self._optimizers():
            for param, param_state in optimizer.state.items():
                name = store.param_name(param)
                if name is not None and param_state:
                    state[name] = {key: value.clone() if torch.is_tensor(value) else value
                                   for key, value in param_state.items()}
        return state

    def set_state(self, state):
        """Load ``get_state()``'s dict; each entry is used when its parameter is first stepped."""
        self._waiting.update(state)


def _dense_adam(param, lr, betas, eps, fused):
    """torch's Adam over ``param`` (more join it later): fused where its device and dtype allow."""
    if fused:
        try:
            return torch.optim.Adam([param], lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, ValueError):
            pass  # no fused kernel for this device or dtype
    return torch.optim.Adam([param], lr=lr, betas=betas, eps=eps, foreach=True)


def adam(lr=1e-3, local_lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
    """fit's default optimiser (a ``LazyAdam``): Adam at ``lr`` for θ, lazy Adam at ``local_lr``
    for per-datapoint φ tables (params named with ``LOCAL_PREFIX``)."""
    return LazyAdam(lr, local_lr, betas, eps)


def torch_item(value):
    return value.item() if torch.is_tensor(value) else float(value)


@program.in_evaluation_mode
def evaluate_elbo(model, guide, data, num_particles=1, batch_size=512, model_kwargs=None,
                  distributed=False, plate_name=None):
    """The ELBO per datapoint (nats) of ``data`` [N, ...] (or a tuple), averaged over
    ``num_particles`` draws of z per datapoint; no step is taken.

    The rows are taken in chunks; each chunk's sites in the data plate are scaled by N / n (global
    sites are not) and the chunks are averaged with weights n / N, so global latents count once.
    distributed: each rank takes a contiguous block of the rows and the sums are all-reduced.
    """
    tensors = data if isinstance(data, (tuple, list)) else (data,)
    model_kwargs = model_kwargs or {}
    if plate_name is None:
        plate_name = program.inspect_program(model, *tensors, **model_kwargs).plate_name
    total = 0.0
    num_data = tensors[0].shape[0]
    rows = torch.tensor_split(torch.arange(num_data), ddp.world_size())[ddp.rank()] if distributed \
        else torch.arange(num_data)
    first, stop = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
    with torch.no_grad(), poutine.block():
        for start in range(first, stop, batch_size):
            batch = tuple(t[start:min(start + batch_size, stop)] for t in tensors)
            share = len(batch[0]) / num_data
            for _ in range(num_particles):
                guide_trace, model_trace = densities.trace_pair(model, guide, batch, model_kwargs)
                total -= float(densities.joint_log_weight(model_trace, guide_trace, plate_name,
                                                          share)) / num_particles
    if distributed:
        total = ddp.allreduce_mean(total, 1.0, tensors[0].device)
    return -total / num_data


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


class _SingleProcess:
    """How ``fit`` spreads its work: on one process every hook of the strategy does nothing."""

    active, rank, world = False, 0, 1
    grad_hook = local_hook = None

    def __init__(self, device):
        self.device = device

    def batches(self, num_data, epoch, seed, batch_size):
        return ddp.rank_batches(num_data, epoch, seed, 0, 1, batch_size)

    def owned(self, num_data):
        return torch.arange(num_data, device=self.device)

    def set_weight(self, weight):
        pass

    def mean(self, value, weight):
        return value

    def all_true(self, flag):
        return flag

    def barrier(self):
        pass

    def start(self, register):
        pass


class _DataParallel(_SingleProcess):
    """Data-parallel SVI over torch.distributed's ranks (see ``ppl_lvm.distributed``)."""

    active = True

    def __init__(self, device):
        super().__init__(device)
        self.rank, self.world = ddp.rank(), ddp.world_size()
        self.grad_hook = ddp.GradAllReduce()
        self.local_hook = self.grad_hook.scale_local

    def batches(self, num_data, epoch, seed, batch_size):
        return ddp.rank_batches(num_data, epoch, seed, self.rank, self.world, batch_size)

    def owned(self, num_data):
        return ddp.owned_rows(num_data, self.rank, self.world).to(self.device)

    def set_weight(self, weight):
        self.grad_hook.weight = weight

    def mean(self, value, weight):
        return ddp.allreduce_mean(value, weight, self.device)

    def all_true(self, flag):
        return ddp.all_true(flag, self.device)

    def barrier(self):
        ddp.barrier()

    def start(self, register):
        # every rank creates every param, then takes rank 0's values
        register()
        ddp.broadcast_params()


class _Checkpointer:
    """Writes and reads a run's checkpoint: ``checkpoint.pt`` (rank 0: global params, optimiser
    state, RNG, progress) and, on several ranks, one shard of local rows per rank."""

    def __init__(self, folder, optim, strategy, config, guard):
        self.path = None if folder is None else Path(folder) / CHECKPOINT_NAME
        self.optim, self.strategy, self.config, self.guard = optim, strategy, config, guard
        self.shard = None if self.path is None or not strategy.active else (
            self.path.parent / SHARD_NAME.format(rank=strategy.rank, world=strategy.world))
        if self.path is not None and strategy.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        strategy.barrier()

    def resume(self, register, device):
        """Load the checkpoint into the param store and optimiser; returns (result, epoch, batch)."""
        if self.path is None or not self.path.exists():
            raise FileNotFoundError(f"resume=True but no checkpoint at {self.path}")
        state = load_checkpoint(self.path, device)
        check_resumable(state, self.path, self.config, self.strategy.world)
        register()
        load_params(state, device)
        optim_state = state["optim"]
        if self.shard is not None:
            shard = ddp.load_shard(self.shard, self.config["num_data"], device)
            if shard["progress"] != state["progress"]:
                raise ValueError(f"{self.shard} (at {shard['progress']}) does not match "
                                 f"{self.path} (at {state['progress']}); the run died while "
                                 "checkpointing")
            optim_state = {**optim_state, **shard["optim"]}
            state["rng"] = shard["rng"]
        self.optim.set_state(optim_state)
        _set_rng_state(state["rng"])
        progress = state["progress"]
        return FitResult(**state["result"]), progress["epoch"], progress["batch"]

    def save(self, epoch, batch, result):
        if self.path is None:
            return
        self.guard.check_state(self.optim, result.step, all_ranks=(
            self.strategy.all_true if self.strategy.active else None))
        if self.guard.suspicious():  # keep the last good one (the losses are the same on all ranks)
            return
        position = {**self.config, "epoch": epoch, "batch": batch}
        if self.strategy.world > 1:
            position["world_size"] = self.strategy.world
        if not self.strategy.active:
            save_checkpoint(self.path, self.optim, position, result)
            return
        ddp.save_shard(self.shard, self.optim, position, self.strategy.owned(
            self.config["num_data"]), _rng_state())
        ddp.barrier()
        if self.strategy.rank == 0:
            save_checkpoint(self.path, self.optim, position, result,
                            keep=lambda name: not ddp.is_local(name))
        ddp.barrier()


def take_step(model, guide, optim, loss, batch, kwargs, inner_steps, strategy, weight,
              inner_tol=None):
    """One minibatch of SVI: a joint step on θ and φ, or (``inner_steps`` = S > 0) the lecture's
    two-step procedure, up to S steps on the batch's local φ_i with θ fixed (fewer when
    ``inner_tol`` is given and a step improves the batch's loss by less than that fraction), then
    one step on θ.

    Returns (loss, loss before the inner steps) of the global batch, -ELBO in nats (not per datapoint).
    """
    strategy.set_weight(weight)
    if not len(batch[0]):  # an empty last batch on a small shard: still join the all-reduce
        value = ddp.empty_step(optim, strategy.grad_hook)
        return strategy.mean(value, weight), None
    before = None
    if inner_steps:
        previous = None
        for s in range(inner_steps):
            inner = svi_step(model, guide, optim, loss, batch, kwargs, param_filter=is_local_param,
                             grad_hook=strategy.local_hook)
            before = inner if s == 0 else before
            if inner_tol is not None and previous is not None and not strategy.active and (
                    previous - inner < inner_tol * abs(previous)):
                break  # the batch's ELBO stopped improving (one process: ranks stay in step)
            previous = inner
        before = strategy.mean(before, weight)
    value = svi_step(model, guide, optim, loss, batch, kwargs, grad_hook=strategy.grad_hook,
                     param_filter=(lambda n: not is_local_param(n)) if inner_steps else None)
    return strategy.mean(value, weight), before


LR_SCHEDULES = ("constant", "cosine", "exponential")


def lr_factor(schedule, step, total_steps):
    """The step-size multiplier at ``step`` of ``total_steps`` (0-based): "constant" 1; "cosine"
    from 1 down to 0.01 along half a cosine; "exponential" from 1 down to 0.01 geometrically; a
    callable ``schedule(step, total_steps) -> factor``. Decaying steps let SVI converge instead of
    stalling at the gradient-noise floor (Robbins-Monro)."""
    if schedule is None or schedule == "constant":
        return 1.0
    t = min(step / max(total_steps, 1), 1.0)
    if schedule == "cosine":
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "exponential":
        return 0.01 ** t
    return float(schedule(step, total_steps))


def set_lr_factor(optim, factor):
    """Multiply every step size of ``optim`` (a ``LazyAdam`` or a ``pyro.optim.PyroOptim``) by
    ``factor`` relative to its initial one."""
    if hasattr(optim, "set_lr_factor"):
        optim.set_lr_factor(factor)
        return
    for torch_optim in getattr(optim, "optim_objs", {}).values():
        for group in torch_optim.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor


@contextlib.contextmanager
def _first_step_checks(first, tensors):
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
            raise _dtype_error(tensors, error) from error


def _dtype_error(tensors, error):
    """``error`` itself, or for integer or bool data a ValueError naming the data's dtype."""
    dtype = tensors[0].dtype
    if dtype.is_floating_point or not any(w in str(error) for w in ("type", "Long", "Bool", "Int")):
        return error
    return ValueError(f"data is {dtype}, and the model failed on it "
                      f"({str(error).strip().splitlines()[0][:160]}): pass floats, e.g. x.float()")


@contextlib.contextmanager
def _own_rng(device, seed):
    """Run the block on torch's RNG seeded with ``seed`` and restore the caller's stream after."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_types(**values):
    """Integers must be ints (not bools, not floats); lr a finite real > 0."""
    for name, value in values.items():
        if name == "lr":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0 <= value < math.inf):
                raise ValueError(f"lr must be a finite number > 0, got {value!r}")
        elif (value is not None or name != "checkpoint_every") and (
                isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


def _check_fit_args(epochs, batch_size, checkpoint_every, inner_steps, validate, resume,
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


def fit(model, guide, data, *, epochs=10, batch_size=128, lr=1e-3, optim=None, loss=None,
        device="cpu", seed=0, progress=True, eval_data=None, eval_every=1, checkpoint_dir=None,
        checkpoint_every=None, resume=False, clear_params=True, model_kwargs=None, per_row=(),
        transform=None,
        callback=None, inner_steps=0, local_lr=1e-2, distributed=None, validate="first_epoch",
        plate_name=None, lr_schedule=None, inner_tol=None, compile=False):
    """Fit ``model``/``guide`` to ``data`` by SVI on minibatches.

    Args:
        model, guide: Pyro callables taking the batch tensors positionally; all local sites in
            ``pyro.plate("data")``. If they accept ``idx`` and ``num_data`` keywords they get the
            rows' indices [B] and N (see ``ppl_lvm.data_plate``); otherwise they are scaled by N / B.
        data: [N, ...] tensor, or a tuple of tensors sharing N (passed as ``model(*batch)``).
            In a pair (x, mask) with mask bool of x's shape (True = observed), x may hold NaN
            where mask is False; the model must keep those entries out of its likelihood.
        epochs: passes over the data; batch_size: B (the last batch of an epoch may be smaller).
            batch_size >= N (full batch) keeps the rows in their order. A model that subsamples
            its own data plate (``pyro.plate("data", N, subsample_size=B)``) is trained as Pyro's
            SVI trains it: all rows passed at every step, the plate's own N / B scale, and
            batch_size ignored; an epoch is then ceil(N / B) steps.
        lr: Adam's learning rate for θ when ``optim`` is None (the default is ``LazyAdam``, which
            also handles per-datapoint φ tables); optim: any ``pyro.optim.PyroOptim`` or
            ``LazyAdam`` (plain Pyro optimisers reject the sparse gradients of a ``LocalGuide``).
        loss: any Pyro ELBO (default ``Trace_ELBO()``).
        device: where data, modules (of bound ``model``/``guide`` methods) and params live.
        seed: seeds Pyro, torch, numpy and the per-epoch shuffles.
        progress: show a tqdm bar; eval_data: held-out data whose ELBO per datapoint is
            computed every ``eval_every`` epochs.
        checkpoint_dir: folder for ``checkpoint.pt``, written at each epoch's end and every
            ``checkpoint_every`` steps; resume: continue from it exactly.
        clear_params: start from an empty param store (so two fits in one process don't share
            parameters that happen to have the same names).
        model_kwargs: extra keywords for model and guide, passed whole to every step.
        per_row: names of ``model_kwargs`` that are per-row ([N, ...], e.g. a conditional VAE's
            labels): each step gets the rows of its minibatch. Nothing is taken as per-row from
            its shape alone; per-row data can also ride in ``data`` as a tuple ``(x, y)``.
        validate: Pyro's argument and support checks: "first_epoch" (default) runs them while
            every row is seen once, then steps without them (they cost ~20 % of a VAE step; a
            parameter going bad later still trips the divergence guard); True or False: always
            or never (when Pyro's validation is globally on).
        callback: optional ``callback(epoch, result) -> bool`` run after each epoch (1-based
            ``epoch``, the ``FitResult`` so far); returning True stops training (e.g. a
            relative-tolerance rule on ``result.epoch_losses``).
        inner_steps: S. 0: joint SVI, one step on θ and φ together. S > 0: the lecture's
            two-step procedure: per minibatch, S steps on the batch's local φ_i (θ fixed), then
            one step on θ (φ fixed). Local params are those named with ``LOCAL_PREFIX``.
        local_lr: the default optimiser's step size for local φ tables (see ``adam``).
        lr_schedule: None/"constant", "cosine" or "exponential" (both decay every step size, θ's
            and the local φ tables' alike, to 1/100 by the last step), or a callable
            ``(step, total_steps) -> factor``; see ``lr_factor``. Non-amortized SVI needs a decay
            to converge (a constant step stalls at the gradient-noise floor).
        inner_tol: with ``inner_steps`` = S, stop a batch's inner loop early once a step improves
            its loss by less than this fraction (S is then a cap).
        plate_name: the data plate's name, when several plates run over the rows.
        transform: optional callable taking a minibatch's tensors and returning them (a tensor
            when there is one), e.g. a fresh stochastic binarization per minibatch; it may use
            torch's RNG (checkpoints restore it).
        distributed: data-parallel SVI over the ranks of torch.distributed (see
            ``ppl_lvm.distributed``): None (default) turns it on when a process group with more
            than one rank is running (e.g. under torchrun after ``ppl_lvm.distributed.init()``);
            True also joins torchrun's group; False never. Each rank steps on B rows of its own
            shard (P·B rows a step in all), global params are averaged, local φ tables
            (``local$$$`` names) stay on the rank owning their rows. Rank 0 alone shows progress
            and writes ``checkpoint.pt`` (global params); each rank writes
            ``local-rank{r}-of-{P}.pt`` (its φ rows, its RNG state). Resume needs the same P.
        compile: record each step's loss and gradients once as a static graph and replay it
            (``ppl_lvm.compiled``): False (default), True, "auto" (on for runs of at least
            ``compiled.AUTO_MIN_STEPS`` steps) or "inductor" (the graph also goes through
            torch.compile: ~10-60 s to compile, ~0.9x a hand-written step on one CPU thread). Each graph is checked against eager Pyro on its
            first batch; a program it cannot follow runs eagerly, said in one warning line.
            Steps run eagerly while Pyro's validation is on (the first epoch by default).
            ``result.compiled`` says what happened.

    Returns:
        FitResult (the same on every rank). Raises DivergenceError when the loss becomes non-finite.
    """
    _check_types(epochs=epochs, batch_size=batch_size, seed=seed, eval_every=eval_every,
                 checkpoint_every=checkpoint_every, inner_steps=inner_steps)
    if optim is None:
        _check_types(lr=lr)
    _check_fit_args(epochs, batch_size, checkpoint_every, inner_steps, validate, resume,
                    checkpoint_dir, eval_every, lr_schedule, inner_tol)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but CUDA is not available")
    if distributed:
        ddp.init(device=device)
    if (ddp.active() if distributed in (None, True) else False):
        if device.type == "cuda" and device.index is None:
            device = ddp.local_device()
        strategy = _DataParallel(device)
    else:
        strategy = _SingleProcess(device)
    tensors = as_batch_tuple(data, device)
    eval_tensors = None if eval_data is None else as_batch_tuple(eval_data, device)
    if eval_tensors is not None and [t.shape[1:] for t in eval_tensors] != [
            t.shape[1:] for t in tensors]:
        raise ValueError(f"eval_data has shapes {[tuple(t.shape) for t in eval_tensors]} but data "
                         f"has {[tuple(t.shape) for t in tensors]}: rows must match after N")
    num_data = tensors[0].shape[0]
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

    def row_kwargs(idx):
        """model_kwargs with the per-row ones restricted to the rows ``idx``."""
        if not per_row:
            return model_kwargs
        return {k: (v[idx] if k in per_row else v) for k, v in model_kwargs.items()}

    for module in _owners(model, guide):
        module.to(device)
    if clear_params:
        pyro.clear_param_store()
    loss = loss or Trace_ELBO()
    check_loss_rows(loss, model, guide, batch_size, num_data)
    loss = compiling.compile_loss(loss, compile, epochs * ddp.steps_per_epoch(
        num_data, batch_size, strategy.world))
    optim_given = optim
    optim = optim or adam(lr, local_lr)

    try:
        structure = read_structure(model, tensors, transform, row_kwargs, plate_name)
    except (RuntimeError, NotImplementedError) as error:
        raise _dtype_error(tensors, error) from error
    own_subsample = structure.subsample_size
    if own_subsample:  # the model subsamples its own plate: Pyro's SVI, all rows at every step
        if strategy.active:
            raise ValueError(f"the data plate {structure.plate_name!r} subsamples itself "
                             f"(subsample_size={own_subsample}); distributed fit needs the rows "
                             "passed to the model: remove subsample_size and set batch_size")
        batch_size = num_data

    check_guide_rows(guide, tensors, row_kwargs, transform, batch_size, num_data)

    def bound(idx):
        return (bind_rows(model, idx, num_data, structure.plate_name),
                bind_rows(guide, idx, num_data, structure.plate_name))

    owned = strategy.owned(num_data)

    def register():
        register_params(*bound(owned[:2]), take_rows(tensors, owned[:2], transform), loss,
                        row_kwargs(owned[:2]))

    guard = DivergenceGuard(None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME)
    checkpointer = _Checkpointer(checkpoint_dir, optim, strategy,
                                 {"num_data": num_data, "batch_size": batch_size, "seed": seed,
                                  "data": data_fingerprint(tensors), "lr": lr}, guard)
    # a different stream of z per rank; the shuffles come from their own generators
    pyro.set_rng_seed(seed + 100_003 * strategy.rank)
    strategy.start(register)
    result, start_epoch, start_batch = FitResult(checkpoint=None if checkpointer.path is None
                                                 else str(checkpointer.path)), 0, 0
    if resume:
        result, start_epoch, start_batch = checkpointer.resume(register, device)
        guard.resume(result.losses)

    steps_per_epoch = -(-num_data // own_subsample) if own_subsample else ddp.steps_per_epoch(
        num_data, batch_size, strategy.world)
    start_time = time.perf_counter() - result.wall_time
    bar = tqdm(total=epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch + start_batch,
               disable=not progress or strategy.rank != 0, desc="fit", unit="step", leave=False,
               mininterval=1.0)
    validating = pyro.infer.util.is_validation_enabled()
    try:
        for epoch in range(start_epoch, epochs):
            batches = strategy.batches(num_data, epoch, seed, batch_size)
            if own_subsample:
                batches = batches * steps_per_epoch
            first = start_batch if epoch == start_epoch else 0
            epoch_losses = result.losses[len(result.losses) - first:] if first else []
            pyro.enable_validation(validating and (validate is True or (
                validate == "first_epoch" and epoch == 0)))
            for b in range(first, steps_per_epoch):
                idx, weight = batches[b]
                idx = idx.to(device)
                batch = take_rows(tensors, idx, transform)
                if lr_schedule is not None:  # a function of the step: a resumed run continues it
                    set_lr_factor(optim, lr_factor(lr_schedule, result.step,
                                                   epochs * steps_per_epoch))
                try:
                    with _first_step_checks(result.step == 0, tensors):
                        value, before = take_step(*bound(idx), optim, loss, batch, row_kwargs(idx),
                                                  inner_steps, strategy, weight, inner_tol)
                except ValueError as error:  # Pyro's validation meeting NaN: say where it diverged
                    raise guard.step_error(error)
                result.step += 1
                if before is not None:
                    result.inner_gains.append((before - value) / num_data)
                value = value / num_data
                guard.check_loss(value, result.step, epoch + 1, b + 1)
                if result.step == 1:
                    _check_devices(device)
                    if optim_given is None and lr == 0 and (local_lr == 0 or not any(
                            is_local_param(n) for n in pyro.get_param_store().keys())):
                        raise ValueError(f"lr={lr!r} trains nothing: θ stays fixed and there is "
                                         "no per-datapoint φ table for local_lr to train; give "
                                         "lr > 0")
                    check_autoguide_rows(guide, structure, batch_size, num_data)
                result.losses.append(value)
                epoch_losses.append(value)
                bar.update(1)
                if checkpoint_every and result.step % checkpoint_every == 0 and b + 1 < steps_per_epoch:
                    checkpointer.save(epoch, b + 1, result)
            result.epoch_losses.append(sum(epoch_losses) / len(epoch_losses))
            bar.set_postfix(epoch=epoch + 1, loss=f"{result.epoch_losses[-1]:.3f}", refresh=False)
            # a non-finite parameter is a divergence (said as such) before it is a bad value
            guard.check_state(optim, result.step, all_ranks=(
                strategy.all_true if strategy.active else None))
            if len(idx):
                check_program_values(*bound(idx), batch, row_kwargs(idx), epoch + 1)
            if eval_tensors is not None and (epoch + 1) % eval_every == 0:
                result.eval_epochs.append(epoch + 1)
                with _own_rng(device, seed + epoch):  # not the training stream: the trained
                    # weights are the same whatever eval_every says
                    result.eval_elbos.append(evaluate_elbo(
                        model, guide, eval_tensors, model_kwargs=model_kwargs,
                        distributed=strategy.active, plate_name=structure.plate_name,
                        batch_size=len(eval_tensors[0]) if own_subsample else 512))
            result.wall_time = time.perf_counter() - start_time
            checkpointer.save(epoch + 1, 0, result)
            if callback is not None and callback(epoch + 1, result):
                break
    finally:
        pyro.enable_validation(validating)
        bar.close()
        result.compiled = getattr(loss, "summary", lambda: None)()
    if checkpointer.path is None:  # never return a NaN parameter, checkpoint or not
        guard.check_state(optim, result.step, all_ranks=(
            strategy.all_true if strategy.active else None))
    _finish_local(guide, model, tensors, model_kwargs, transform, strategy, result)
    result.wall_time = time.perf_counter() - start_time
    return result


def _finish_local(guide, model, tensors, model_kwargs, transform, strategy, result):
    """A per-datapoint guide (one with ``after_fit``, e.g. ``LocalGuide``) takes its φ_i to q* for
    the final θ and reports their convergence; a warning when rows did not converge. Skipped with
    a ``transform`` (the rows the φ_i were fitted to were drawn afresh) and across ranks."""
    finish = getattr(guide, "after_fit", None)
    if not callable(finish) or transform is not None or strategy.active:
        return
    result.local_convergence = finish(model, tensors, model_kwargs)
    if result.local_convergence is not None and result.local_convergence.fraction < 1.0:
        warnings.warn(f"fit: the per-datapoint φ_i have not all converged: "
                      f"{result.local_convergence}", RuntimeWarning)
