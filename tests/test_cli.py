import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ppl_lvm import runs
from ppl_lvm.cli import main

ROOT = Path(__file__).resolve().parents[1]

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
    check_monte_carlo_error(out, capsys)
    # --compile: the same seeded numbers from a recorded graph, and a line on what it did
    assert main(["evaluate", str(out), "--method", "iwae", "-K", "200", "--n", "50",
                 "--compile", "on"]) == 0
    assert "compiled log weights (fx)" in capsys.readouterr().out
    graph = json.loads((out / "evaluate_iwae_K200.json").read_text())
    assert graph["mean"] == pytest.approx(iwae["mean"], abs=1e-4)
    assert "graph(s) recorded" in graph["compiled"] and "iwae" not in graph["compiled"]

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
    assert sandwich["lower_mc_stderr"] > 0 and sandwich["upper_mc_stderr"] > 0
    assert sandwich["gap_mc_stderr"] == pytest.approx(math.hypot(sandwich["lower_mc_stderr"],
                                                                 sandwich["upper_mc_stderr"]))
    # --compile: the annealed density from a recorded graph, the same seeded bounds
    assert main(["bdmc", str(out), "--n", "20", "-T", "30", "-K", "2", "--compile", "on"]) == 0
    assert "compiled density" in capsys.readouterr().out
    graph = json.loads((out / "bdmc_T30_K2.json").read_text())
    assert graph["lower"] == pytest.approx(sandwich["lower"], abs=1e-3)
    assert graph["upper"] == pytest.approx(sandwich["upper"], abs=1e-3)

    # resuming a finished run for more epochs continues from its checkpoint
    more = list(TINY)
    more[more.index("--epochs") + 1] = "3"
    assert main(["train", "vae", "--out", str(out), *more, "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3 * 6

    # resuming with another architecture names the option that changed
    wider = [a if a != "16" else "8" for a in more]
    assert main(["train", "vae", "--out", str(out), *wider, "--resume"]) == 2
    assert "--hidden-dim 16 -> 8" in capsys.readouterr().err


def check_monte_carlo_error(out, capsys):
    """Issue 19: `evaluate` prints and writes the Monte Carlo standard error of its mean beside the
    spread over rows. It is the estimator's own (``mean_mc_stderr``), and it says what it claims:
    the means of reruns with 8 other seeds on the same rows (Python API) scatter by about that
    much (their sd within a factor 2.5 of it)."""
    import statistics

    from ppl_lvm import estimate_log_marginal
    from ppl_lvm.runs import load_run, run_data

    assert main(["evaluate", str(out), "-K", "10", "--n", "30"]) == 0
    printed = capsys.readouterr().out
    first = json.loads((out / "evaluate_iwae_K10.json").read_text())
    assert (f"{first['mean']:.2f} ± {first['mc_stderr']:.2g} (Monte Carlo) nats/image; over 30 "
            f"images: s.e. {first['stderr']:.2f}, sd {first['sd']:.2f}") in printed
    module, config = load_run(out)
    x = run_data(config["data"])[1][:30]
    estimates = [estimate_log_marginal(module.model, module.guide, x, method="iwae",
                                       num_samples=10, seed=seed) for seed in range(9)]
    assert first["mean"] == pytest.approx(estimates[0].mean, rel=1e-5)
    assert first["mc_stderr"] == pytest.approx(estimates[0].mean_mc_stderr, rel=1e-4)
    assert first["sd"] == pytest.approx(estimates[0].log_px.std().item(), rel=1e-4)
    scatter = statistics.stdev([e.mean for e in estimates[1:]])
    assert first["mc_stderr"] / 2.5 < scatter < 2.5 * first["mc_stderr"]


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


SMALL = ["--data", "digits", "--epochs", "2", "--z-dim", "2", "--hidden-dim", "16",
         "--batch-size", "256", "--quiet"]


@pytest.mark.parametrize("argv", [
    ["vae", "--guide", "local", "--inner-steps", "2", "--lr-schedule", "cosine"],
    ["vae", "--guide", "semi-amortized", "--semi-steps", "2"],
    ["vae", "--objective", "iwae", "-K", "3", "--dreg"],
    ["vae", "--likelihood", "gaussian", "--lr-schedule", "exponential", "--checkpoint-every", "3"],
    ["masked-vae", "--missing", "mcar:0.5"],
    ["masked-vae", "--missing", "top_half", "--guide", "local"],
    ["ppca", "--likelihood", "gaussian"],
    ["mog", "--components", "3", "--covariance", "tied"],
    ["vae", "--guide", "local", "--objective", "iwae", "-K", "2"],
    ["ppca", "--guide", "local", "--lr-schedule", "exponential"],
    ["masked-vae", "--missing", "bottom_half", "--objective", "iwae", "-K", "2", "--dreg"],
    ["mog", "--components", "2", "--covariance", "full"],
    ["vae", "--compile", "on", "--objective", "iwae", "-K", "2"],
], ids=" ".join)
def test_every_model_guide_and_objective_trains_and_evaluates(argv, tmp_path, capsys):
    """Each combination trains, writes its run, and `evaluate` rebuilds the same guide kind and
    scores held-out rows: IWAE-50 is at least the run's own held-out ELBO (up to 3 s.e.)."""
    out = tmp_path / "run"
    assert main(["train", *argv, "--out", str(out), *SMALL]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(["evaluate", str(out), "-K", "50", "--n", "40"]) == 0
    printed = capsys.readouterr().out
    # a mixture's file names what was computed (before: evaluate_iwae_K50.json for an exact value)
    name = "evaluate_exact.json" if argv[0] == "mog" else "evaluate_iwae_K50.json"
    result = json.loads((out / name).read_text())
    assert result["num_images"] == 40 and not (argv[0] == "mog" and any(out.glob("*iwae*")))
    assert runs.is_run_file(out / name)  # --overwrite knows it as the package's
    if argv[0] == "mog":  # exact, by enumeration: the mixture's own log p(x) of these rows
        from ppl_lvm.runs import load_run, run_data
        module, config = load_run(out)
        x = run_data(config["data"])[1][:40]
        assert "by exact:" in printed and result["method"] == "exact"
        assert result["mean"] == pytest.approx(module.log_prob(x).mean().item(), abs=1e-3)
    else:
        assert result["mean"] > metrics["heldout_elbo"] - 10 - 3 * result["stderr"]
    if "local" in argv:
        assert "infer_local" in printed
    if argv[0] != "mog":
        entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [e["epoch"] for e in entries] == [1, 2]
        assert [e["loss"] for e in entries] == metrics["epoch_losses"]  # the log is the run's
        if "cosine" in argv:  # the schedule's factor at each epoch's last step, decaying
            from ppl_lvm.train import lr_factor
            total = entries[-1]["step"]
            assert [e["lr_factor"] for e in entries] == [
                pytest.approx(lr_factor("cosine", e["step"] - 1, total)) for e in entries]
            assert entries[0]["lr_factor"] > 0.5 > 0.05 > entries[-1]["lr_factor"]
        elif "exponential" not in argv:
            assert all(e["lr_factor"] == 1.0 for e in entries)
        assert entries[0]["wall_time_s"] <= entries[1]["wall_time_s"]


def test_bad_combinations_are_one_line(capsys, tmp_path):
    for argv, message in [(["vae", "--missing", "top_half"], "masked-vae"),
                          (["masked-vae"], "needs --missing"),
                          (["vae", "--inner-steps", "2"], "--guide local"),
                          (["mog", "--guide", "local"], "--mog-method"),
                          (["vae", "--dreg"], "--objective iwae"),
                          (["vae", "--guide", "local", "--inner-tol", "0.01"], "--inner-steps"),
                          (["ppca", "--guide", "semi-amortized"], "semi-amortized"),
                          (["masked-vae", "--missing", "top_half", "--guide", "semi-amortized"],
                           "masked-vae does not"),
                          (["no_such_file.py:build"], "no_such_file.py")]:
        assert main(["train", *argv, "--out", str(tmp_path / "x"), *SMALL]) == 2
        assert message in capsys.readouterr().err


def test_your_own_model_file_trains_evaluates_and_survives_the_file_changing(tmp_path, capsys):
    """The README's example file, trained by path; the run keeps a copy, so evaluating still works
    after the original is gone."""
    source = tmp_path / "my_model.py"
    source.write_text((ROOT / "examples" / "my_model.py").read_text())
    out = tmp_path / "mine"
    assert main(["train", f"{source}:build", "--option", "z_dim=3", "--likelihood", "gaussian",
                 "--out", str(out), *SMALL]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_file"] == "user_model.py" and config["options"] == {"z_dim": 3}
    source.unlink()
    assert main(["evaluate", str(out), "-K", "20", "--n", "30"]) == 0
    assert "by iwae, K=20" in capsys.readouterr().out
    # every later command works on the run with no further code
    assert main(["gaps", str(out), "-K", "20", "--n", "10", "--local-steps", "10",
                 "--elbo-samples", "5"]) == 0
    gaps = json.loads((out / "gaps.json").read_text())
    assert gaps["approximation_gap"] == pytest.approx(gaps["log_px"] - gaps["elbo_optimal"], abs=1e-4)
    assert gaps["amortization_gap"] == pytest.approx(gaps["elbo_optimal"] - gaps["elbo_amortized"],
                                                     abs=1e-4)
    assert main(["complete", str(out), "--n", "4", "--num-steps", "5", "--samples", "2"]) == 0
    assert (out / "completions_top_half.png").is_file()
    png = tmp_path / "cmp.png"
    assert main(["compare", str(out), "-K", "20", "--n", "30", "--out", str(png)]) == 0
    row, = json.loads(png.with_suffix(".json").read_text())
    evaluated = json.loads((out / "evaluate_iwae_K20.json").read_text())
    assert row["heldout_log_px"] == pytest.approx(evaluated["mean"], abs=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    linear = lambda inputs, outputs: inputs * outputs + outputs  # noqa: E731
    decoder, encoder = linear(3, 64) + linear(64, 2 * 64), linear(64, 64) + linear(64, 2 * 3)
    assert row["num_parameters"] == metrics["num_parameters"] == decoder + encoder  # 8x8 digits


def test_a_run_config_repeats_the_run_and_the_command_line_overrides_it(tmp_path):
    first = tmp_path / "a"
    assert main(["train", "vae", "--objective", "iwae", "-K", "2", "--out", str(first),
                 *SMALL]) == 0
    again = tmp_path / "b"
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again),
                 "--quiet"]) == 0
    a = json.loads((first / "metrics.json").read_text())
    b = json.loads((again / "metrics.json").read_text())
    assert a["epoch_losses"] == b["epoch_losses"]  # the same experiment, loss for loss
    toml = tmp_path / "exp.toml"
    toml.write_text('model = "vae"\ndata = "digits"\nepochs = 1\nz-dim = 2\nhidden-dim = 16\n'
                    'batch-size = 256\n')
    third = tmp_path / "c"
    assert main(["train", "--config", str(toml), "--epochs", "2", "--out", str(third),
                 "--quiet"]) == 0
    assert json.loads((third / "metrics.json").read_text())["epochs"] == 2  # the CLI wins
    with open(toml, "a") as handle:  # every experiment option may come from the file
        handle.write('guide = "local"\ninner-steps = 2\nquiet = true\n')
    assert main(["train", "--config", str(toml), "--out", str(tmp_path / "d")]) == 0
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["cli"]["guide"] == "local" and config["cli"]["inner_steps"] == 2
    assert main(["train", "vae", "--data", "digits"]) == 2  # and without --out, one line
    # ... but not which folder is written or deleted: a received file cannot aim --overwrite
    for line in (f'out = "{tmp_path / "d"}"', "overwrite = true"):
        bad = tmp_path / "bad.toml"
        bad.write_text(toml.read_text() + line + "\n")
        assert main(["train", "--config", str(bad), "--out", str(tmp_path / "e")]) == 2
    assert (tmp_path / "d" / "config.json").is_file() and not (tmp_path / "e").exists()


def test_a_run_of_your_own_model_repeats_from_its_config_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    first = tmp_path / "mine"
    assert main(["train", "examples/my_model.py:build", "--option", "hidden=32",
                 "--lr-schedule", "cosine", "--out", str(first), *SMALL]) == 0
    monkeypatch.chdir(tmp_path)  # the relative path given above no longer resolves from here
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again)]) == 0
    a = json.loads((first / "metrics.json").read_text())
    b = json.loads((again / "metrics.json").read_text())
    assert a["epoch_losses"] == b["epoch_losses"] and b["num_parameters"] == a["num_parameters"]
    assert json.loads((again / "config.json").read_text())["options"] == {"hidden": 32}


