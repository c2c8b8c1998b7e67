"""Checkpoints: the param store, the optimiser's state, every RNG's state and the progress of a
``fit``, written so that a run continues bit for bit; and what counts as a good state to keep.
"""
import collections
import collections.abc
import dataclasses
import hashlib
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pyro
import pyro.util
import torch

from ppl_lvm import atomic


class DivergenceError(RuntimeError):
    """The loss (or a parameter, or the optimiser's state) went bad; the last good checkpoint was kept."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: unreadable, foreign, or from another run."""


# a loss above its running median by this many times the median's size (at least 1 nat) is a
# blow-up, not noise: a finite divergence (lr 1e6 takes a VAE's -ELBO from 48 to 4e28 nats in one
# step) never comes back, and without this check it runs to the end with rc 0
BLOWUP_FACTOR = 1e6
BLOWUP_WINDOW = 200
# a slower divergence: the median loss of the last SUSTAINED_WINDOW steps stands more than
# SUSTAINED_FACTOR times the untrained model's size above the untrained loss (the first step's) and
# has not come down since the window before it. On real VAE curves (digits, 20 epochs) the healthy
# lr 1e-3..0.3 runs peak at 0.9x their first loss; lr 1 spikes and recovers (1.4x); lr 3 sits at
# 11x and ends 7x. The first loss is one noisy draw (a lucky one can sit 6x below the next steps,
# as on a LocalGuide whose first sample lands on the data's own latents): a run still coming down
# from such a start is not stopped
SUSTAINED_FACTOR = 2.0
SUSTAINED_WINDOW = 25


