"""Data-parallel SVI and evaluation on several processes with torch.distributed (gloo or NCCL).

Under ``torchrun --nproc_per_node=P`` every rank holds the same global parameters (decoder θ,
encoder λ, mixture weights): they start equal (broadcast from rank 0) and stay equal because every
step averages their gradients over ranks before the optimiser step. The per-datapoint local
parameters φ_i (names starting with ``LOCAL_PREFIX``) are sharded: rank r owns a fixed block of rows,
only ever draws minibatches from it, and never communicates its φ_i.

Batches: one global permutation per epoch (the one ``fit`` uses on one process) is split by owner;
step b takes rows [b·B, (b+1)·B) of every rank's part, so the union over ranks is one global batch of
P·B rows. Each rank's loss is scaled by N / B_r; averaging gradients with weights B_r / Σ B_r gives
exactly the gradient of the global batch scaled by N / Σ B_r.
"""
import os

import pyro
import pyro.infer.util
import torch
import torch.distributed as dist

from ppl_lvm import atomic
from ppl_lvm.checkpoint import _rng_state, save_checkpoint, unreadable
from ppl_lvm.program import LOCAL_PREFIX  # noqa: F401  (public here too)


# ----------------------------------------------------------------------------------------------
# process group


def launched():
    """Whether this process was started by torchrun (or another launcher setting RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(backend=None, device=None):
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    backend: "gloo" (CPU) or "nccl" (CUDA); None picks NCCL when ``device`` (or, when it is None,
    the machine) has CUDA, else gloo. With NCCL the current CUDA device becomes LOCAL_RANK.
    Does nothing when the group already exists. Returns (rank, world_size).
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if not dist.is_initialized():
        if not launched():
            raise RuntimeError("distributed=True but RANK/WORLD_SIZE are not set: start the job with "
                               "torchrun --nproc_per_node=P ... (or call "
                               "torch.distributed.init_process_group yourself)")
        if backend is None:
            cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
            backend = "nccl" if cuda else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def active():
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size():
    """The number of ranks P (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main():
    """Whether this is rank 0, the one that prints, shows progress and writes global checkpoints."""
    return rank() == 0


def local_device():
    """The device this rank should train on: cuda:LOCAL_RANK with NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# which rows a rank sees


def owned_rows(num_data, rank, world):
    """The fixed block of rows rank ``rank`` owns: [n_r] long (blocks differ in size by at most 1)."""
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    if num_data < world:
        raise ValueError(f"cannot shard N={num_data} rows over {world} ranks (need N >= P)")
    return torch.tensor_split(torch.arange(num_data), world)[rank]


def owner(num_data, world):
    """[N] long: the rank that owns each row."""
    sizes = [len(block) for block in torch.tensor_split(torch.arange(num_data), world)]
    return torch.repeat_interleave(torch.arange(world), torch.tensor(sizes))


def epoch_permutation(num_data, epoch, seed):
    """[N] long: the epoch's global shuffle (the same as a one-process ``fit``)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_data, generator=generator)


def shard_indices(num_data, epoch, seed, rank, world):
    """[n_r] long: rank ``rank``'s rows for ``epoch``, in the order it visits them.

    The rows it owns (``owned_rows``) in the order of the epoch's global permutation, so each epoch
    reshuffles them while a row never moves to another rank. With world = 1 this is the global
    permutation itself. Cut into batches of B (``rank_batches``), rank r's batch b taken over all
    ranks is one global batch of the same permutation.
    """
    order = epoch_permutation(num_data, epoch, seed)
    return order[owner(num_data, world)[order] == rank]


def steps_per_epoch(num_data, batch_size, world):
    """Optimiser steps in one epoch: ceil(n_max / B), the same on every rank."""
    largest = -(-num_data // world)
    return -(-largest // batch_size)


def rank_batches(num_data, epoch, seed, rank, world, batch_size):
    """Rank ``rank``'s batches for ``epoch``: a list of (idx [B_r] long, weight float).

    weight = B_r / Σ_r' B_r' is this rank's share of the global batch, the factor its gradients
    get in the all-reduce. When shards differ in size, a rank's last batch may be empty (weight 0):
    it still joins the all-reduce. A batch that holds a whole shard (full batch) keeps the rows in
    their order: a guide whose parameters are indexed by position (one row of a table per datapoint,
    ``AutoNormal`` over local sites) must meet the same row at every step, as in Pyro's own SVI.
    """
    if steps_per_epoch(num_data, batch_size, world) == 1:
        rows = owned_rows(num_data, rank, world)
        return [(rows, len(rows) / num_data)]
    shards = [shard_indices(num_data, epoch, seed, r, world) for r in range(world)]
    batches = []
    for b in range(steps_per_epoch(num_data, batch_size, world)):
        parts = [shard[b * batch_size:(b + 1) * batch_size] for shard in shards]
        total = sum(len(part) for part in parts)
        batches.append((parts[rank], len(parts[rank]) / total))
    return batches


def global_batches(num_data, epoch, seed, world, batch_size):
    """The global batches of ``epoch``: a list of [Σ_r B_r] long (rank 0's rows, then rank 1's, ...).

    What P ranks with batch B see together at each step, i.e. what one process with batch P·B
    would have to see to take the same steps.
    """
    per_rank = [rank_batches(num_data, epoch, seed, r, world, batch_size) for r in range(world)]
    return [torch.cat([batches[b][0] for batches in per_rank]) for b in range(len(per_rank[0]))]


# ----------------------------------------------------------------------------------------------
# parameters


def is_local(name):
    """Whether param ``name`` is a per-datapoint local table φ (sharded, never communicated)."""
    return name.startswith(LOCAL_PREFIX)


def global_params():
    """{name: unconstrained tensor} of every global (non-local) param in the store, sorted by name."""
    store = pyro.get_param_store()
    return dict(sorted(((n, p) for n, p in store.named_parameters() if not is_local(n)),
                       key=lambda item: item[0]))


def broadcast_params(src=0):
    """Copy rank ``src``'s global params into every rank's, in place (modules stay tied)."""
    params = global_params()
    if not params:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
        dist.broadcast(flat, src=src)
        for p, value in zip(params.values(), _unflatten(flat, params.values())):
            p.copy_(value)


def check_params_equal(atol=0.0):
    """Raise RuntimeError when the global params differ across ranks by more than ``atol``."""
    params = global_params()
    layouts = [None] * world_size()
    dist.all_gather_object(layouts, [(n, tuple(p.shape)) for n, p in params.items()])
    if any(layout != layouts[0] for layout in layouts):
        raise RuntimeError(f"ranks hold different global params: {layouts}")
    if not params:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    spread = (high - low).abs().max().item()
    if spread > atol:
        raise RuntimeError(f"global params differ across ranks by up to {spread:.3g}")


def _unflatten(flat, like):
    out, start = [], 0
    for p in like:
        out.append(flat[start:start + p.numel()].view_as(p))
        start += p.numel()
    return out


class GradAllReduce:
    """``svi_step(..., grad_hook=GradAllReduce())``: average global gradients over ranks.

    Every global param in the store takes part (with zero gradient when this rank's trace did not
    touch it, or when its batch was empty), so every rank steps the same params with the same
    gradient and Adam states stay equal. One flat all-reduce per step, like DDP's buckets. Set
    ``weight`` (this rank's share B_r / Σ B_r) before each step; the default 1 / P is right when
    every rank's batch has B rows. Local params (``is_local``) are never communicated; their
    gradients are multiplied by the same weight, so that with N / B_r scaling they equal the
    gradient of the global batch scaled by N / Σ B_r.
    """

    def __init__(self, weight=None):
        self.weight = weight

    def scale_local(self, params):
        """The hook for steps on local φ only (``fit(inner_steps=S)``): no communication."""
        weight = 1.0 / world_size() if self.weight is None else self.weight
        for name, p in params.items():
            if is_local(name) and p.grad is not None:
                p.grad = p.grad * weight

    def __call__(self, params):
        weight = 1.0 / world_size() if self.weight is None else self.weight
        self.scale_local(params)
        everything = global_params()
        grads = []
        for name, p in everything.items():
            params.setdefault(name, p)
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            grads.append(grad.to_dense() if grad.is_sparse else grad)
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]) * weight
        dist.all_reduce(flat)
        for p, g in zip(everything.values(), _unflatten(flat, everything.values())):
            p.grad = g.clone()


def allreduce_grads(params, weight=None):
    """Average (weighted by ``weight``, default 1 / P) the gradients of global params over ranks."""
    GradAllReduce(weight)(params)


def empty_step(optim, grad_hook):
    """A rank's step with no rows: join the all-reduce with zero gradients and step the global
    params like every other rank. Returns 0.0 (the loss of no rows)."""
    params = {}
    grad_hook(params)
    optim(params.values())
    pyro.infer.util.zero_grads(params.values())
    return 0.0


def allreduce_mean(value, weight, device="cpu"):
    """Σ_r weight_r · value_r over ranks (a float): the global batch's loss from per-rank losses."""
    total = torch.tensor([value * weight], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item()


def all_true(flag, device="cpu"):
    """Whether ``flag`` holds on every rank (so that all ranks raise together, never one alone)."""
    value = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(value)
    return value.item() == 0.0


def barrier():
    if active():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# checkpoints of local shards


_ROWS = "__rows_of_local_table__"


def _rows_of(value, rows, num_data):
    """``value`` with every tensor [N, ...] cut to this rank's rows (tagged, for ``_scatter_rows``)."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == num_data:
        return {_ROWS: value[rows.to(value.device)]}
    if isinstance(value, dict):
        return {k: _rows_of(v, rows, num_data) for k, v in value.items()}
    return value


def _scatter_rows(value, rows, num_data, device):
    """Inverse of ``_rows_of`` for optimiser state: rows this rank never touched are zero."""
    if isinstance(value, dict) and set(value) == {_ROWS}:
        part = value[_ROWS].to(device)
        full = part.new_zeros((num_data, *part.shape[1:]))
        full[rows.to(device)] = part
        return full
    if isinstance(value, dict):
        return {k: _scatter_rows(v, rows, num_data, device) for k, v in value.items()}
    return value


def save_shard(path, optim, progress, rows, rng):
    """Write this rank's rows of every local param (and of its optimiser state) and its RNG state."""
    store = pyro.get_param_store()
    num_data = progress["num_data"]
    optim_state = optim.get_state()
    state = {
        "rank": rank(), "world_size": world_size(), "progress": progress, "rng": rng,
        "rows": rows.cpu(),
        "params": {n: _rows_of(p.detach(), rows, num_data)
                   for n, p in store.named_parameters() if is_local(n)},
        "optim": {n: _rows_of(v, rows, num_data) for n, v in optim_state.items() if is_local(n)},
    }
    atomic.torch_save(state, path)


def load_shard(path, num_data, device):
    """Read this rank's shard file into the param store (its rows only); return its progress,
    RNG state and the local optimiser state (full tables, zero outside this rank's rows)."""
    if not path.exists():
        raise FileNotFoundError(f"no local shard {path} for rank {rank()}: resume needs the "
                                "files of every rank of the run that wrote the checkpoint")
    try:  # weights_only: a received run's files are data, never code
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # EOFError, RuntimeError (zip), UnpicklingError, ...
        raise unreadable(path, error, "a local shard written by ppl-lvm") from error
    if state["world_size"] != world_size() or state["rank"] != rank():
        raise ValueError(f"{path} belongs to rank {state['rank']} of {state['world_size']}, "
                         f"not rank {rank()} of {world_size()}")
    rows = state["rows"].to(device)
    store = pyro.get_param_store()
    with torch.no_grad():
        for name, value in state["params"].items():
            if name not in store:
                raise KeyError(f"local param {name!r} of {path} does not exist after running the "
                               "guide once; is it the same model/guide?")
            target = store._params[name]
            if isinstance(value, dict):
                target[rows] = value[_ROWS].to(target.device)
            else:  # a local param without one row per datapoint: this rank's whole copy
                target.copy_(value)
    optim_state = {n: _scatter_rows(v, rows, num_data, device) for n, v in state["optim"].items()}
    return {"progress": state["progress"], "rng": state["rng"], "optim": optim_state}


# ----------------------------------------------------------------------------------------------
# gathering per-datapoint results


def gather_rows(values, idx, num_rows):
    """Assemble per-row results computed on different ranks, in the original row order.

    values: [n_r, ...] this rank's results for rows ``idx`` [n_r] (disjoint across ranks, covering
    0..num_rows-1 together); returns [num_rows, ...] on every rank, on ``values``' device.
    """
    idx = idx.to(values.device)
    if not active():
        out = values.new_empty((num_rows, *values.shape[1:]))
        out[idx] = values
        return out
    sizes = [None] * world_size()
    dist.all_gather_object(sizes, len(idx))
    largest = max(sizes)
    padded = values.new_zeros((largest, *values.shape[1:]))
    padded[:len(idx)] = values
    padded_idx = idx.new_full((largest,), -1)
    padded_idx[:len(idx)] = idx
    all_values = [torch.empty_like(padded) for _ in sizes]
    all_idx = [torch.empty_like(padded_idx) for _ in sizes]
    dist.all_gather(all_values, padded)
    dist.all_gather(all_idx, padded_idx)
    out = values.new_empty((num_rows, *values.shape[1:]))
    for size, part, rows in zip(sizes, all_values, all_idx):
        out[rows[:size]] = part[:size]
    return out


def gather_local_params(num_data):
    """Full local tables [N, ...] on every rank, each row taken from the rank that owns it.

    For after training (saving, plotting): training itself never communicates φ. Returns
    {name: tensor} of the constrained values of every local param whose first dim is N.
    """
    store = pyro.get_param_store()
    rows = owned_rows(num_data, rank(), world_size()) if active() else torch.arange(num_data)
    tables = {}
    for name in sorted(store.keys()):
        if not is_local(name):
            continue
        value = store.get_param(name).detach()
        if value.dim() == 0 or value.shape[0] != num_data:
            continue
        tables[name] = gather_rows(value[rows.to(value.device)], rows, num_data)
    return tables


def log_marginal(model, guide, x, *, idx=None, seed=None, **kwargs):
    """``ppl_lvm.estimators.log_marginal`` with the rows split across ranks: [N] on every rank.

    Each rank estimates log p(x_n) for one contiguous block of rows (passing their indices as
    ``idx`` so per-datapoint guides find their φ_n) and the results are gathered in the original
    order. Keyword tensors whose first dim is N (masks, labels) are split with x. Without a
    process group this is the plain ``log_marginal``. With a seed, each rank draws from its own
    stream (seed, rank), so the numbers are a valid estimate but not bit-identical to one process.
    """
    from ppl_lvm.estimators import SEED_BLOCK_ROWS, log_marginal as estimate

    num_rows = x.shape[0]
    idx = torch.arange(num_rows, device=x.device) if idx is None else idx.to(x.device)
    if not active():
        return estimate(model, guide, x, idx=idx, seed=seed, **kwargs)
    # blocks of SEED_BLOCK_ROWS rows so a seeded rank never splits one of the estimator's blocks
    blocks = torch.tensor_split(torch.arange(-(-num_rows // SEED_BLOCK_ROWS)), world_size())[rank()]
    start = min(int(blocks[0]) * SEED_BLOCK_ROWS, num_rows) if len(blocks) else num_rows
    stop = min((int(blocks[-1]) + 1) * SEED_BLOCK_ROWS, num_rows) if len(blocks) else num_rows
    rows = torch.arange(start, stop, device=x.device)
    sliced = {key: value[start:stop] if torch.is_tensor(value) and value.dim() > 0
              and value.shape[0] == num_rows else value for key, value in kwargs.items()}
    if len(rows):
        rank_seed = None if seed is None else seed * 1_000_003 + rank()
        values = estimate(model, guide, x[start:stop], idx=idx[start:stop], seed=rank_seed, **sliced)
    else:
        values = x.new_zeros(0)
    return gather_rows(values.to(x.device), rows, num_rows)


# ----------------------------------------------------------------------------------------------
# strategies: how fit spreads its work over one process or several


class SingleProcess:
    """How ``fit`` spreads its work: on one process every hook of the strategy does nothing."""

    active, rank, world = False, 0, 1
    grad_hook = local_hook = None
    all_ranks = None  # DivergenceGuard.check_state's vote across ranks: none on one process

    def __init__(self, device):
        self.device = device

    def batches(self, num_data, epoch, seed, batch_size):
        return rank_batches(num_data, epoch, seed, 0, 1, batch_size)

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

    def save_checkpoint(self, path, shard, optim, position, result):
        save_checkpoint(path, optim, position, result)

    def load_shard(self, shard, num_data, device):
        return load_shard(shard, num_data, device)


class DataParallel(SingleProcess):
    """Data-parallel SVI over torch.distributed's ranks (this module's docstring)."""

    active = True

    def __init__(self, device):
        super().__init__(device)
        self.rank, self.world = rank(), world_size()
        self.grad_hook = GradAllReduce()
        self.local_hook = self.grad_hook.scale_local
        self.all_ranks = self.all_true

    def batches(self, num_data, epoch, seed, batch_size):
        return rank_batches(num_data, epoch, seed, self.rank, self.world, batch_size)

    def owned(self, num_data):
        return owned_rows(num_data, self.rank, self.world).to(self.device)

    def set_weight(self, weight):
        self.grad_hook.weight = weight

    def mean(self, value, weight):
        return allreduce_mean(value, weight, self.device)

    def all_true(self, flag):
        return all_true(flag, self.device)

    def barrier(self):
        barrier()

    def start(self, register):
        # every rank creates every param, then takes rank 0's values
        register()
        broadcast_params()

    def save_checkpoint(self, path, shard, optim, position, result):
        """Each rank writes its shard of local rows; rank 0 then writes the global params."""
        save_shard(shard, optim, position, self.owned(position["num_data"]), _rng_state())
        barrier()
        if self.rank == 0:
            save_checkpoint(path, optim, position, result, keep=lambda name: not is_local(name))
        barrier()


def strategy_for(distributed, device):
    """fit's strategy for ``distributed`` (None: data-parallel when a group of several ranks runs;
    True: also join torchrun's group; False: one process) and the device it runs on."""
    if distributed:
        init(device=device)
    if active() if distributed in (None, True) else False:
        if device.type == "cuda" and device.index is None:
            device = local_device()
        return DataParallel(device), device
    return SingleProcess(device), device