def test_compare_reports_what_evaluate_and_the_runs_say(tmp_path, capsys):
    runs = []
    for guide in ("amortized", "local"):
        out = tmp_path / guide
        assert main(["train", "vae", "--guide", guide, "--out", str(out), *SMALL]) == 0
        runs.append(out)
    assert main(["evaluate", str(runs[0]), "-K", "30", "--n", "20"]) == 0
    png = tmp_path / "cmp.png"
    assert main(["compare", *map(str, runs), "-K", "30", "--n", "20", "--out", str(png)]) == 0
    rows = json.loads(png.with_suffix(".json").read_text())
    evaluated = json.loads((runs[0] / "evaluate_iwae_K30.json").read_text())
    assert rows[0]["heldout_log_px"] == pytest.approx(evaluated["mean"], abs=1e-5)
    for row, run in zip(rows, runs):
        metrics = json.loads((run / "metrics.json").read_text())
        assert row["num_parameters"] == metrics["num_parameters"]
        assert row["train_time_s"] == pytest.approx(metrics["train_time_s"])
    # digits: 64 pixels, z 2, one hidden layer of 16; the local run trains a φ row (μ, log σ) per
    # training digit in place of the encoder
    decoder = 2 * 16 + 16 + 16 * 64 + 64
    encoder = 64 * 16 + 16 + 16 * 4 + 4
    num_train = 1797 - round(1797 * 0.2)
    assert [row["num_parameters"] for row in rows] == [decoder + encoder, decoder + num_train * 4]
    printed = capsys.readouterr().out
    for row in rows:  # the printed table is the JSON's numbers
        assert (f"| {row['run']} | vae | {row['guide']} | {row['heldout_elbo']:.2f} | "
                f"{row['heldout_log_px']:.2f} ± {row['log_px_stderr']:.2f} |") in printed
    assert png.is_file()
    # the local run against the amortized one, on the same 20 held-out rows, paired
    paired = rows[1]["paired"]
    assert paired["baseline"] == str(runs[0]) and paired["stderr"] > 0 and paired["mc_stderr"] > 0
    assert paired["mean"] == pytest.approx(rows[1]["heldout_log_px"] - rows[0]["heldout_log_px"],
                                           abs=1e-4)
    assert "paired s.e." in printed and f"{paired['mean']:+.3f} | {paired['stderr']:.3f}" in printed
    for row in rows:  # the Monte Carlo error of each mean beside the spread over rows
        assert row["log_px_mc_stderr"] > 0 and row["heldout_elbo_mc_stderr"] > 0
        assert f"± {row['log_px_stderr']:.2f} | {row['log_px_mc_stderr']:.2g} |" in printed
    assert rows[0]["num_rows"] == 20 and "on the first 20 of 359 held-out rows" in printed