class DivergenceGuard:
    """Stops a run whose loss or state went bad, saying where and what was kept.

    ``check_loss`` runs after every step on the loss per datapoint: a non-finite value, one
    ``BLOWUP_FACTOR`` times above the running median of the last good ones, or a median over the
    last ``SUSTAINED_WINDOW`` steps far above the untrained model's loss and not below the median of
    the window before it, stops the run.
    ``check_state`` runs before a checkpoint is written (and at the end of a run without one):
    parameters and the optimiser's state (Adam's moments) must be finite, so that only a good
    state is ever called the last good checkpoint. ``step_error`` turns an exception raised inside
    a step by NaN (Pyro's validation) into the same message.
    """

    def __init__(self, checkpoint=None, blowup_factor=BLOWUP_FACTOR, window=BLOWUP_WINDOW,
                 sustained_factor=SUSTAINED_FACTOR, sustained_window=SUSTAINED_WINDOW):
        self.checkpoint = checkpoint
        self.blowup_factor = blowup_factor
        self.recent = collections.deque(maxlen=window)
        self.sustained_factor, self.sustained_window = sustained_factor, sustained_window
        self.first = None  # the untrained model's loss (the first step's)
        self.last = None  # (step, epoch, batch) of the last good step

    def suspicious(self):
        """Whether the recent losses (fewer than the window early on) already stand as far
        above the untrained loss as a divergence: the state is then not checkpointed, so the last
        good checkpoint is the one kept if the run does diverge."""
        if self.first is None or not self.recent:
            return False
        median = statistics.median(list(self.recent)[-self.sustained_window:])
        return median - self.first > self.sustained_factor * max(abs(self.first), 1.0)

    def resume(self, losses):
        """Continue judging a resumed run from its recorded losses."""
        if losses:
            self.first = losses[0]
            self.recent.extend(losses[-self.recent.maxlen:])

    def kept(self):
        if not self.checkpoint:
            return "no checkpoint_dir was given, so nothing was kept"
        if Path(self.checkpoint).exists():
            return f"the last good checkpoint stays at {self.checkpoint}"
        return f"no checkpoint had been written yet (it would be {self.checkpoint})"

    def check_loss(self, value, step, epoch, batch):
        where = f"at step {step} (epoch {epoch}, batch {batch})"
        if not math.isfinite(value):
            raise DivergenceError(f"loss became {value} {where}; {self.kept()}")
        if self.recent:
            median = statistics.median(self.recent)
            if value - median > self.blowup_factor * max(abs(median), 1.0):
                raise DivergenceError(
                    f"loss blew up to {value:.3g} {where}, over {self.blowup_factor:.0e} times its "
                    f"running median {median:.3g}: the run diverged (is the learning rate too "
                    f"large?); {self.kept()}")
        self.recent.append(value)
        if self.first is None:
            self.first = value
        if len(self.recent) >= 2 * self.sustained_window:
            recent = list(self.recent)
            median = statistics.median(recent[-self.sustained_window:])
            before = statistics.median(recent[-2 * self.sustained_window:-self.sustained_window])
            if (median - self.first > self.sustained_factor * max(abs(self.first), 1.0)
                    and median >= before):
                self.recent.pop()
                raise DivergenceError(
                    f"loss diverged: its median over the last {self.sustained_window} steps is "
                    f"{median:.3g} at step {step} (epoch {epoch}, batch {batch}), not coming down "
                    f"({before:.3g} over the {self.sustained_window} before), against "
                    f"{self.first:.3g} for the untrained model at step 1 (is the learning rate too "
                    f"large?); {self.kept()}")
        self.last = (step, epoch, batch)

    def check_state(self, optim, step, all_ranks=None):
        finite_params = params_finite()
        finite_optim = optim_state_finite(optim)
        finite = finite_params and finite_optim
        if all_ranks is not None:
            finite = all_ranks(finite)
        if not finite:
            what = ("a parameter" if not finite_params else "the optimiser's state (Adam's moments)"
                    if not finite_optim else "a parameter or optimiser state on another rank")
            raise DivergenceError(f"{what} became non-finite by step {step}; {self.kept()}")

    def step_error(self, error):
        """The DivergenceError for ``error`` (raised inside a step) if NaN or inf caused it, else
        ``error`` itself: with Pyro's validation on, a NaN parameter surfaces as a ValueError
        about a distribution's arguments before the loss can be checked."""
        text = str(error)
        if not isinstance(error, ValueError) or not re.search(r"\b(nan|inf)\b", text):
            return error
        after = ("at the first step" if self.last is None else
                 f"at step {self.last[0] + 1} (after epoch {self.last[1]}, batch {self.last[2]})")
        first = next((line for line in text.splitlines() if line.strip()), "")
        divergence = DivergenceError(f"loss became nan {after}: Pyro's validation found NaN or inf "
                                     f"({first.strip()[:200]}); {self.kept()}")
        divergence.__cause__ = error
        return divergence


def _all_finite(value):
    if torch.is_tensor(value):
        if value.is_sparse:
            value = value.coalesce().values()
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, collections.abc.Mapping):  # torch optimisers' state is a defaultdict
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def params_finite():
    store = pyro.get_param_store()
    return all(torch.isfinite(store.get_param(n)).all() for n in store.keys())


def optim_state_finite(optim):
    """Whether every tensor of the optimiser's state (e.g. Adam's exp_avg, exp_avg_sq) is finite."""
    if hasattr(optim, "_optimizers"):  # LazyAdam: read its torch optimisers' state, no copies
        return (_all_finite([o.state for o in optim._optimizers()])
                and _all_finite(getattr(optim, "_waiting", {})))
    if hasattr(optim, "optim_objs"):  # a pyro.optim.PyroOptim
        return _all_finite([o.state for o in optim.optim_objs.values()])
    get_state = getattr(optim, "get_state", None)
    return get_state is None or _all_finite(get_state())


def data_fingerprint(tensors, num_rows=64):
    """What a resume checks its data against: each tensor's shape and dtype and a SHA-256 of
    ``num_rows`` evenly spaced rows (cheap for any N, and it changes when the data does)."""
    prints = []
    for tensor in tensors:
        rows = torch.linspace(0, len(tensor) - 1, min(num_rows, len(tensor))).long().unique()
        sample = tensor.detach()[rows.to(tensor.device)].cpu().contiguous()
        digest = hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]
        prints.append(f"{list(tensor.shape)} {str(tensor.dtype).replace('torch.', '')} {digest}")
    return "; ".join(prints)


