import json
import subprocess
import sys

import pytest

from ppl_lvm.cli import main

TINY = ["--data", "digits", "--epochs", "2", "--z-dim", "2", "--hidden-dim", "16",
        "--batch-size", "256", "--eval-every", "1", "--quiet"]


def test_train_then_evaluate_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "vae", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "held-out ELBO" in printed and "nats/image" in printed
    for name in ("config.json", "model.pt", "metrics.json", "checkpoint.pt",
                 "reconstructions.png", "samples.png", "training_curve.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 * 6  # 1,437 training digits in batches of 256
    assert -100 < metrics["heldout_elbo"] < 0

    assert main(["evaluate", str(out), "--method", "elbo", "-K", "3", "--n", "50"]) == 0
    assert "by elbo, K=3" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--method", "iwae", "-K", "200", "--n", "50"]) == 0
    assert "by iwae, K=200" in capsys.readouterr().out
    elbo = json.loads((out / "evaluate_elbo_K3.json").read_text())
    iwae = json.loads((out / "evaluate_iwae_K200.json").read_text())
    assert elbo["num_images"] == iwae["num_images"] == 50
    assert iwae["mean"] > elbo["mean"] - 3 * elbo["stderr"]  # the IWAE bound is the tighter one
    assert 1 <= iwae["median_ess"] <= 200
    assert iwae["khat_above_0.7"] is not None and 0 <= iwae["khat_above_0.7"] <= 50

    # annealed importance sampling: a lower bound at least as tight as IWAE-200 here
    assert main(["evaluate", str(out), "--method", "ais", "-K", "2", "-T", "30", "--n", "50"]) == 0
    assert "by ais, K=2, T=30" in capsys.readouterr().out
    ais = json.loads((out / "evaluate_ais_K2_T30.json").read_text())
    assert ais["mean"] > iwae["mean"] - 3 * iwae["stderr"]
    # BDMC on images simulated from the run: lower <= upper (in expectation; 20 images)
    assert main(["bdmc", str(out), "--n", "20", "-T", "30", "-K", "2"]) == 0
    assert "simulated images" in capsys.readouterr().out
    sandwich = json.loads((out / "bdmc_T30_K2.json").read_text())
    assert sandwich["lower"] <= sandwich["upper"] + 1.0 and sandwich["gap"] == pytest.approx(
        sandwich["upper"] - sandwich["lower"], abs=1e-4)

    # resuming a finished run for more epochs continues from its checkpoint
    more = list(TINY)
    more[more.index("--epochs") + 1] = "3"
    assert main(["train", "vae", "--out", str(out), *more, "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3 * 6

    # resuming with another architecture names the parameter that does not fit
    wider = [a if a != "16" else "8" for a in more]
    assert main(["train", "vae", "--out", str(out), *wider, "--resume"]) == 2
    assert "has shape" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "gan", "--out", "x"], "invalid choice: 'gan'"),
    (["train", "vae", "--out", "x", "--data", "cifar"], "invalid choice: 'cifar'"),
    (["train", "vae", "--out", "x", "--epochs", "-1"], "--epochs must be >= 0"),
    (["train", "vae", "--out", "x", "--batch-size", "0"], "must be >= 1"),
    (["train", "vae", "--out", "x", "--data-path", "/no/such/folder"], "/no/such/folder"),
    (["evaluate", "/no/such/run"], "not found"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ppl-lvm: error:") and message in err
    assert len(err.splitlines()) == 1


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "ppl_lvm", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout
