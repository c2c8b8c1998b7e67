"""Fault injection: a run folder is never lost or left half-written, and nothing fails silently.

A CLI training subprocess is SIGKILLed at chosen points (inside each atomic write of the final save)
and at random times; the folder must always hold the old run or a consistent new one, and
``--resume`` must then end bit for bit where an uninterrupted run ends. A full disk (RLIMIT_FSIZE),
two runs into one folder, a read-only folder and damaged files each end in one clear line.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_lvm import atomic
from ppl_lvm.checkpoint import (CheckpointError, DivergenceError, DivergenceGuard, _rng_state,
                                _set_rng_state, load_checkpoint)
from ppl_lvm.cli import main
from ppl_lvm.guides import LocalGuide
from ppl_lvm.models.vae import VAE
from ppl_lvm.runs import LOCK_NAME, load_run
from ppl_lvm.train import adam, fit

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "digits", "--z-dim", "2", "--hidden-dim", "16", "--batch-size", "256",
        "--eval-every", "1", "--quiet"]
# the atomic writes of `train --resume --epochs 3` on a finished 2-epoch run, in order
WRITES = ["checkpoint.pt", "model.pt", "config.json", "metrics.json", "reconstructions.png",
          "samples.png", "training_curve.png"]
PHASES = ["start", "temp-written", "replaced"]

# runs `ppl-lvm` and SIGKILLs itself at the KILL_AT-th atomic write (at its start, with the
# temporary file complete but not yet renamed, or just after the rename), or sets RLIMIT_FSIZE
DRIVER = r'''
import os, signal, sys
from ppl_lvm import atomic
from ppl_lvm.cli import main

kill_at, phase = int(os.environ.get("KILL_AT", "0")), os.environ.get("KILL_PHASE", "start")
calls, inside = [0], [False]
write, replace = atomic.atomic_write, os.replace

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def counted_write(path, data):
    calls[0] += 1
    inside[0] = calls[0] == kill_at
    if inside[0] and phase == "start":
        die()
    write(path, data)
    if inside[0] and phase == "replaced":
        die()

def replace_then(src, dst):
    if inside[0] and phase == "temp-written":
        die()
    return replace(src, dst)

atomic.atomic_write, atomic.os.replace = counted_write, replace_then
if os.environ.get("FSIZE_LIMIT"):
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that a write past the limit fails, EFBIG
    limit = int(os.environ["FSIZE_LIMIT"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(sys.argv[1:]))
'''


def train_args(out, epochs, *extra):
    return ["train", "vae", "--out", str(out), *TINY, "--epochs", str(epochs), *extra]


def launch(tmp_path, argv, wait=True, **env):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    environment = {**os.environ, "PYTHONPATH": str(REPO), **{k: str(v) for k, v in env.items()}}
    process = subprocess.Popen([sys.executable, str(driver), *argv], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 2-epoch run (the old state) and, from it, an uninterrupted resume to 3 epochs."""
    root = tmp_path_factory.mktemp("runs")
    assert main(train_args(root / "base", 2)) == 0
    shutil.copytree(root / "base", root / "reference")
    assert main(train_args(root / "reference", 3, "--resume")) == 0
    # ... which is where a run of 3 epochs from scratch ends, bit for bit
    assert main(train_args(root / "scratch", 3)) == 0
    assert_same_run(root / "scratch", root / "reference")
    return root / "base", root / "reference"