# RNG states are stored as bytes, not ByteTensors: torch.load(map_location=device) moves every
# tensor to the device, and torch.set_rng_state accepts only a CPU ByteTensor ("RNG state must be a
# torch.ByteTensor" on resuming a CUDA run)
def _to_bytes(state):
    return state.cpu().numpy().tobytes() if torch.is_tensor(state) else state


def _to_byte_tensor(state):
    if isinstance(state, (bytes, bytearray)):
        return torch.frombuffer(bytearray(state), dtype=torch.uint8)
    return state.cpu()


def _rng_state():
    """Every RNG's state in plain types and tensors only (``torch.load(weights_only=True)`` reads
    it back): torch's and numpy's key as bytes, Python's as nested tuples."""
    pyro_state = pyro.util.get_rng_state()
    state = {"pyro": {**pyro_state, "torch": _to_bytes(pyro_state["torch"]),
                      "numpy": _plain_numpy_state(pyro_state["numpy"])}}
    if torch.cuda.is_available():
        state["cuda"] = [_to_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _plain_numpy_state(state):
    name, key, *rest = state
    return (name, key.astype("<u4").tobytes(), *rest)


def _numpy_state(state):
    name, key, *rest = state
    if isinstance(key, (bytes, bytearray)):
        key = np.frombuffer(key, dtype="<u4").astype("uint32")
    return (name, key, *rest)


def _set_rng_state(state):
    pyro.util.set_rng_state({**state["pyro"], "torch": _to_byte_tensor(state["pyro"]["torch"]),
                             "numpy": _numpy_state(state["pyro"]["numpy"])})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_to_byte_tensor(s) for s in state["cuda"]])


def _constraint_classes():
    from pyro.distributions import constraints as pyro_constraints
    from torch.distributions import constraints as torch_constraints

    classes = {}
    for module in (torch_constraints, pyro_constraints):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, torch_constraints.Constraint):
                classes[f"{value.__module__}.{value.__qualname__}"] = value
    return classes


def plain_constraint(constraint):
    """A param's constraint as plain types ({"constraint": class path, "attrs": ...}), so that a
    checkpoint holds no pickled objects and loads with ``weights_only=True``."""
    def plain(value):
        if isinstance(value, torch.distributions.constraints.Constraint):
            cls = type(value)
            return {"constraint": f"{cls.__module__}.{cls.__qualname__}",
                    "attrs": {k: plain(v) for k, v in vars(value).items()}}
        if isinstance(value, (list, tuple)):
            return type(value)(plain(v) for v in value)
        return value

    return plain(constraint)


def constraint_from_plain(value):
    """The constraint ``plain_constraint`` described; only Constraint classes of torch or Pyro
    are ever built (a foreign name is refused, not imported)."""
    if isinstance(value, dict) and "constraint" in value:
        cls = _constraint_classes().get(value["constraint"])
        if cls is None:
            raise ValueError(f"unknown constraint {value['constraint']!r}")
        constraint = cls.__new__(cls)
        constraint.__dict__.update({k: constraint_from_plain(v)
                                    for k, v in value.get("attrs", {}).items()})
        return constraint
    if isinstance(value, (list, tuple)):
        return type(value)(constraint_from_plain(v) for v in value)
    return value


def save_checkpoint(path, optim, progress, result, keep=None):
    """Atomically write params, optimiser state, RNG state and progress to ``path``.

    keep(name) -> bool: only these params (and their optimiser state) are written (distributed
    runs keep the global ones here and write local shards per rank).
    """
    params = pyro.get_param_store().get_state()
    optim_state = optim.get_state()
    if keep is not None:
        params = {part: {n: v for n, v in values.items() if keep(n)} for part, values in params.items()}
        optim_state = {n: v for n, v in optim_state.items() if keep(n)}
    params = {**params, "constraints": {n: plain_constraint(c)
                                        for n, c in params.get("constraints", {}).items()}}
    state = {
        "params": params,
        "optim": optim_state,
        "rng": _rng_state(),
        "progress": progress,
        "result": dataclasses.asdict(result),
    }
    atomic.torch_save(state, path)


