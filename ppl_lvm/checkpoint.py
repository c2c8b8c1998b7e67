"""Checkpoints: the param store, the optimiser's state, every RNG's state and the progress of a
``fit``, written so that a run continues bit for bit; and what counts as a good state to keep.
"""
import dataclasses
import math
import os
from pathlib import Path

import pyro
import pyro.util
import torch


class DivergenceError(RuntimeError):
    """The loss (or a parameter) became non-finite; the last good checkpoint was kept."""


class DivergenceGuard:
    """Stops a run whose loss or state went bad, saying where and what was kept.

    ``check_loss`` runs after every step on the loss per datapoint; ``check_state`` runs before a
    checkpoint is written, so that only a good state is ever called the last good checkpoint.
    """

    def __init__(self, checkpoint=None):
        self.checkpoint = checkpoint

    def kept(self):
        return (f"the last good checkpoint stays at {self.checkpoint}" if self.checkpoint
                else "no checkpoint_dir was given")

    def check_loss(self, value, step, epoch, batch):
        if not math.isfinite(value):
            raise DivergenceError(f"loss became {value} at step {step} (epoch {epoch}, batch "
                                  f"{batch}); {self.kept()}")

    def check_state(self, optim, step, all_ranks=None):
        finite = params_finite()
        if all_ranks is not None:
            finite = all_ranks(finite)
        if not finite:
            raise DivergenceError(f"a parameter became non-finite by step {step}; {self.kept()}")


    def check_error(self, error, step, epoch, batch):
        """A step that raised (Pyro's validation dumps a NaN tensor): if the parameters went bad,
        say so as for a NaN loss, naming the step."""
        if not params_finite() or "nan" in str(error).lower():
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            raise DivergenceError(f"the step became non-finite at step {step} (epoch {epoch}, "
                                  f"batch {batch}): {first}; {self.kept()}") from error

    def check_final(self, optim, step):
        """At the end of ``fit``: never return a NaN parameter, checkpoint or not."""
        if not params_finite():
            raise DivergenceError(f"a parameter is non-finite after step {step}; {self.kept()}")


def params_finite():
    store = pyro.get_param_store()
    return all(torch.isfinite(store.get_param(n)).all() for n in store.keys())


def _rng_state():
    state = {"pyro": pyro.util.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    pyro.util.set_rng_state(state["pyro"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    state = {
        "params": params,
        "optim": optim_state,
        "rng": _rng_state(),
        "progress": progress,
        "result": dataclasses.asdict(result),
    }
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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


def load_checkpoint(path, device):
    """The dict ``save_checkpoint`` wrote at ``path``, its tensors on ``device``."""
    return torch.load(path, map_location=device, weights_only=False)


def check_resumable(state, path, config, world):
    """Refuse to resume from ``state`` (read from ``path``) unless it was written by a run of the
    same configuration (``config``: num_data, batch_size, seed) and number of processes."""
    saved_world = state["progress"].get("world_size", 1)
    if saved_world != world:
        raise ValueError(
            f"checkpoint {path} was written by {saved_world} process(es) but this run has "
            f"{world}: local tables are sharded by rank, so resume with the same number "
            f"(torchrun --nproc_per_node={saved_world})")
    saved = {k: state["progress"][k] for k in config}
    if saved != config:
        raise ValueError(f"checkpoint {path} was written with {saved}, not {config}")
