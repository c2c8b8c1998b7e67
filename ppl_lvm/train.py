"""fit(): stochastic variational inference for any Pyro model/guide pair over a "data" plate.

Each step draws a minibatch of B rows, calls ``model(*batch, idx=idx, num_data=N)`` (and the guide
alike) so local sites are scaled by N / B and per-datapoint guides can find their φ_i, and takes one
optimiser step on -ELBO. Checkpoints hold everything needed to continue bit for bit: the param store,
the optimiser's state, every RNG's state and the step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import pyro
import pyro.optim
import pyro.poutine as poutine
import pyro.infer.util
import torch
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from ppl_lvm import checks
from ppl_lvm import compiled as compiling
from ppl_lvm import distributed as ddp
from ppl_lvm import densities, program
from ppl_lvm.checkpoint import (  # noqa: F401  (re-exported: public names)
    CHECKPOINT_NAME, SHARD_NAME, Checkpointer, Checkpointing, DivergenceError, DivergenceGuard,
    _rng_state, _set_rng_state, check_resumable, data_fingerprint, load_checkpoint, load_params,
    params_finite, save_checkpoint)
from ppl_lvm.checks import (  # noqa: F401  (re-exported: they lived here)
    FitValidationError, as_batch_tuple, check_autoguide_rows, check_guide_rows, check_loss_rows,
    check_program_values, nonfinite_rows, read_structure, take_rows)
from ppl_lvm.optim import (  # noqa: F401  (re-exported: they lived here)
    LR_SCHEDULES, LazyAdam, Schedule, adam, is_local_param, lr_factor, set_lr_factor)

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
    checkpoint: str | None = None
    inner_gains: list = dataclasses.field(default_factory=list)
    local_convergence: object = None
    compiled: str | None = None  # with fit(compile=...): graphs, compile time, steps on each path


def bind_rows(fn, idx, num_data, plate_name=None):
    """``fn`` for one minibatch: given ``idx``/``num_data`` if it names them, else its sites in the
    data plate (``plate_name``; by default the plate as long as the minibatch) scaled by N / B.

    Global sites (outside the data plate) are never scaled, so the minibatch loss estimates the
    full-data loss without bias for any program (see ``ppl_lvm.program.bind``).
    """
    return program.bind(fn, idx, num_data, plate_name)


def _owners(*fns):
    """nn.Modules whose bound methods are ``fns`` (e.g. ``vae.model``): fit moves them to the device."""
    modules = []
    for fn in fns:
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module) and all(owner is not m for m in modules):
            modules.append(owner)
    return modules


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


def torch_item(value):
    return value.item() if torch.is_tensor(value) else float(value)


@program.in_evaluation_mode
def evaluate_elbo(model: Callable[..., Any], guide: Callable[..., Any] | None,
                  data: torch.Tensor | Sequence[torch.Tensor], num_particles: int = 1,
                  batch_size: int = 512, model_kwargs: dict[str, Any] | None = None,
                  distributed: bool = False, plate_name: str | None = None) -> float:
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


@contextlib.contextmanager
def _own_rng(device, seed):
    """Run the block on torch's RNG seeded with ``seed`` and restore the caller's stream after."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def fit(model: Callable[..., Any], guide: Callable[..., Any],
        data: torch.Tensor | Sequence[torch.Tensor], *, epochs: int = 10, batch_size: int = 128,
        lr: float = 1e-3, optim: pyro.optim.PyroOptim | LazyAdam | None = None,
        loss: pyro.infer.ELBO | None = None, device: str | torch.device = "cpu", seed: int = 0,
        progress: bool = True, eval_data: torch.Tensor | Sequence[torch.Tensor] | None = None,
        eval_every: int = 1, checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None, resume: bool = False, clear_params: bool = True,
        model_kwargs: dict[str, Any] | None = None, per_row: str | Sequence[str] = (),
        transform: Callable[..., Any] | None = None,
        callback: Callable[[int, FitResult], bool | None] | None = None, inner_steps: int = 0,
        local_lr: float = 1e-2, distributed: bool | None = None,
        validate: bool | Literal["first_epoch"] = "first_epoch", plate_name: str | None = None,
        lr_schedule: str | Callable[[int, int], float] | None = None,
        inner_tol: float | None = None, compile: bool | str = False,
        schedule: Schedule | None = None, checkpointing: Checkpointing | None = None,
        evaluation: Evaluation | None = None) -> FitResult:
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
            torch.compile: ~10-60 s to compile). On one CPU thread a recorded step measured
            0.81-0.91x a hand-written eager PyTorch step, the inductor one 0.80x
            (``benchmarks/bench_svi_step.py``). Each graph is checked against eager Pyro on its
            first batch; a program it cannot follow runs eagerly, said in one warning line.
            Steps run eagerly while Pyro's validation is on (the first epoch by default).
            ``result.compiled`` says what happened.

        schedule, checkpointing, evaluation: the same options grouped, as a ``Schedule`` (lr,
            local_lr, lr_schedule, inner_steps, inner_tol), a ``Checkpointing`` (directory =
            checkpoint_dir, every = checkpoint_every, resume) and an ``Evaluation`` (data =
            eval_data, every = eval_every); a group given with one of its keywords also set to
            another value is an error.

    Returns:
        FitResult (the same on every rank). Raises DivergenceError when the loss becomes non-finite.
    """
    schedule = _grouped(schedule, Schedule, lr=lr, local_lr=local_lr, lr_schedule=lr_schedule,
                        inner_steps=inner_steps, inner_tol=inner_tol)
    checkpointing = _grouped(checkpointing, Checkpointing, directory=checkpoint_dir,
                             every=checkpoint_every, resume=resume)
    evaluation = _grouped(evaluation, Evaluation, data=eval_data, every=eval_every)
    run = _Run(model, guide, data, epochs, batch_size, optim, loss, device, seed, schedule,
               checkpointing, evaluation, clear_params, model_kwargs, per_row, transform,
               distributed, validate, plate_name, compile)
    result, bar = run.result, run.progress_bar(progress)
    validating = pyro.infer.util.is_validation_enabled()
    try:
        for epoch in range(run.start_epoch, epochs):
            pyro.enable_validation(validating and (validate is True or (
                validate == "first_epoch" and epoch == 0)))
            epoch_losses = run.losses_so_far(epoch)
            for b, (idx, weight) in run.batches(epoch):
                epoch_losses.append(run.step(idx, weight, epoch, b))
                bar.update(1)
                if checkpointing.every and result.step % checkpointing.every == 0 and (
                        b + 1 < run.steps_per_epoch):
                    run.checkpointer.save(epoch, b + 1, result)
            result.epoch_losses.append(sum(epoch_losses) / len(epoch_losses))
            bar.set_postfix(epoch=epoch + 1, loss=f"{result.epoch_losses[-1]:.3f}", refresh=False)
            run.end_epoch(epoch)
            result.wall_time = time.perf_counter() - run.start_time
            run.checkpointer.save(epoch + 1, 0, result)
            if callback is not None and callback(epoch + 1, result):
                break
    finally:
        pyro.enable_validation(validating)
        bar.close()
        result.compiled = getattr(run.loss, "summary", lambda: None)()
    return run.finish()


@dataclasses.dataclass
class Evaluation:
    """fit's held-out evaluation, grouped (``fit(evaluation=Evaluation(...))``; the same as fit's
    ``eval_data`` and ``eval_every``): the ELBO per datapoint of ``data`` every ``every`` epochs."""

    data: object = None
    every: int = 1


def _grouped(group, kind, **keywords):
    """``group`` (a ``kind`` or None) with fit's own ``keywords`` for its fields: without a group,
    the keywords; with one, the group, where a keyword away from its default must agree with it."""
    if group is None:
        return kind(**keywords)
    if not isinstance(group, kind):
        raise TypeError(f"expected a ppl_lvm {kind.__name__} or None, got {type(group).__name__}")
    default = kind()
    for name, value in keywords.items():
        if not _same(value, getattr(default, name)) and not _same(value, getattr(group, name)):
            raise ValueError(f"{name}={value!r} and {kind.__name__}({name}="
                             f"{getattr(group, name)!r}) disagree: give it once")
    return group


def _same(a, b):
    plain = (int, float, str, bool, Path, type(None))
    return a is b or (isinstance(a, plain) and isinstance(b, plain) and a == b)


class _Run:
    """One call of ``fit``, set up and checked: the data on its device, the strategy, the loss,
    the optimiser, the checkpointer and divergence guard, and the result so far. ``fit``'s loop
    calls ``step`` per minibatch and ``end_epoch`` per epoch."""

    def __init__(self, model, guide, data, epochs, batch_size, optim, loss, device, seed,
                 schedule, checkpointing, evaluation, clear_params, model_kwargs, per_row,
                 transform, distributed, validate, plate_name, compile):
        checks.check_types(epochs=epochs, batch_size=batch_size, seed=seed,
                           eval_every=evaluation.every, checkpoint_every=checkpointing.every,
                           inner_steps=schedule.inner_steps)
        if optim is None:
            checks.check_types(lr=schedule.lr)
        checks.check_fit_args(epochs, batch_size, checkpointing.every, schedule.inner_steps,
                              validate, checkpointing.resume, checkpointing.directory,
                              evaluation.every, schedule.lr_schedule, schedule.inner_tol)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for but CUDA is not available")
        self.strategy, self.device = strategy, device = ddp.strategy_for(distributed, device)
        self.tensors = tensors = as_batch_tuple(data, device)
        self.eval_tensors = None if evaluation.data is None else as_batch_tuple(evaluation.data,
                                                                                device)
        checks.check_eval_data(self.eval_tensors, tensors)
        self.num_data = num_data = tensors[0].shape[0]
        self.model_kwargs, self.per_row = checks.per_row_kwargs(model_kwargs, per_row, num_data,
                                                                device, evaluation.data)
        for module in _owners(model, guide):
            module.to(device)
        if clear_params:
            pyro.clear_param_store()
        loss = loss or Trace_ELBO()
        checks.check_loss_rows(loss, model, guide, batch_size, num_data)
        self.loss = compiling.compile_loss(loss, compile, epochs * ddp.steps_per_epoch(
            num_data, batch_size, strategy.world))
        self.optim_given, self.optim = optim, optim or adam(schedule.lr, schedule.local_lr)
        try:
            self.structure = read_structure(model, tensors, transform, self.row_kwargs, plate_name)
        except (RuntimeError, NotImplementedError) as error:
            raise checks.dtype_error(tensors, error) from error
        self.own_subsample = self.structure.subsample_size
        if self.own_subsample:  # the model subsamples its own plate: Pyro's SVI, all rows at every step
            if strategy.active:
                raise ValueError(f"the data plate {self.structure.plate_name!r} subsamples itself "
                                 f"(subsample_size={self.own_subsample}); distributed fit needs "
                                 "the rows passed to the model: remove subsample_size and set "
                                 "batch_size")
            batch_size = num_data
        checks.check_guide_rows(guide, tensors, self.row_kwargs, transform, batch_size, num_data)
        self.model, self.guide, self.transform, self.batch_size = model, guide, transform, batch_size
        self.epochs, self.seed, self.schedule, self.evaluation = epochs, seed, schedule, evaluation
        self._start(checkpointing)

    def _start(self, checkpointing):
        """Create the params (or load them from the checkpoint) and seed the run."""
        strategy, directory = self.strategy, checkpointing.directory
        self.owned = strategy.owned(self.num_data)
        self.guard = DivergenceGuard(None if directory is None else Path(directory) / CHECKPOINT_NAME)
        self.checkpointer = Checkpointer(directory, self.optim, strategy, {
            "num_data": self.num_data, "batch_size": self.batch_size, "seed": self.seed,
            "data": data_fingerprint(self.tensors), "lr": self.schedule.lr}, self.guard)
        # a different stream of z per rank; the shuffles come from their own generators
        pyro.set_rng_seed(self.seed + 100_003 * strategy.rank)
        strategy.start(self.register)
        path = self.checkpointer.path
        self.result = FitResult(checkpoint=None if path is None else str(path))
        self.start_epoch, self.start_batch = 0, 0
        if checkpointing.resume:
            saved, self.start_epoch, self.start_batch = self.checkpointer.resume(self.register,
                                                                                 self.device)
            self.result = FitResult(**saved)
            self.guard.resume(self.result.losses)
        self.steps_per_epoch = -(-self.num_data // self.own_subsample) if self.own_subsample \
            else ddp.steps_per_epoch(self.num_data, self.batch_size, strategy.world)
        self.start_time = time.perf_counter() - self.result.wall_time

    def row_kwargs(self, idx):
        """model_kwargs with the per-row ones restricted to the rows ``idx``."""
        if not self.per_row:
            return self.model_kwargs
        return {k: (v[idx] if k in self.per_row else v) for k, v in self.model_kwargs.items()}

    def bound(self, idx):
        return (bind_rows(self.model, idx, self.num_data, self.structure.plate_name),
                bind_rows(self.guide, idx, self.num_data, self.structure.plate_name))

    def register(self):
        rows = self.owned[:2]
        register_params(*self.bound(rows), take_rows(self.tensors, rows, self.transform),
                        self.loss, self.row_kwargs(rows))

    def progress_bar(self, progress):
        return tqdm(total=self.epochs * self.steps_per_epoch,
                    initial=self.start_epoch * self.steps_per_epoch + self.start_batch,
                    disable=not progress or self.strategy.rank != 0, desc="fit", unit="step",
                    leave=False, mininterval=1.0)

    def first_batch(self, epoch):
        return self.start_batch if epoch == self.start_epoch else 0

    def losses_so_far(self, epoch):
        """The step losses of ``epoch`` taken before a resume (a new list)."""
        first, losses = self.first_batch(epoch), self.result.losses
        return losses[len(losses) - first:] if first else []

    def batches(self, epoch):
        """(b, (rows [B], weight)) for the steps of ``epoch`` still to take."""
        batches = self.strategy.batches(self.num_data, epoch, self.seed, self.batch_size)
        if self.own_subsample:
            batches = batches * self.steps_per_epoch
        for b in range(self.first_batch(epoch), self.steps_per_epoch):
            yield b, batches[b]

    def step(self, idx, weight, epoch, b):
        """One minibatch's step (step b of ``epoch``, 0-based); returns its loss per datapoint."""
        result, schedule, num_data = self.result, self.schedule, self.num_data
        idx = idx.to(self.device)
        batch = take_rows(self.tensors, idx, self.transform)
        if schedule.lr_schedule is not None:  # a function of the step: a resumed run continues it
            set_lr_factor(self.optim, lr_factor(schedule.lr_schedule, result.step,
                                                self.epochs * self.steps_per_epoch))
        try:
            with checks.first_step_checks(result.step == 0, self.tensors):
                value, before = take_step(*self.bound(idx), self.optim, self.loss, batch,
                                          self.row_kwargs(idx), schedule.inner_steps,
                                          self.strategy, weight, schedule.inner_tol)
        except ValueError as error:  # Pyro's validation meeting NaN: say where it diverged
            raise self.guard.step_error(error)
        result.step += 1
        if before is not None:
            result.inner_gains.append((before - value) / num_data)
        value = value / num_data
        self.guard.check_loss(value, result.step, epoch + 1, b + 1)
        if result.step == 1:
            checks.check_devices(self.device)
            checks.check_trains_something(self.optim_given, schedule.lr, schedule.local_lr)
            checks.check_autoguide_rows(self.guide, self.structure, self.batch_size, num_data)
        result.losses.append(value)
        self.last = idx, batch
        return value

    def end_epoch(self, epoch):
        """The epoch's checks (parameters finite, values in their supports) and evaluation."""
        # a non-finite parameter is a divergence (said as such) before it is a bad value
        self.guard.check_state(self.optim, self.result.step, all_ranks=self.strategy.all_ranks)
        idx, batch = self.last
        if len(idx):
            check_program_values(*self.bound(idx), batch, self.row_kwargs(idx), epoch + 1)
        if self.eval_tensors is not None and (epoch + 1) % self.evaluation.every == 0:
            self.result.eval_epochs.append(epoch + 1)
            with _own_rng(self.device, self.seed + epoch):  # not the training stream: the
                # trained weights are the same whatever eval_every says
                self.result.eval_elbos.append(evaluate_elbo(
                    self.model, self.guide, self.eval_tensors, model_kwargs=self.model_kwargs,
                    distributed=self.strategy.active, plate_name=self.structure.plate_name,
                    batch_size=len(self.eval_tensors[0]) if self.own_subsample else 512))

    def finish(self):
        """The final checks and the per-datapoint guide's finish; returns the result."""
        result = self.result
        if self.checkpointer.path is None:  # never return a NaN parameter, checkpoint or not
            self.guard.check_state(self.optim, result.step, all_ranks=self.strategy.all_ranks)
        _finish_local(self.guide, self.model, self.tensors, self.model_kwargs, self.transform,
                      self.strategy, result)
        result.wall_time = time.perf_counter() - self.start_time
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