def load_params(state, device=None):
    """Copy saved values into the param store, in place where a parameter already exists.

    In place keeps nn.Module parameters registered by ``pyro.module`` tied to their modules, so
    call ``register_params`` first. ``state``: a param store state (``get_state()``) or a
    checkpoint dict holding one under "params".
    """
    state = state.get("params", state)
    store = pyro.get_param_store()
    for name, value in state["params"].items():
        value = value.to(device) if device is not None else value
        if name in store:
            current = store._params[name]
            if current.shape != value.shape:
                raise ValueError(f"saved parameter {name!r} has shape {tuple(value.shape)} but the "
                                 f"model's has {tuple(current.shape)}: was it saved from another "
                                 "configuration?")
            current.data.copy_(value)
        else:
            store._params[name] = value.detach().requires_grad_(True)
            store._constraints[name] = state["constraints"][name]
            store._param_to_name[store._params[name]] = name


CHECKPOINT_KEYS = ("params", "optim", "rng", "progress", "result")
PROGRESS_KEYS = ("num_data", "batch_size", "seed", "epoch", "batch")


def unreadable(path, error, what="a checkpoint written by ppl-lvm", fix=None):
    """The one-line error for a file that is empty, truncated or foreign."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    text = str(error).splitlines()[0] if str(error) else "no detail"
    detail = "it is empty" if size == 0 else f"{type(error).__name__}: {text.split('. ')[0][:120]}"
    if "Weights only load failed" in str(error):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        detail = ("it holds pickled Python objects" + (f" ({found.group(1)})" if found else "")
                  + ", not only tensors and plain values; such a file may carry code, and "
                  "ppl-lvm never runs it")
    fix = fix or "delete it (or train afresh with --overwrite) to start over"
    return CheckpointError(f"{path} is not {what} ({detail}): it was truncated, or belongs to "
                           f"something else; {fix}")


def load_checkpoint(path, device):
    """The dict ``save_checkpoint`` wrote at ``path``, its tensors on ``device`` (RNG states stay
    bytes on the CPU). Raises CheckpointError naming the file for an empty, truncated or foreign one."""
    try:
        # weights_only: a received run's checkpoint is data, never code (a pickle payload would
        # otherwise run on --resume)
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # EOFError, RuntimeError (zip), UnpicklingError, ...
        raise unreadable(path, error) from error
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise unreadable(path, KeyError(f"it holds {found}, not {list(CHECKPOINT_KEYS)}"))
    if not isinstance(state["progress"], dict) or any(k not in state["progress"] for k in PROGRESS_KEYS):
        raise unreadable(path, KeyError(f"its progress lacks {list(PROGRESS_KEYS)}"))
    params = state["params"]
    if isinstance(params, dict) and isinstance(params.get("constraints"), dict):
        try:
            params["constraints"] = {n: constraint_from_plain(c)
                                     for n, c in params["constraints"].items()}
        except (ValueError, TypeError, AttributeError) as error:
            raise unreadable(path, error) from error
    return state


def check_resumable(state, path, config, world):
    """Refuse to resume from ``state`` (read from ``path``) unless it was written by a run of the
    same configuration (``config``: num_data, batch_size, seed, and where recorded the data's
    fingerprint and lr) and number of processes."""
    saved_world = state["progress"].get("world_size", 1)
    if saved_world != world:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved_world} process(es) but this run has "
            f"{world}: local tables are sharded by rank, so resume with the same number "
            f"(torchrun --nproc_per_node={saved_world})")
    progress = state["progress"]
    if "data" in config and "data" in progress and progress["data"] != config["data"]:
        raise CheckpointError(
            f"checkpoint {path} was written for other data ({progress['data']}) than this run's "
            f"({config['data']}): resume on the same data, or train afresh with --overwrite")
    if "lr" in config and "lr" in progress and progress["lr"] != config["lr"]:
        raise CheckpointError(
            f"checkpoint {path} was written with lr {progress['lr']:g}, not {config['lr']:g}: resume "
            f"with --lr {progress['lr']:g} (a resumed run continues the same optimisation), or train "
            "afresh with --overwrite")
    # older checkpoints hold no data fingerprint or lr: those cannot be checked
    saved = {k: progress[k] for k in config if k in progress}
    wanted = {k: config[k] for k in saved}
    if saved != wanted:
        raise CheckpointError(f"checkpoint {path} was written with {saved}, not {wanted}")


def check_epochs(state, path, epochs):
    """Refuse to "resume" to fewer epochs than ``state`` has already done (the run would stop at
    once and its record would claim ``epochs``)."""
    done = state["progress"]["epoch"]
    if epochs < done:
        raise CheckpointError(f"checkpoint {path} has already done {done} epochs; --epochs {epochs} "
                              f"would resume nothing: pass --epochs {done} or more")


CHECKPOINT_NAME = "checkpoint.pt"
SHARD_NAME = "local-rank{rank}-of-{world}.pt"


@dataclasses.dataclass
class Checkpointing:
    """fit's checkpoints, grouped (``fit(checkpointing=Checkpointing(...))``; the same as fit's
    ``checkpoint_dir``, ``checkpoint_every`` and ``resume``): ``checkpoint.pt`` in ``directory``
    at each epoch's end and every ``every`` steps; ``resume`` continues from it exactly."""

    directory: object = None
    every: int = None
    resume: bool = False


