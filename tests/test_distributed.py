"""Data-parallel SVI on 2 gloo processes (spawned by the test) against one process.

The spawned ranks run every scenario in one session (starting processes is the slow part) and
write what they saw to files; the tests compare those with single-process runs done here.
"""
import datetime
import os
import re
import socket

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed
import torch.multiprocessing
from torch import nn

from ppl_lvm import distributed as ddp
from ppl_lvm.guides import LocalGuide
from ppl_lvm.models.vae import VAE
from ppl_lvm.plate import data_plate
from ppl_lvm.train import bind_rows, fit, svi_step

WORLD = 2
DATA_DIM, Z_DIM = 5, 2
SEED = 4


class Tiny(nn.Module):
    """x | z ~ N(W z + b, σ²), z ~ N(0, I); guide z = Delta(A x + c + φ_i): a global decoder θ,
    a global noise σ, an amortized encoder λ and a local table φ [N, Z] (named local$$$...).
    The Delta guide makes the ELBO deterministic, so steps can be compared exactly."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.decoder = nn.Linear(Z_DIM, DATA_DIM)
        self.encoder = nn.Linear(DATA_DIM, Z_DIM)

    def model(self, x, idx=None, num_data=None):
        pyro.module("decoder", self.decoder)
        noise = pyro.param("noise", torch.ones(()), constraint=dist.constraints.positive)
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), noise).to_event(1), obs=x)

    def guide(self, x, idx=None, num_data=None):
        pyro.module("encoder", self.encoder)
        num_rows = len(x) if num_data is None else num_data
        idx = torch.arange(len(x)) if idx is None else idx
        table = pyro.param("local$$$z_loc", lambda: initial_table(num_rows))
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.Delta(self.encoder(x) + table[idx]).to_event(1))


def initial_table(num_rows):
    return 0.1 * torch.randn(num_rows, Z_DIM, generator=torch.Generator().manual_seed(11))


def gaussian_data(num_data, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_data, DATA_DIM, generator=gen) + torch.arange(DATA_DIM)


def binary_data(num_data=48, data_dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(num_data, data_dim, generator=gen) < torch.linspace(0.1, 0.9, data_dim)).float()


def snapshot():
    """Every param of the store, constrained, detached, on the CPU."""
    store = pyro.get_param_store()
    return {name: store.get_param(name).detach().cpu().clone() for name in store.keys()}


def sgd():
    return pyro.optim.SGD({"lr": 2e-3})


class LinearGaussian:
    """z ~ N(0, 1), x | z ~ N(w z + b, σ² I), with the exact posterior as guide: every importance
    weight equals p(x), so any estimator returns the closed-form log p(x) (up to rounding)."""

    def __init__(self):
        self.w = torch.tensor([1.0, -0.5, 2.0])
        self.b = torch.tensor([0.2, 0.0, -1.0])
        self.sigma = 0.7

    def model(self, x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x)), 1.0))
            pyro.sample("x", dist.Normal(z[..., None] * self.w + self.b, self.sigma).to_event(1), obs=x)

    def guide(self, x):
        precision = 1 + (self.w @ self.w) / self.sigma ** 2
        loc = ((x - self.b) @ self.w / self.sigma ** 2) / precision
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, precision ** -0.5))

    def log_px(self, x):
        cov = self.sigma ** 2 * torch.eye(3) + torch.outer(self.w, self.w)
        return dist.MultivariateNormal(self.b, cov).log_prob(x)


# ----------------------------------------------------------------------------------------------
# what the ranks run


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_scenarios(rank, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _scenarios(rank, out_dir):
    seen = {}
    # one step: 2 ranks x B = 8 rows against one process with 16 rows (all the data)
    tiny = Tiny()
    fit(tiny.model, tiny.guide, gaussian_data(16), epochs=1, batch_size=8, optim=sgd(),
        seed=SEED, progress=False, distributed=True)
    seen["one_step"] = snapshot()

    # several steps, uneven shards (17 and 16 rows: the last step of rank 1 is empty)
    tiny = Tiny()
    result = fit(tiny.model, tiny.guide, gaussian_data(33), epochs=2, batch_size=8, optim=sgd(),
                 seed=SEED, progress=False)
    seen["replay"] = snapshot()
    seen["replay_losses"] = result.losses

    # the same run on the compiled path (each step's loss and gradients replayed from a graph;
    # rank 1's empty last step takes its own shape)
    tiny = Tiny()
    result = fit(tiny.model, tiny.guide, gaussian_data(33), epochs=2, batch_size=8, optim=sgd(),
                 seed=SEED, progress=False, compile=True, validate=False)
    seen["replay_compiled"] = snapshot()
    seen["replay_compiled_losses"] = result.losses
    seen["compiled_summary"] = result.compiled

    # a VAE with Adam: global params must stay identical on both ranks
    torch.manual_seed(rank)  # different inits on purpose: fit must broadcast rank 0's
    vae = VAE(8, z_dim=2, hidden_dim=8)
    fit(vae.model, vae.guide, binary_data(), epochs=2, batch_size=6, lr=1e-2, seed=SEED,
        progress=False, eval_data=binary_data(10, seed=1))
    seen["vae"] = snapshot()
    ddp.check_params_equal()

    # checkpoint mid-run, resume in a fresh model: the same as running straight through
    kwargs = dict(batch_size=4, lr=5e-2, seed=SEED, progress=False)
    tiny = Tiny()
    seen["straight"] = fit(tiny.model, tiny.guide, gaussian_data(21), epochs=3, **kwargs).losses
    seen["straight_params"] = snapshot()
    checkpoints = os.path.join(out_dir, "checkpoints")
    tiny = Tiny()
    fit(tiny.model, tiny.guide, gaussian_data(21), epochs=2, checkpoint_dir=checkpoints,
        checkpoint_every=2, **kwargs)
    tiny = Tiny(seed=5)
    seen["resumed"] = fit(tiny.model, tiny.guide, gaussian_data(21), epochs=3,
                          checkpoint_dir=checkpoints, resume=True, **kwargs).losses
    seen["resumed_params"] = snapshot()
    seen["gathered"] = ddp.gather_local_params(21)

    # a LocalGuide (sparse φ rows, lazy Adam) with inner steps, checkpointed and resumed
    x = binary_data(30)
    kwargs = dict(batch_size=4, seed=SEED, progress=False, inner_steps=2, lr=1e-2)
    torch.manual_seed(0)
    vae = VAE(8, z_dim=2, hidden_dim=8)
    local = LocalGuide(30, {"z": 2})
    straight = fit(vae.model, local, x, epochs=2, **kwargs)
    seen["local_straight"], seen["local_params"] = straight.losses, snapshot()
    seen["local_gains"] = straight.inner_gains
    checkpoints = os.path.join(out_dir, "local_checkpoints")
    torch.manual_seed(0)
    vae = VAE(8, z_dim=2, hidden_dim=8)
    fit(vae.model, local, x, epochs=1, checkpoint_dir=checkpoints, checkpoint_every=3, **kwargs)
    seen["local_resumed"] = fit(vae.model, local, x, epochs=2, checkpoint_dir=checkpoints,
                                resume=True, **kwargs).losses
    seen["local_resumed_params"] = snapshot()

    # distributed evaluation: rows split over ranks, gathered in the original order
    try:
        import ppl_lvm.estimators  # noqa: F401
    except ImportError:
        return seen
    lg = LinearGaussian()
    x = gaussian_data(70, seed=3)[:, :3]
    seen["log_px"] = ddp.log_marginal(lg.model, lg.guide, x, num_samples=4, seed=0)
    return seen


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    torch.multiprocessing.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    seen = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    return seen, out_dir


# ----------------------------------------------------------------------------------------------
# tests


def assert_params_close(left, right, names, atol=1e-5):
    for name in names:
        torch.testing.assert_close(left[name], right[name], atol=atol, rtol=1e-5, msg=name)


def test_shards_are_disjoint_and_reshuffled():
    num_data, batch = 23, 4
    for epoch in range(3):
        shards = [ddp.shard_indices(num_data, epoch, SEED, r, 3) for r in range(3)]
        assert sorted(torch.cat(shards).tolist()) == list(range(num_data))
        for r, shard in enumerate(shards):  # fixed owners, reshuffled order
            assert set(shard.tolist()) == set(ddp.owned_rows(num_data, r, 3).tolist())
        batches = ddp.global_batches(num_data, epoch, SEED, 3, batch)
        assert sorted(torch.cat(batches).tolist()) == list(range(num_data))
    assert not torch.equal(ddp.shard_indices(num_data, 0, SEED, 1, 3),
                           ddp.shard_indices(num_data, 1, SEED, 1, 3))
    # one rank: the permutation a plain fit uses
    assert torch.equal(ddp.shard_indices(num_data, 2, SEED, 0, 1), ddp.epoch_permutation(23, 2, SEED))
    weights = [ddp.rank_batches(num_data, 0, SEED, r, 3, batch)[-1][1] for r in range(3)]
    assert sum(weights) == pytest.approx(1.0)


def test_global_params_identical_on_both_ranks(ranks):
    (first, second), _ = ranks
    for key in ("one_step", "replay", "vae", "resumed_params", "local_params"):
        globals_ = [n for n in first[key] if not ddp.is_local(n)]
        assert globals_
        for name in globals_:
            assert torch.equal(first[key][name], second[key][name]), (key, name)


def test_two_ranks_times_b_equal_one_rank_times_2b(ranks):
    (first, second), _ = ranks
    tiny = Tiny()
    fit(tiny.model, tiny.guide, gaussian_data(16), epochs=1, batch_size=16, optim=sgd(),
        seed=SEED, progress=False)
    single = snapshot()
    assert_params_close(first["one_step"], single, [n for n in single if not ddp.is_local(n)])
    table = single["local$$$z_loc"]
    assert not torch.allclose(table, initial_table(16))  # the step moved φ
    torch.testing.assert_close(first["one_step"]["local$$$z_loc"][:8], table[:8])
    torch.testing.assert_close(second["one_step"]["local$$$z_loc"][8:], table[8:])


def test_several_uneven_steps_equal_one_process_on_global_batches(ranks):
    (first, second), _ = ranks
    x = gaussian_data(33)
    tiny, optim = Tiny(), sgd()
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    losses = []
    for epoch in range(2):
        for idx in ddp.global_batches(33, epoch, SEED, WORLD, 8):
            value = svi_step(bind_rows(tiny.model, idx, 33), bind_rows(tiny.guide, idx, 33),
                             optim, pyro.infer.Trace_ELBO(), (x[idx],))
            losses.append(value / 33)
    single = snapshot()
    assert len(first["replay_losses"]) == len(losses) == 6
    assert first["replay_losses"] == pytest.approx(losses, rel=1e-5)
    assert_params_close(first["replay"], single, [n for n in single if not ddp.is_local(n)])
    owned = [ddp.owned_rows(33, r, WORLD) for r in range(WORLD)]
    for seen, rows in zip((first, second), owned):
        torch.testing.assert_close(seen["replay"]["local$$$z_loc"][rows], single["local$$$z_loc"][rows])


def test_the_compiled_path_under_torchrun_equals_eager(ranks):
    """fit(compile=True) on 2 ranks: the graph replays the same per-rank loss and gradients as
    eager Pyro, and the all-reduce and the φ rows follow, so every loss and parameter equals the
    eager 2-rank run's (which equals one process on the global batches, test above)."""
    for seen in ranks[0]:
        assert seen["replay_compiled_losses"] == pytest.approx(seen["replay_losses"], rel=1e-5)
        for name, value in seen["replay"].items():
            torch.testing.assert_close(seen["replay_compiled"][name], value, atol=1e-5,
                                       rtol=1e-5, msg=name)
        # rank 0 takes 8, 8, 1 rows an epoch, rank 1 8, 8 and an empty step (no loss): each
        # shape's first step is recorded (checked against eager), the others replay a graph
        match = re.search(r"(\d+) steps on the graph, (\d+) eager", seen["compiled_summary"])
        assert match and int(match.group(1)) >= 3, seen["compiled_summary"]