def test_progress_of_a_long_run_writes_little_into_a_log(tmp_path):
    """Bars are drawn on a terminal only: a 50-epoch run's output written to a file holds its
    messages and no per-step lines."""
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "ppl_lvm", "train", "vae", "--data", "digits",
                               "--epochs", "50", "--z-dim", "2", "--hidden-dim", "8",
                               "--batch-size", "512", "--eval-every", "50",
                               "--out", str(tmp_path / "run")],
                              stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, log.read_text()[-2000:]
    text = log.read_text()
    assert "step/s" not in text and "\r" not in text  # no bar in a file
    assert text.startswith("loading digits") and f"wrote {tmp_path / 'run'}" in text
    assert log.stat().st_size < 2_000, log.stat().st_size


def test_evaluate_fits_held_out_phi_of_a_per_datapoint_run_as_the_python_api_does(tmp_path, capsys):
    """A local-guide run has no φ for held-out rows: evaluate fits them with the model frozen
    (infer_local) and reports the same per-datapoint estimate, s.e. and ESS that the Python API
    gives for that guide."""
    import pyro
    import torch

    from ppl_lvm import estimate_log_marginal, infer_local
    from ppl_lvm.runs import load_run, run_data

    out = tmp_path / "local"
    assert main(["train", "vae", "--guide", "local", "--inner-steps", "2", "--out", str(out),
                 *SMALL]) == 0
    assert main(["evaluate", str(out), "-K", "40", "--n", "25"]) == 0
    printed = capsys.readouterr().out
    assert "per-datapoint guide: held-out φ fitted by infer_local" in printed
    result = json.loads((out / "evaluate_iwae_K40.json").read_text())
    module, config = load_run(out)
    x = run_data(config["data"])[1][:25]
    pyro.set_rng_seed(0)
    guide = infer_local(module.model, x, num_steps=300, lr=1e-2, name="held_out")
    estimate = estimate_log_marginal(module.model, guide, x, method="iwae", num_samples=40, seed=0,
                                     idx=torch.arange(25))
    assert result["mean"] == pytest.approx(estimate.mean, abs=1e-4)
    assert result["stderr"] == pytest.approx(estimate.stderr, abs=1e-4) and result["stderr"] > 0
    assert result["median_ess"] == pytest.approx(estimate.ess.median().item(), abs=1e-3)
    assert f"{result['mean']:.2f} ± {result['mc_stderr']:.2g} (Monte Carlo)" in printed
    assert f"s.e. {result['stderr']:.2f}, sd {result['sd']:.2f}" in printed and "median ESS" in printed