def weights(folder):
    return torch.load(folder / "model.pt", weights_only=True)["state_dict"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_run(folder, reference):
    assert same_weights(weights(folder), weights(reference))
    got, want = (json.loads((f / "metrics.json").read_text()) for f in (folder, reference))
    for key in ("heldout_elbo", "epoch_losses", "eval_elbos", "steps", "epochs"):
        assert got[key] == want[key], key


def assert_old_or_new(folder, base, reference):
    """What every command sees is the old run or the whole new one, and ``--resume`` then
    finishes it bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_run says when it repairs the JSON copies
        module, config = load_run(folder)
    state = module.state_dict()
    if same_weights(state, weights(base)):
        assert config["train"]["epochs"] == 2
    else:
        assert same_weights(state, weights(reference)) and config["train"]["epochs"] == 3
    assert json.loads((folder / "config.json").read_text()) == config  # repaired if it lagged
    assert load_checkpoint(folder / "checkpoint.pt", "cpu")["progress"]["epoch"] in (2, 3)
    assert main(train_args(folder, 3, "--resume")) == 0
    assert_same_run(folder, reference)
    assert not atomic.temp_files(folder) and not (folder / LOCK_NAME).exists()


def kill_and_check(tmp_path, runs, name, kill_at, phase):
    base, reference = runs
    folder = tmp_path / name
    shutil.copytree(base, folder)
    code, _, err = launch(tmp_path, train_args(folder, 3, "--resume"), KILL_AT=kill_at,
                          KILL_PHASE=phase)
    assert code == -signal.SIGKILL, err
    assert_old_or_new(folder, base, reference)


def test_kill_inside_the_final_save_then_resume_is_bit_exact(tmp_path, runs):
    # the run dies just after renaming the new model.pt into place, before config.json and
    # metrics.json: model.pt carries its config, so the run read back is the whole new one
    kill_and_check(tmp_path, runs, "killed", WRITES.index("model.pt") + 1, "replaced")


@pytest.mark.slow
@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("phase", PHASES)
def test_kill_at_every_write_then_resume_is_bit_exact(tmp_path, runs, write, phase):
    kill_and_check(tmp_path, runs, "killed", WRITES.index(write) + 1, phase)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_kill_at_a_random_time_then_resume_is_bit_exact(tmp_path, runs, seed):
    base, reference = runs
    folder = tmp_path / "killed"
    shutil.copytree(base, folder)
    # killed anywhere from start-up to the end of its final save
    process = launch(tmp_path, train_args(folder, 3, "--resume"), wait=False)
    time.sleep(random.Random(seed).uniform(0.5, 10.0))
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert_old_or_new(folder, base, reference)


@pytest.mark.parametrize("epochs, limit, failed", [
    (3, 4096, "checkpoint.pt"),  # the first write of the resumed run: the checkpoint (50 kB)
    # nothing left to train: model.pt (13 kB) and the first PNG fit, samples.png (20 kB) does not
    pytest.param(2, 16000, "samples.png", marks=pytest.mark.slow),
])
def test_full_disk_keeps_the_previous_files(tmp_path, runs, epochs, limit, failed):
    base, _ = runs
    folder = tmp_path / "full"
    shutil.copytree(base, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, _, err = launch(tmp_path, train_args(folder, epochs, "--resume"), FSIZE_LIMIT=limit)
    assert code == 2, err
    line = err.strip()
    assert len(line.splitlines()) == 1 and line.startswith("ppl-lvm: error:")
    assert f"{folder / failed}: File too large; the previous version is kept" in line
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after.keys() == before.keys()  # no temp file, no lock
    assert after[failed] == before[failed]
    if failed == "checkpoint.pt":
        assert after == before


def test_a_second_run_into_a_busy_folder_names_the_first(tmp_path, capsys):
    folder = tmp_path / "busy"
    first = launch(tmp_path, train_args(folder, 100000), wait=False)
    try:
        deadline = time.monotonic() + 120
        while not (folder / LOCK_NAME).exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        assert main(train_args(folder, 1)) == 2
        err = capsys.readouterr().err
        assert f"in use by another run (pid {first.pid}" in err and len(err.strip().splitlines()) == 1
    finally:
        first.kill()
        first.communicate()
    # the killed run's lock is stale: the next run takes it over
    assert (folder / LOCK_NAME).read_text().strip() == str(first.pid)
    assert main(train_args(folder, 1, "--overwrite")) == 0
    assert not (folder / LOCK_NAME).exists()


def test_a_trained_run_is_not_replaced_without_overwrite(tmp_path, runs, capsys):
    base, _ = runs
    folder = tmp_path / "run"
    shutil.copytree(base, folder)
    before = (folder / "model.pt").read_bytes()
    assert main(train_args(folder, 1)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and str(folder) in err
    assert (folder / "model.pt").read_bytes() == before
    (folder / "evaluate_iwae_K5.json").write_text("{}")  # the old run's, gone with it
    (folder / "mine.png").write_bytes(b"a user's own file")  # kept
    assert main(train_args(folder, 1, "--overwrite")) == 0
    assert json.loads((folder / "config.json").read_text())["train"]["epochs"] == 1
    assert not (folder / "evaluate_iwae_K5.json").exists()
    assert (folder / "mine.png").read_bytes() == b"a user's own file"


def test_a_read_only_folder_is_one_clear_line(tmp_path, runs, capsys):
    base, _ = runs
    folder = tmp_path / "read-only"
    shutil.copytree(base, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    root = os.geteuid() == 0
    # root ignores permission bits; an immutable folder stops root too
    if root and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root without chattr: cannot make a folder read-only")
    if not root:
        folder.chmod(0o555)
    try:
        assert main(train_args(folder, 3, "--resume")) == 2
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write into {folder}" in err and "read-only" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic.torch_save({"version": 1}, path)

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="could not write .*model.pt: No space left on device; the "
                                      "previous version is kept"):
        atomic.torch_save({"version": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# resume refuses what it cannot continue ----------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "1"], "already done 2 epochs; --epochs 1 would resume nothing: pass --epochs 2"),
    (["--epochs", "3", "--lr", "0.01"], "was started with other options (--lr 0.001 -> 0.01)"),
    (["--epochs", "3", "--test-fraction", "0.3"], "(--test-fraction 0.2 -> 0.3)"),
])
def test_resume_refuses_another_run(tmp_path, runs, capsys, extra, message):
    base, _ = runs
    folder = tmp_path / "run"
    shutil.copytree(base, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    argv = ["train", "vae", "--out", str(folder), *TINY, "--resume", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_resume_on_other_data_of_the_same_shape_is_refused(tmp_path):
    x = torch.bernoulli(torch.full((64, 16), 0.3), generator=torch.Generator().manual_seed(0))
    vae = VAE(16, z_dim=2, hidden_dim=8)
    fit(vae.model, vae.guide, x, epochs=1, batch_size=32, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="written for other data"):
        fit(vae.model, vae.guide, 1 - x, epochs=2, batch_size=32, progress=False,
            checkpoint_dir=tmp_path, resume=True)


DAMAGES = {
    "empty": lambda path: path.write_bytes(b""),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "text": lambda path: path.write_text("these are not the weights you are looking for\n"),
    "foreign": lambda path: torch.save({"weights": torch.zeros(3)}, path),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("name, command", [
    ("checkpoint.pt", ["train", "vae", "--out", "{run}", *TINY, "--epochs", "3", "--resume"]),
    ("model.pt", ["evaluate", "{run}", "-K", "2", "--n", "4"]),
])
def test_a_damaged_file_is_named_with_what_to_do(tmp_path, runs, capsys, name, command, damage):
    base, _ = runs
    folder = tmp_path / "run"
    shutil.copytree(base, folder)
    DAMAGES[damage](folder / name)
    assert main([a.format(run=folder) for a in command]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder / name) in err
    assert "--overwrite" in err
    assert "empty" in err if damage == "empty" else "truncated" in err


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign"])
def test_a_damaged_config_is_rewritten_from_model_pt_with_a_warning(tmp_path, runs, damage):
    base, _ = runs
    folder = tmp_path / "run"
    shutil.copytree(base, folder)
    config = folder / "config.json"
    good = config.read_text()
    {"empty": lambda: config.write_text(""), "truncated": lambda: config.write_text(good[:40]),
     "foreign": lambda: config.write_text("[1, 2]")}[damage]()
    with pytest.warns(UserWarning, match="config.json.*does not match .*model.pt"):
        module, loaded = load_run(folder)
    assert config.read_text() == json.dumps(loaded, indent=2) and json.loads(good) == loaded


def test_a_damaged_config_of_an_older_run_is_named(tmp_path, runs, capsys):
    # runs written before model.pt carried its config: config.json is all there is
    base, _ = runs
    folder = tmp_path / "run"
    shutil.copytree(base, folder)
    saved = torch.load(folder / "model.pt", weights_only=True)
    torch.save({"config": saved["config"], "state_dict": saved["state_dict"]}, folder / "model.pt")
    (folder / "config.json").write_text('{"model": "va')
    assert main(["evaluate", str(folder), "-K", "2", "--n", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{folder / 'config.json'} is not valid JSON" in err and "--overwrite" in err


# divergence --------------------------------------------------------------------------------


def tiny_vae_data():
    x = torch.bernoulli(torch.full((64, 16), 0.3), generator=torch.Generator().manual_seed(0))
    return VAE(16, z_dim=2, hidden_dim=8), x


def test_a_finite_blow_up_stops_the_run(tmp_path):
    vae, x = tiny_vae_data()
    with pytest.raises(DivergenceError, match="blew up .* at step 2 .*running median"):
        fit(vae.model, vae.guide, x, epochs=3, batch_size=16, lr=1e6, progress=False,
            checkpoint_dir=tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def sqrt_model(x):
    # d sqrt(|loc|) / d loc at loc = 0 is NaN: after the first step loc is NaN
    loc = pyro.param("loc", torch.zeros(1))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc.abs().sqrt(), 1.0), obs=x)


def empty_guide(x):
    pass


def test_nan_under_validation_is_the_step_message_not_a_tensor_dump(tmp_path):
    x = torch.randn(8)
    with pytest.raises(DivergenceError) as caught:
        fit(sqrt_model, empty_guide, x, epochs=1, batch_size=4, progress=False,
            checkpoint_dir=tmp_path, validate=True)
    message = str(caught.value)
    assert message.startswith("loss became nan at step 2 (after epoch 1, batch 1)")
    assert "no checkpoint had been written yet" in message and "stays at" not in message
    assert len(message.splitlines()) == 1


def test_nan_parameter_at_the_end_without_checkpoint_dir_raises():
    x = torch.randn(8)
    with pytest.raises(DivergenceError, match="a parameter became non-finite by step 1; no "
                                              "checkpoint_dir was given"):
        fit(sqrt_model, empty_guide, x, epochs=1, batch_size=8, progress=False, validate=False)


def test_non_finite_adam_state_is_not_a_good_checkpoint():
    vae, x = tiny_vae_data()
    optim = adam()
    fit(vae.model, vae.guide, x, epochs=1, batch_size=32, progress=False, optim=optim)
    optimizer = next(iter(optim._dense.values()))
    next(iter(optimizer.state.values()))["exp_avg_sq"][0] = float("inf")
    with pytest.raises(DivergenceError, match="optimiser's state .* non-finite by step 2"):
        DivergenceGuard().check_state(optim, 2)


# CUDA resume, reproduced on the CPU --------------------------------------------------------


def test_rng_state_survives_a_checkpoint_loaded_onto_another_device(tmp_path):
    # torch.load(map_location=device) moves every tensor; on CUDA torch.set_rng_state then
    # raised "RNG state must be a torch.ByteTensor". "meta" moves them too, without a GPU.
    vae, x = tiny_vae_data()
    fit(vae.model, vae.guide, x, epochs=1, batch_size=32, progress=False, checkpoint_dir=tmp_path)
    expected_state = load_checkpoint(tmp_path / "checkpoint.pt", "cpu")["rng"]
    _set_rng_state(expected_state)
    expected = torch.rand(5)
    torch.manual_seed(123)
    state = load_checkpoint(tmp_path / "checkpoint.pt", "meta")
    assert state["params"]["params"]["decoder$$$net.0.weight"].device.type == "meta"
    _set_rng_state(state["rng"])
    assert torch.equal(torch.rand(5), expected)
    assert isinstance(_rng_state()["pyro"]["torch"], bytes)


@pytest.mark.cuda
def test_cli_resume_on_cuda(tmp_path):
    folder = tmp_path / "run"
    assert main(train_args(folder, 1, "--device", "cuda")) == 0
    assert main(train_args(folder, 2, "--device", "cuda", "--resume")) == 0


def test_the_lock_names_its_holder_and_a_dead_one_is_taken_over(tmp_path):
    from ppl_lvm.runs import RunFolderError, RunLock

    with RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {os.getpid()}"):
            RunLock(tmp_path).__enter__()
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text("999999999\n")  # left by a process that died
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())


# trust: a received run folder is data, and its code runs only when trusted ---------------------


def test_every_torch_load_in_the_package_is_weights_only():
    """A pickle in a checkpoint, a shard or model.pt would run on load: every torch.load of the
    package passes weights_only=True (a literal, so this walk can see it)."""
    import ast

    found = []
    for path in sorted((REPO / "ppl_lvm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and getattr(node.func.value, "id", None) == "torch"):
                keywords = {k.arg: k.value for k in node.keywords}
                safe = isinstance(keywords.get("weights_only"), ast.Constant) and \
                    keywords["weights_only"].value is True
                found.append((f"{path.name}:{node.lineno}", safe))
    assert len(found) >= 3  # model.pt, checkpoint.pt, the per-rank shards
    assert [where for where, safe in found if not safe] == []


class Payload:
    """Pickled, it calls Path.touch on load: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_never_run(tmp_path, capsys):
    vae, x = tiny_vae_data()
    fit(vae.model, vae.guide, x, epochs=1, batch_size=32, progress=False, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    marker = tmp_path / "payload-ran"
    state["progress"]["note"] = Payload(marker)
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects .*never runs it"):
        fit(vae.model, vae.guide, x, epochs=2, batch_size=32, progress=False,
            checkpoint_dir=tmp_path, resume=True)
    assert not marker.exists()


def test_a_checkpoint_round_trips_every_constraint_and_rng(tmp_path):
    """Constraints and numpy's RNG are stored as plain values and come back equal."""
    import numpy as np
    from torch.distributions import constraints

    from ppl_lvm.checkpoint import constraint_from_plain, plain_constraint

    for constraint in [constraints.real, constraints.positive, constraints.greater_than(2.5),
                       constraints.interval(-1.0, 3.0), constraints.simplex,
                       constraints.independent(constraints.positive, 1),
                       constraints.lower_cholesky, constraints.positive_definite,
                       constraints.unit_interval]:
        back = constraint_from_plain(plain_constraint(constraint))
        assert type(back) is type(constraint) and vars(back) == vars(constraint) or (
            type(back) is type(constraint) and repr(back) == repr(constraint))
    with pytest.raises(ValueError, match="unknown constraint 'os.system'"):
        constraint_from_plain({"constraint": "os.system", "attrs": {}})
    np.random.seed(3)
    state = _rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    expected = np.random.rand(3)
    _set_rng_state(torch.load(path, weights_only=True))
    assert np.array_equal(np.random.rand(3), expected)


def positive_model(x):
    scale = pyro.param("scale", torch.ones(1), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(0.0, scale), obs=x)


def test_a_constrained_param_resumes_bit_exact(tmp_path):
    x = torch.randn(64) * 3
    whole = fit(positive_model, empty_guide, x, epochs=2, batch_size=16, lr=0.05, progress=False)
    scale = pyro.param("scale").detach().clone()
    fit(positive_model, empty_guide, x, epochs=1, batch_size=16, lr=0.05, progress=False,
        checkpoint_dir=tmp_path)
    resumed = fit(positive_model, empty_guide, x, epochs=2, batch_size=16, lr=0.05,
                  progress=False, checkpoint_dir=tmp_path, resume=True)
    assert resumed.losses == whole.losses and torch.equal(pyro.param("scale").detach(), scale)
    assert not torch.equal(scale, torch.ones(1))  # it did train


MODEL_FILE = '''
import pyro, pyro.distributions as dist, torch
from torch import nn


class Model(nn.Module):
    def __init__(self, data_dim):
        super().__init__()
        self.decoder = nn.Linear(2, data_dim)
        self.encoder = nn.Linear(data_dim, 2)
        self.projection = torch.rand(data_dim)  # drawn at build time, not a parameter

    def model(self, x):
        pyro.module("decoder", self)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            logits = self.decoder(z) + self.projection
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(self.encoder(x), 1.0).to_event(1))


def build(data_dim):
    return Model(data_dim)
'''


@pytest.fixture
def file_run(tmp_path):
    source = tmp_path / "model.py"
    source.write_text(MODEL_FILE)
    out = tmp_path / "run"
    assert main(["train", f"{source}:build", "--out", str(out), "--data", "digits", "--epochs",
                 "1", "--batch-size", "512", "--quiet", "--seed", "3"]) == 0
    return source, out


def test_a_run_from_elsewhere_runs_its_code_only_with_trust_code(file_run, tmp_path, capsys,
                                                                 monkeypatch):
    _, out = file_run
    evaluate = ["evaluate", str(out), "-K", "2", "--n", "4"]
    assert main(evaluate) == 0  # this user trained it here: trusted
    capsys.readouterr()
    monkeypatch.setenv("PPL_LVM_TRUST_FILE", str(tmp_path / "someone-else" / "trusted.txt"))
    for command in (evaluate, ["gaps", str(out), "-K", "2", "--n", "2", "--local-steps", "1"],
                    ["bdmc", str(out), "--n", "1", "-T", "2", "-K", "1"],
                    ["complete", str(out), "--n", "1", "--num-steps", "1", "--samples", "1"],
                    ["compare", str(out), "-K", "2", "--n", "2", "--out",
                     str(tmp_path / "cmp.png")]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "user_model.py" in err and "--trust-code" in err
    assert main([*evaluate, "--trust-code"]) == 0
    assert main(evaluate) == 0  # trusted from now on


def test_a_model_drawing_random_values_at_build_is_rebuilt_under_the_run_seed(file_run, capsys):
    _, out = file_run
    capsys.readouterr()
    trained = json.loads((out / "metrics.json").read_text())["heldout_elbo"]
    torch.manual_seed(12345)  # whatever the caller's RNG holds
    assert main(["evaluate", str(out), "--method", "elbo", "-K", "10"]) == 0
    evaluated = json.loads((out / "evaluate_elbo_K10.json").read_text())["mean"]
    assert evaluated == pytest.approx(trained, abs=1e-4)  # the same model, the same estimate


def test_a_rebuilt_model_that_differs_is_refused_by_its_fingerprint(file_run, capsys):
    _, out = file_run
    code = (out / "user_model.py").read_text()
    # the same weights, another build-time draw: the fingerprint of the outputs differs
    (out / "user_model.py").write_text(code.replace("torch.rand(data_dim)",
                                                    "torch.rand(data_dim) + 1"))
    assert main(["evaluate", str(out), "--trust-code", "-K", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not reproduce its training-time outputs" in err


def test_the_fingerprint_draws_nothing_so_it_holds_on_every_device(file_run):
    """The fingerprint puts every latent at its distribution's mode (z = 0 for N(0, I)) and the
    networks in eval mode: it does not depend on the RNG, so a run trained on one device is checked
    on another (before, a run moved to another device was not checked at all). Right answer: the
    numbers stored at train time, whatever the RNG's state (and on CUDA up to float error)."""
    from ppl_lvm import runs

    _, out = file_run
    weights = torch.load(out / "model.pt", weights_only=True)
    fingerprint = weights["fingerprint"]
    assert fingerprint["version"] == runs.FINGERPRINT_VERSION
    module = load_run(out, "cpu", trust_code=True)[0]
    torch.manual_seed(123)
    first = runs.output_fingerprint(module, fingerprint["rows"])
    torch.manual_seed(456)
    second = runs.output_fingerprint(module, fingerprint["rows"])
    assert first["site_means"] == second["site_means"] == fingerprint["site_means"]
    if torch.cuda.is_available():  # the same numbers from the GPU, up to float error
        on_gpu = runs.output_fingerprint(module.to("cuda"), fingerprint["rows"].cuda())
        assert on_gpu["site_means"] == pytest.approx(first["site_means"], rel=1e-4, abs=1e-3)


def test_resume_refuses_a_run_without_identity(tmp_path, capsys):
    """A run folder without identity.json (an older ppl_lvm's) cannot say what it ran under:
    --resume refuses it in one line instead of continuing unchecked (before: it resumed under
    whatever options were given)."""
    out = tmp_path / "run"
    assert main(["train", "vae", "--out", str(out), *TINY, "--epochs", "1"]) == 0
    (out / "identity.json").unlink()
    assert main(["train", "vae", "--out", str(out), *TINY, "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "identity.json" in err and "--overwrite" in err


def test_a_symlinked_lock_or_model_copy_is_refused(file_run, tmp_path, capsys):
    source, out = file_run
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    copy = out / "user_model.py"
    copy.unlink()
    copy.symlink_to(source)
    assert main(["evaluate", str(out), "-K", "2"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / LOCK_NAME).symlink_to(outside)
    assert main(["train", "vae", "--out", str(fresh), *TINY, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and LOCK_NAME in err
    assert outside.read_text() == "keep me"
    # the copy of a model file never writes through a link either
    other = tmp_path / "other"
    other.mkdir()
    (other / "user_model.py").symlink_to(outside)
    assert main(["train", f"{source}:build", "--out", str(other), "--data", "digits",
                 "--epochs", "1", "--batch-size", "512", "--quiet"]) == 0
    assert outside.read_text() == "keep me"
    assert not (other / "user_model.py").is_symlink()
    assert (other / "user_model.py").read_text() == MODEL_FILE


def test_the_copy_of_a_model_file_is_atomic(tmp_path, monkeypatch, capsys):
    source = tmp_path / "model.py"
    source.write_text(MODEL_FILE)
    out = tmp_path / "run"
    written = []
    real = atomic.atomic_write
    monkeypatch.setattr(atomic, "atomic_write",
                        lambda path, data: (written.append(Path(path).name), real(path, data)))
    assert main(["train", f"{source}:build", "--out", str(out), "--data", "digits", "--epochs",
                 "1", "--batch-size", "512", "--quiet"]) == 0
    assert "user_model.py" in written


# divergence below a million-fold ---------------------------------------------------------------


def test_the_guard_on_real_training_curves_stops_lr_3_and_never_a_healthy_run():
    """VAE curves recorded with the old guard (tests/divergence_curves.json): lr 1e-3..0.3 are
    healthy (they end 40 % below their first loss; lr 0.3 spikes 33x for a step and recovers),
    lr 1 spikes for a while and recovers; lr 3 climbs to 11x its start and stays there. A healthy
    LocalGuide fit whose first loss was a lucky draw 6x below the next ones (closed_form's data
    latents equal the guide's first sample under seed 0) comes down from there and is not
    stopped."""
    curves = json.loads((REPO / "tests" / "divergence_curves.json").read_text())["curves"]

    def first_stop(losses):
        guard = DivergenceGuard()
        for step, value in enumerate(losses, 1):
            try:
                guard.check_loss(value, step, 1, step)
            except DivergenceError as error:
                return step, str(error)
        return None, None

    for lr in ("0.001", "0.01", "0.1", "0.3", "1"):
        assert first_stop(curves[lr]) == (None, None), lr
    from tests import closed_form

    x = closed_form.make_data(50)
    guide = LocalGuide(50, {"z": 2})
    losses = fit(closed_form.model, guide, x, epochs=300, progress=False, seed=0).losses
    assert losses[1] > 5 * losses[0] and first_stop(losses) == (None, None)
    step, message = first_stop(curves["3"])
    assert step == 50 and "median over the last 25 steps" in message and "not coming down" in message
    assert "learning rate" in message and "untrained" in message


def test_a_diverging_fit_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    """lr 3 on digits (the curve above): the run stops at step 50, and no checkpoint of the
    climbing losses was written (a state is checkpointed only while its recent losses look
    healthy), so what stays is a good one or none."""
    from ppl_lvm import data as datasets

    x, _ = datasets.load_dataset("digits")
    x = x[:600]
    torch.manual_seed(0)  # the recorded curve's initial weights, whatever ran before
    vae = VAE(64, z_dim=4, hidden_dim=32)
    torch.manual_seed(0)
    with pytest.raises(DivergenceError, match="median over the last 25 steps") as caught:
        fit(vae.model, vae.guide, x, epochs=20, batch_size=64, lr=3.0, progress=False,
            transform=torch.bernoulli, validate=False, checkpoint_dir=tmp_path)
    assert "checkpoint" in str(caught.value)
    # every checkpoint written was judged good: none holds the climbing losses
    if (tmp_path / "checkpoint.pt").exists():
        losses = load_checkpoint(tmp_path / "checkpoint.pt", "cpu")["result"]["losses"]
        assert max(losses) < 3 * losses[0]


def test_evaluation_does_not_change_the_trained_weights():
    vae_a, x = tiny_vae_data()
    torch.manual_seed(0)
    vae_a = VAE(16, z_dim=2, hidden_dim=8)
    fit(vae_a.model, vae_a.guide, x, epochs=3, batch_size=16, progress=False, seed=0)
    torch.manual_seed(0)
    vae_b = VAE(16, z_dim=2, hidden_dim=8)
    fit(vae_b.model, vae_b.guide, x, epochs=3, batch_size=16, progress=False, seed=0,
        eval_data=x[:8], eval_every=1)
    assert same_weights(vae_a.state_dict(), vae_b.state_dict())


def test_evaluate_never_writes_into_a_run_replaced_meanwhile(tmp_path, runs, capsys,
                                                             monkeypatch):
    """`train --overwrite` finishing while `evaluate` computes: the old run's estimate must not
    land in the new run. A killed command's temporary files go at the next write."""
    import ppl_lvm.cli as cli

    base, _ = runs
    folder = tmp_path / "run"
    shutil.copytree(base, folder)
    leftover = folder / f".evaluate_iwae_K2.json.abc{atomic.TEMP_SUFFIX}"
    leftover.write_text("{")
    assert main(["evaluate", str(folder), "-K", "2", "--n", "4"]) == 0
    assert (folder / "evaluate_iwae_K2.json").is_file() and not leftover.exists()
    real = cli.run_data

    def replaced_meanwhile(*args, **kwargs):
        atomic.torch_save(torch.load(folder / "model.pt", weights_only=True), folder / "model.pt")
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "run_data", replaced_meanwhile)
    capsys.readouterr()
    assert main(["evaluate", str(folder), "-K", "3", "--n", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was replaced while this command ran" in err
    assert not (folder / "evaluate_iwae_K3.json").exists()


def test_overwrite_removes_only_what_the_package_wrote(tmp_path, runs, capsys):
    base, _ = runs
    folder = tmp_path / "run"
    shutil.copytree(base, folder)
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"mine")
    theirs = ["evaluate_notes.json", "notes.png", "model.pt.bak", "checkpoint.pt.old"]
    for name in theirs:
        (folder / name).write_text("keep")
    (folder / "completions_extra").mkdir()
    (folder / "evaluate_iwae_K5.json").write_text("{}")  # the package's: goes
    assert main(train_args(folder, 1, "--overwrite")) == 0
    assert all((folder / name).read_text() == "keep" for name in theirs)
    assert (folder / "completions_extra").is_dir() and outside.read_bytes() == b"mine"
    assert not (folder / "evaluate_iwae_K5.json").exists()