def test_local_rows_never_change_on_the_other_rank(ranks):
    (first, second), _ = ranks
    init = initial_table(33)
    for seen, r in ((first, 0), (second, 1)):
        table = seen["replay"]["local$$$z_loc"]
        mine, theirs = ddp.owned_rows(33, r, WORLD), ddp.owned_rows(33, 1 - r, WORLD)
        assert torch.equal(table[theirs], init[theirs])
        assert (table[mine] != init[mine]).all(-1).all()


def test_local_guide_with_inner_steps_and_sparse_adam(ranks):
    (first, second), _ = ranks
    for seen, r in ((first, 0), (second, 1)):
        assert seen["local_resumed"] == pytest.approx(seen["local_straight"], rel=1e-6, abs=1e-6)
        for name, value in seen["local_params"].items():
            torch.testing.assert_close(seen["local_resumed_params"][name], value, msg=name)
        table = seen["local_params"]["local$$$phi"]
        mine, theirs = ddp.owned_rows(30, r, WORLD), ddp.owned_rows(30, 1 - r, WORLD)
        assert torch.equal(table[theirs], torch.zeros_like(table[theirs]))  # the initial φ
        assert (table[mine] != 0).any(-1).all()
    assert first["local_gains"] == second["local_gains"]
    assert len(first["local_gains"]) == 2 * 4  # 15 rows a rank, B = 4: 4 steps an epoch