def test_tensorboard_is_optional(tmp_path, capsys):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert main(["train", "vae", "--tensorboard", "--out", str(tmp_path / "tb"), *SMALL]) == 2
        assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
        return
    assert main(["train", "vae", "--tensorboard", "--out", str(tmp_path / "tb"), *SMALL]) == 0
    assert any((tmp_path / "tb" / "tensorboard").iterdir())


def test_demo_prints_what_its_run_folder_holds(tmp_path, capsys):
    """The demo on tiny settings: its printed ELBO and IWAE numbers are the run's own, and it
    writes the pictures (completions of top halves included) and the next commands."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--z-dim", "2", "--hidden-dim", "16",
                 "--batch-size", "512", "--demo-samples", "5", "--quiet"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    estimate = json.loads((out / "evaluate_iwae_K5.json").read_text())
    assert f"held-out ELBO {metrics['heldout_elbo']:.2f}" in printed
    assert (f"IWAE-5 {estimate['mean']:.2f} ± {estimate['mc_stderr']:.3f} (Monte Carlo) "
            f"nats/image, s.e. over images {estimate['stderr']:.2f}") in printed
    assert f"median ESS {estimate['median_ess']:.1f}" in printed
    for name in ("samples.png", "reconstructions.png", "training_curve.png",
                 "completions_top_half.png"):
        assert (out / name).is_file()
    assert f"ppl-lvm compare {out}" in printed and f"ppl-lvm evaluate {out}" in printed


@pytest.mark.cuda
@pytest.mark.parametrize("argv", [["vae", "--guide", "local", "--inner-steps", "2"],
                                  ["vae", "--guide", "semi-amortized", "--semi-steps", "2"],
                                  ["masked-vae", "--missing", "top_half"],
                                  ["ppca", "--likelihood", "gaussian"],
                                  ["mog", "--components", "3"]], ids=lambda a: a[0] + a[-1])
def test_every_model_and_guide_trains_and_evaluates_on_cuda(argv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *argv, "--out", str(out), "--device", "cuda", *SMALL]) == 0, \
        capsys.readouterr().err
    assert main(["evaluate", str(out), "-K", "20", "--n", "20", "--device", "cuda"]) == 0, \
        capsys.readouterr().err
    assert json.loads((out / "evaluate_iwae_K20.json").read_text())["num_images"] == 20


# a run is what it says: resume continues only the same computation -----------------------------

IDENTITY_BASE = ["--data", "digits", "--z-dim", "2", "--hidden-dim", "8", "--batch-size", "512",
                 "--eval-every", "1", "--quiet"]


@pytest.fixture(scope="module")
def started_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("identity") / "run"
    assert main(["train", "vae", "--out", str(out), *IDENTITY_BASE, "--epochs", "1"]) == 0
    return out


CHANGED = [
    (["--objective", "iwae"], "--objective 'elbo' -> 'iwae'"),
    (["--lr-schedule", "cosine"], "--lr-schedule 'constant' -> 'cosine'"),
    (["--guide", "local"], "--guide 'amortized' -> 'local'"),
    (["--lr", "0.01"], "--lr 0.001 -> 0.01"),
    (["--seed", "1"], "--seed 0 -> 1"),
    (["--batch-size", "256"], "--batch-size 512 -> 256"),
    (["--z-dim", "3"], "--z-dim 2 -> 3"),
    (["--hidden-dim", "9"], "--hidden-dim 8 -> 9"),
    (["--likelihood", "gaussian"], "--likelihood 'bernoulli' -> 'gaussian'"),
    (["-K", "2"], "--num-particles 1 -> 2"),
    (["--test-fraction", "0.3"], "--test-fraction 0.2 -> 0.3"),
    (["--local-lr", "0.1"], "--local-lr 0.01 -> 0.1"),
    (["--semi-steps", "2"], "--semi-steps 5 -> 2"),
    (["--guide", "local", "--inner-steps", "2"], "--inner-steps 0 -> 2"),
    (["--guide", "local", "--inner-steps", "2", "--inner-tol", "0.1"],
     "--inner-tol None -> 0.1"),
    (["--objective", "iwae", "--dreg"], "--dreg False -> True"),
    (["masked-vae", "--missing", "top_half"], "--missing None -> 'top_half'"),
    (["--components", "3"], "--components 10 -> 3"),
    (["--covariance", "full"], "--covariance 'diag' -> 'full'"),
    (["--mog-method", "enum"], "--mog-method 'em' -> 'enum'"),
    (["--data-path", str(ROOT / "tests")], "--data-path None -> "),
    (["--data", "mnist"], "--data 'digits' -> 'mnist'"),
]


@pytest.mark.parametrize("changed, diff", CHANGED, ids=[c[0][0] + "".join(c[0][1:2]) for c in CHANGED])
def test_resume_under_a_changed_option_is_refused_with_the_diff(started_run, capsys, changed,
                                                                diff):
    before = {p.name: p.read_bytes() for p in started_run.iterdir()}
    model, changed = (changed[0], changed[1:]) if changed[0] == "masked-vae" else ("vae", changed)
    argv = ["train", model, "--out", str(started_run), *IDENTITY_BASE, "--epochs", "2",
            "--resume", *changed]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and diff in err, err
    assert {p.name: p.read_bytes() for p in started_run.iterdir()} == before


def test_the_identity_leaves_out_what_does_not_change_the_computation():
    from ppl_lvm.cli import EXPERIMENT_OPTIONS, IDENTITY_OPTIONS

    changed = {c[1].split()[0].lstrip("-").replace("-", "_") for c in CHANGED} | {"option"}
    assert changed == set(IDENTITY_OPTIONS)
    assert set(EXPERIMENT_OPTIONS) - set(IDENTITY_OPTIONS) == {
        "model", "epochs", "eval_every", "checkpoint_every"}


def test_resume_after_the_model_file_changed_is_refused_and_runs_the_run_copy(tmp_path, capsys):
    source = tmp_path / "my_model.py"
    source.write_text((ROOT / "examples" / "my_model.py").read_text())
    out = tmp_path / "mine"
    train = ["train", f"{source}:build", "--out", str(out), "--likelihood", "gaussian",
             *IDENTITY_BASE]
    assert main([*train, "--epochs", "1"]) == 0
    kept = (out / "user_model.py").read_bytes()
    source.write_text(source.read_text() + "\n# edited\n")
    assert main([*train, "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model file" in err
    assert (out / "user_model.py").read_bytes() == kept
    assert main([*train, "--epochs", "2", "--resume", "--option", "hidden=32"]) == 2
    assert "--option {} -> {'hidden': 32}" in capsys.readouterr().err  # (file models only)
    # the file back as it was: the run continues, on its own copy
    source.write_bytes(kept)
    assert main([*train, "--epochs", "2", "--resume"]) == 0
    assert (out / "user_model.py").read_bytes() == kept
    # --lr-schedule makes --epochs part of the computation (the schedule spans all steps)
    cosine = tmp_path / "cosine"
    assert main(["train", "vae", "--out", str(cosine), *IDENTITY_BASE, "--epochs", "1",
                 "--lr-schedule", "cosine"]) == 0
    assert main(["train", "vae", "--out", str(cosine), *IDENTITY_BASE, "--epochs", "2",
                 "--lr-schedule", "cosine", "--resume"]) == 2
    assert "--epochs 1 -> 2" in capsys.readouterr().err


def test_train_mog_takes_epochs_as_its_cap(tmp_path):
    out = tmp_path / "mog"
    assert main(["train", "mog", "--out", str(out), "--data", "digits", "--components", "3",
                 "--epochs", "2", "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
    free = tmp_path / "free"  # without --epochs: EM until it converges (more than 2 here)
    assert main(["train", "mog", "--out", str(free), "--data", "digits", "--components", "3",
                 "--quiet"]) == 0
    assert json.loads((free / "metrics.json").read_text())["epochs"] > 2


def test_every_missing_mask_is_accepted_and_only_mcar_takes_a_rate():
    from ppl_lvm.experiment import parse_missing_text
    from ppl_lvm.models.missing import MASKS

    for name in MASKS:
        if name != "mcar":
            assert parse_missing_text(name) == (name, {})
    assert parse_missing_text("mcar:0.25") == ("mcar", {"rate": 0.25})
    for text in ("top_half:3", "blocks:2", "mcar:", "mcar", "mcar:1"):
        with pytest.raises(ValueError, match="--missing"):
            parse_missing_text(text)


def test_paired_difference_on_the_same_rows_against_its_closed_form():
    """Two 'runs' whose per-row log p(x) differ by a constant 0.05 plus small noise, on rows that
    vary by several nats: the paired s.e. is the noise's std / √N (about 0.001), the unpaired one
    is dominated by the rows' spread (about 0.3); the difference is not within noise. Pure noise
    around the same values is."""
    from ppl_lvm.cli import paired_difference
    gen = torch.Generator().manual_seed(0)
    rows = 3.0 * torch.randn(400, generator=gen, dtype=torch.float64) - 90.0
    noise = 0.02 * torch.randn(400, generator=gen, dtype=torch.float64)
    result = paired_difference(rows + 0.05 + noise, rows, torch.full((400,), 0.01),
                               torch.full((400,), 0.01))
    assert result["mean"] == pytest.approx(0.05 + noise.mean().item(), abs=1e-6)
    assert result["stderr"] == pytest.approx(noise.double().std().item() / 20, rel=1e-6)
    assert result["unpaired_stderr"] > 100 * result["stderr"]
    assert result["mc_stderr"] == pytest.approx(math.sqrt(400 * 2 * 1e-4) / 400, rel=1e-6)
    assert not result["within_noise"]
    assert paired_difference(rows + noise, rows)["within_noise"]


def test_every_command_checks_its_runs_before_any_work(tmp_path, capsys):
    """`compare` over a trained run and a missing one fails at once, naming the missing one, and
    writes nothing (it used to evaluate the first run for a minute first)."""
    out = tmp_path / "run"
    assert main(["train", "vae", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    start = time.perf_counter()
    assert main(["compare", str(out), str(tmp_path / "missing"), "--out",
                 str(tmp_path / "c.png")]) == 2
    assert time.perf_counter() - start < 2.0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'missing'} not found" in err
    assert not (tmp_path / "c.json").exists()
    for command in (["evaluate"], ["gaps"], ["bdmc"], ["complete"]):
        assert main(command + [str(tmp_path)]) == 2  # a folder, but no run in it
        assert "model.pt not found" in capsys.readouterr().err


def test_a_failing_model_file_is_one_line_naming_its_line_and_leaves_no_folder(tmp_path, capsys):
    model_file = tmp_path / "broken.py"
    model_file.write_text("def build(data_dim, **options):\n    return no_such_name(data_dim)\n")
    out = tmp_path / "never"
    assert main(["train", f"{model_file}:build", "--data", "digits", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ppl-lvm: error: {model_file}:2 (in build): NameError: name 'no_such_name' "
                   "is not defined (--debug for the traceback)")
    assert not out.exists()  # a failed run leaves no empty run folder
    with pytest.raises(NameError):
        main(["train", f"{model_file}:build", "--data", "digits", "--out", str(out), "--debug"])
    assert not out.exists()


def test_demo_refuses_the_options_it_does_not_take(capsys):
    for option in (["--guide", "local"], ["--data", "digits"], ["--objective", "iwae"],
                   ["--missing", "top_half"], ["--option", "a=1"]):
        assert main(["demo", *option]) == 2
        err = capsys.readouterr().err
        assert f"demo does not take {' '.join(option)}" in err and "ppl-lvm train" in err


def test_help_shows_every_command_default_and_version(capsys):
    from ppl_lvm import __version__
    from ppl_lvm.cli import build_parser, subparser

    parser = build_parser()
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("train", "evaluate", "compare", "gaps", "bdmc", "complete", "demo"):
        assert f"    {command} " in text, command
        for action in subparser(parser, command)._actions:
            assert action.help, (command, action.dest)  # every option says what it is
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1000)" in text and "(default: 500)" in text and "--threads" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "required, here or in --config" in text and "(default: 0.001)" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith(f"ppl-lvm {__version__} (torch")


def test_print_config_is_a_toml_that_config_reads_back(tmp_path, capsys):
    from ppl_lvm.cli import build_parser, parse

    argv = ["train", "vae", "--data", "digits", "--epochs", "3", "--lr-schedule", "cosine",
            "--option", "a=1", "--out", str(tmp_path / "x")]
    assert main([*argv, "--print-config"]) == 0
    config = tmp_path / "exp.toml"
    config.write_text(capsys.readouterr().out)
    assert not (tmp_path / "x").exists()  # printed, nothing done
    expected = vars(parse(build_parser(), argv))
    # --out (like --overwrite, --resume, --trust-code) is the command line's alone (issue 20)
    assert "# out = " in config.read_text()
    again = vars(parse(build_parser(), ["train", "--config", str(config), "--out",
                                        str(tmp_path / "x")]))
    skip = {"func", "config"}
    assert {k: v for k, v in again.items() if k not in skip} == {
        k: v for k, v in expected.items() if k not in skip}
    assert main(["evaluate", "runs/x", "-K", "7", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "num_samples = 7" in text and '# run = "runs/x"' in text
    (tmp_path / "e.toml").write_text("num-samples = 9\nnot_an_option = 1\n")
    assert main(["evaluate", "runs/x", "--config", str(tmp_path / "e.toml")]) == 2
    assert "unknown options ['not_an_option']" in capsys.readouterr().err


def test_threads_default_to_free_physical_cores_and_obey_the_option(monkeypatch):
    import torch

    from ppl_lvm import threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3  # the user's choice
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "physical_cores", lambda: 8)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.6, 0, 0))
    assert threads.free_cores() == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.default_threads() == 2  # 5 free cores shared by 2 processes
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (20.0, 0, 0))
    assert threads.default_threads() == 1
    before = torch.get_num_threads()
    try:
        assert main(["evaluate", "/no/such/run", "--threads", "1"]) == 2
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_evaluate_defaults_k_per_method(tmp_path, capsys):
    """-K is 1,000 importance samples, but 16 AIS chains (each as costly as T samples)."""
    out = tmp_path / "run"
    assert main(["train", "vae", "--out", str(out), *TINY]) == 0
    assert main(["evaluate", str(out), "--method", "ais", "-T", "3", "--n", "4"]) == 0
    assert "by ais, K=16, T=3" in capsys.readouterr().out
    assert (out / "evaluate_ais_K16_T3.json").is_file()
    assert main(["evaluate", str(out), "--method", "elbo", "--n", "4"]) == 0
    assert "by elbo, K=1000" in capsys.readouterr().out


def test_compare_and_evaluate_give_a_mixtures_exact_log_px_on_the_same_rows(tmp_path, capsys):
    """Issue 19 (the `compare` +29 against `evaluate` -141 report): on a mixture both commands
    print the same quantity, the mean over rows of the exact log p(x_n), enumerated; they differed
    only in their rows (compare: the first --n 200; evaluate: all 359), and a Gaussian mixture on
    binary pixels has a tail of held-out rows far below the rest (a variance at its floor on a
    pixel constant in training), so a mean over a subset can even have the other sign. Both equal
    the closed form log Σ_k π_k N(x_n; μ_k, Σ_k) on their own rows; compare says which rows."""
    from ppl_lvm.runs import load_run, run_data

    out = tmp_path / "mog"
    assert main(["train", "mog", "--components", "3", "--out", str(out), *SMALL]) == 0
    module, config = load_run(out)
    x = run_data(config["data"])[1].double()
    with torch.no_grad():  # the closed form, by enumerating the assignment in float64
        weights = module.weights.double()
        log_px = torch.stack([
            weights[k].log() + torch.distributions.MultivariateNormal(
                module.loc[k].double(), module.covariance_matrix[k].double()).log_prob(x)
            for k in range(3)], -1).logsumexp(-1)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--n", "40"]) == 0
    first = json.loads((out / "evaluate_exact.json").read_text())
    assert main(["evaluate", str(out)]) == 0
    every = json.loads((out / "evaluate_exact.json").read_text())
    png = tmp_path / "cmp.png"
    assert main(["compare", str(out), "--n", "40", "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    row = json.loads(png.with_suffix(".json").read_text())[0]
    assert first["mean"] == pytest.approx(log_px[:40].mean().item(), rel=1e-5)
    assert every["mean"] == pytest.approx(log_px.mean().item(), rel=1e-5)
    assert every["num_images"] == 359 and first["mc_stderr"] == every["mc_stderr"] == 0
    for value in (row["heldout_elbo"], row["heldout_log_px"]):  # exact q: ELBO = log p(x)
        assert value == pytest.approx(first["mean"], rel=1e-6)
    assert row["method"] == "exact" and row["num_rows"] == 40 and row["num_heldout"] == 359
    assert "on the first 40 of 359 held-out rows" in printed and "exact (enumerated)" in printed


def test_a_new_estimator_and_guide_kind_are_one_registry_entry_each(tmp_path, capsys, monkeypatch):
    """The README's contributor recipe: an estimate function plus one entry in ``cli.METHODS``,
    a guide builder plus one entry in ``experiment.GUIDE_KINDS``; choices, help and every branch
    follow the entries."""
    from ppl_lvm import cli, experiment
    from ppl_lvm.estimators import estimate_log_marginal

    built = []

    def my_guide(module, num_data, data, options):  # the amortized guide, counted
        built.append(num_data)
        return module.guide

    def my_estimate(model, guide, x, *, method, **options):  # IWAE under another name
        return estimate_log_marginal(model, guide, x, method="iwae", **options)

    monkeypatch.setitem(cli.METHODS, "mine", cli.Method("IWAE again", num_samples=7,
                                                        estimate=my_estimate))
    monkeypatch.setitem(experiment.GUIDE_KINDS, "mine",
                        experiment.GuideKind(my_guide, "the encoder, counted", amortized=True))
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "mine: IWAE again" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")
    out = tmp_path / "run"
    assert main(["train", "vae", "--out", str(out), "--guide", "mine", *TINY]) == 0
    assert built == [1438]  # train built the guide from the entry, once, for the training rows
    assert main(["evaluate", str(out), "--method", "mine", "--n", "20"]) == 0
    assert main(["evaluate", str(out), "--method", "iwae", "-K", "7", "--n", "20"]) == 0
    mine = json.loads((out / "evaluate_mine_K7.json").read_text())  # -K's default from the entry
    iwae = json.loads((out / "evaluate_iwae_K7.json").read_text())
    assert mine["mean"] == iwae["mean"] and mine["num_samples"] == 7


@pytest.mark.parametrize("command, new, old, dest, value", [
    (["evaluate", "runs/x", "--method", "ais"], "--num-temperatures", "--num-steps", "num_steps", 7),
    (["bdmc", "runs/x"], "--num-temperatures", "--num-steps", "num_steps", 7),
    (["complete", "runs/x"], "--num-sweeps", "--num-steps", "num_steps", 7),
    (["complete", "runs/x"], "--num-completions", "--samples", "samples", 3),
])
def test_the_command_line_speaks_the_vocabulary_and_keeps_old_flags(command, new, old, dest,
                                                                   value):
    """One word per idea (README, Vocabulary): T is --num-temperatures, MwG's sweeps are
    --num-sweeps, completions --num-completions; the older flags give the same setting. K is
    never the number of mixture components in the help."""
    from ppl_lvm.cli import build_parser, parse, subparser

    parser = build_parser()
    assert getattr(parse(parser, [*command, new, str(value)]), dest) == value
    assert getattr(parse(build_parser(), [*command, old, str(value)]), dest) == value
    train_help = " ".join(subparser(build_parser(), "train").format_help().split())
    assert "number of mixture components" in train_help and "K components" not in train_help