class Checkpointer:
    """Writes and reads a run's checkpoint: ``checkpoint.pt`` (rank 0: global params, optimiser
    state, RNG, progress) and, on several ranks, one shard of local rows per rank (written and
    read by the strategy, ``ppl_lvm.distributed.DataParallel``). A checkpoint is written only
    while ``guard`` (a ``DivergenceGuard``) finds the run healthy."""

    def __init__(self, folder, optim, strategy, config, guard):
        self.path = None if folder is None else Path(folder) / CHECKPOINT_NAME
        self.optim, self.strategy, self.config, self.guard = optim, strategy, config, guard
        self.shard = None if self.path is None or not strategy.active else (
            self.path.parent / SHARD_NAME.format(rank=strategy.rank, world=strategy.world))
        if self.path is not None and strategy.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        strategy.barrier()

    def resume(self, register, device):
        """Load the checkpoint into the param store and optimiser; returns (the saved result as a
        dict of ``FitResult``'s fields, epoch, batch)."""
        if self.path is None or not self.path.exists():
            raise FileNotFoundError(f"resume=True (--resume) but no checkpoint at {self.path}: "
                                    "nothing to continue; start the run without it")
        state = load_checkpoint(self.path, device)
        check_resumable(state, self.path, self.config, self.strategy.world)
        register()
        load_params(state, device)
        optim_state = state["optim"]
        if self.shard is not None:
            shard = self.strategy.load_shard(self.shard, self.config["num_data"], device)
            if shard["progress"] != state["progress"]:
                raise ValueError(f"{self.shard} (at {shard['progress']}) does not match "
                                 f"{self.path} (at {state['progress']}); the run died while "
                                 "checkpointing")
            optim_state = {**optim_state, **shard["optim"]}
            state["rng"] = shard["rng"]
        self.optim.set_state(optim_state)
        _set_rng_state(state["rng"])
        progress = state["progress"]
        return state["result"], progress["epoch"], progress["batch"]

    def save(self, epoch, batch, result):
        if self.path is None:
            return
        self.guard.check_state(self.optim, result.step, all_ranks=self.strategy.all_ranks)
        if self.guard.suspicious():  # keep the last good one (the losses are the same on all ranks)
            return
        position = {**self.config, "epoch": epoch, "batch": batch}
        if self.strategy.world > 1:
            position["world_size"] = self.strategy.world
        self.strategy.save_checkpoint(self.path, self.shard, self.optim, position, result)