def test_resume_continues_exactly_and_needs_the_same_world_size(ranks):
    (first, second), out_dir = ranks
    for seen in (first, second):
        assert seen["resumed"] == pytest.approx(seen["straight"], rel=1e-6, abs=1e-6)
        for name, value in seen["straight_params"].items():
            torch.testing.assert_close(seen["resumed_params"][name], value, msg=name)
    checkpoints = os.path.join(out_dir, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["checkpoint.pt", "local-rank0-of-2.pt",
                                               "local-rank1-of-2.pt"]
    saved = torch.load(os.path.join(checkpoints, "checkpoint.pt"), weights_only=False)
    assert not any(ddp.is_local(n) for n in saved["params"]["params"])  # φ only in the shards
    shard = torch.load(os.path.join(checkpoints, "local-rank1-of-2.pt"), weights_only=False)
    assert torch.equal(shard["rows"], ddp.owned_rows(21, 1, WORLD))
    tiny = Tiny()
    with pytest.raises(ValueError, match="written by 2 process"):
        fit(tiny.model, tiny.guide, gaussian_data(21), epochs=3, batch_size=4, seed=SEED,
            progress=False, checkpoint_dir=checkpoints, resume=True)
    # the gathered tables take each row from its owner
    gathered = first["gathered"]["local$$$z_loc"]
    torch.testing.assert_close(gathered, second["gathered"]["local$$$z_loc"])
    torch.testing.assert_close(gathered[:11], first["resumed_params"]["local$$$z_loc"][:11])
    torch.testing.assert_close(gathered[11:], second["resumed_params"]["local$$$z_loc"][11:])


def test_distributed_evaluation_equals_single_process(ranks):
    estimators = pytest.importorskip("ppl_lvm.estimators")
    (first, second), _ = ranks
    lg = LinearGaussian()
    x = gaussian_data(70, seed=3)[:, :3]
    single = estimators.log_marginal(lg.model, lg.guide, x, num_samples=4, seed=0)
    torch.testing.assert_close(first["log_px"], single)
    torch.testing.assert_close(second["log_px"], single)
    torch.testing.assert_close(single, lg.log_px(x), atol=1e-4, rtol=1e-5)


def test_distributed_true_without_torchrun_is_a_clear_error(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    tiny = Tiny()
    with pytest.raises(RuntimeError, match="torchrun"):
        fit(tiny.model, tiny.guide, gaussian_data(8), epochs=1, progress=False, distributed=True)


@pytest.mark.slow
def test_cli_train_and_evaluate_under_torchrun(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
              f"--master_port={_free_port()}", "-m", "ppl_lvm"]
    out = tmp_path / "run"
    train = subprocess.run(launch + ["train", "vae", "--data", "digits", "--epochs", "1",
                                     "--hidden-dim", "16", "--out", str(out), "--quiet"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    assert train.stdout.count("held-out ELBO") == 1  # rank 0 alone prints
    assert (out / "local-rank1-of-2.pt").exists() and (out / "model.pt").exists()
    resumed = subprocess.run([sys.executable, "-m", "ppl_lvm", "train", "vae", "--data", "digits",
                              "--epochs", "2", "--hidden-dim", "16", "--out", str(out), "--resume",
                              "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 2 and "nproc_per_node=2" in resumed.stderr
    evaluate = subprocess.run(launch + ["evaluate", str(out), "-K", "2"], env=env,
                              capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr
    assert evaluate.stdout.count("held-out log p(x)") == 1
