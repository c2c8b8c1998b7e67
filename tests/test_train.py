import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_lvm.models.vae import VAE
from ppl_lvm.train import Checkpointing, DivergenceError, Evaluation, Schedule, bind_rows, fit


def binary_data(num_data=120, data_dim=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.linspace(0.1, 0.9, data_dim)
    return (torch.rand(num_data, data_dim, generator=gen) < probs).float()


def small_vae(seed=0, data_dim=12):
    torch.manual_seed(seed)
    return VAE(data_dim, z_dim=2, hidden_dim=16)


def test_fit_lowers_loss_and_evaluates():
    x = binary_data()
    vae = small_vae()
    result = fit(vae.model, vae.guide, x, epochs=6, batch_size=20, lr=2e-2, progress=False,
                 eval_data=x[:40], eval_every=3)
    assert result.step == 6 * 6
    assert len(result.losses) == 36 and len(result.epoch_losses) == 6
    assert result.epoch_losses[-1] < result.epoch_losses[0] - 0.5
    assert result.eval_epochs == [3, 6]
    assert all(e < 0 for e in result.eval_elbos)


def test_minibatch_loss_is_scaled_to_full_data():
    # with batch = all rows the loss per datapoint equals the minibatch loss per datapoint of
    # a half batch in expectation; check the N / B scale directly on one trace
    x = binary_data(num_data=40)
    vae = small_vae()
    pyro.clear_param_store()
    idx = torch.arange(10)
    model = bind_rows(vae.model, idx, 40)
    trace = pyro.poutine.trace(model).get_trace(x[idx])
    assert trace.nodes["x"]["scale"] == pytest.approx(4.0)
    assert trace.nodes["z"]["scale"] == pytest.approx(4.0)


def test_model_without_row_keywords_is_scaled():
    def model(x):
        loc = pyro.param("loc", torch.zeros(x.shape[1]))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    scaled = bind_rows(model, torch.arange(5), 20)
    pyro.clear_param_store()
    trace = pyro.poutine.trace(scaled).get_trace(torch.zeros(5, 3))
    assert trace.nodes["x"]["scale"] == pytest.approx(4.0)
    # and fit finds the MLE of the mean
    x = torch.randn(200, 3) + torch.tensor([1.0, -2.0, 0.5])
    fit(model, guide, x, epochs=40, batch_size=50, lr=0.1, progress=False)
    assert torch.allclose(pyro.param("loc").detach(), x.mean(0), atol=0.05)


def test_resume_equals_uninterrupted(tmp_path):
    x = binary_data()
    kwargs = dict(batch_size=32, lr=1e-2, progress=False, seed=3)
    vae = small_vae(seed=1)
    full = fit(vae.model, vae.guide, x, epochs=4, **kwargs)

    # interrupted after 2 epochs (plus a mid-epoch checkpoint), then resumed by a fresh model
    vae = small_vae(seed=1)
    fit(vae.model, vae.guide, x, epochs=2, checkpoint_dir=tmp_path, **kwargs)
    vae = small_vae(seed=99)  # different init: everything must come from the checkpoint
    resumed = fit(vae.model, vae.guide, x, epochs=4, checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert resumed.step == full.step
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-6)
    assert resumed.epoch_losses == pytest.approx(full.epoch_losses, rel=1e-6)


def test_resume_mid_epoch(tmp_path):
    x = binary_data()
    kwargs = dict(batch_size=32, lr=1e-2, progress=False, seed=5)
    vae = small_vae()
    full = fit(vae.model, vae.guide, x, epochs=2, **kwargs)

    class Interrupt(Exception):
        pass

    vae = small_vae()
    calls = {"n": 0}

    def model(x, idx=None, num_data=None):
        calls["n"] += len(x) > 3  # steps, not fit's probe of the program on a few rows
        if calls["n"] > 6:  # die during step 6, after the checkpoint at step 5
            raise Interrupt
        return vae.model(x, idx, num_data)

    with pytest.raises(Interrupt):
        fit(model, vae.guide, x, epochs=2, checkpoint_dir=tmp_path, checkpoint_every=5, **kwargs)
    vae = small_vae(seed=7)
    resumed = fit(vae.model, vae.guide, x, epochs=2, checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-6)


def test_resume_errors(tmp_path):
    x = binary_data()
    vae = small_vae()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit(vae.model, vae.guide, x, epochs=1, checkpoint_dir=tmp_path, resume=True, progress=False)
    fit(vae.model, vae.guide, x, epochs=1, batch_size=32, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit(vae.model, vae.guide, x, epochs=2, batch_size=16, checkpoint_dir=tmp_path,
            resume=True, progress=False)


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    x = binary_data()
    vae = small_vae()
    steps = {"n": 0}

    def model(x, idx=None, num_data=None):
        steps["n"] += torch.is_grad_enabled()  # steps, not fit's probes and checks
        pyro.module("decoder", vae.decoder)
        with pyro.plate("data", num_data, subsample=idx):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            logits = vae.decoder.net(z)
            if steps["n"] == 8:  # the 8th step (epoch 2, batch 3: 5 batches an epoch) blows up
                logits = logits * float("nan")
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x)

    with pytest.raises(DivergenceError, match=r"step 8 \(epoch 2, batch 3\)"):
        fit(model, vae.guide, x, epochs=3, batch_size=24, checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["progress"]["epoch"] == 1 and state["result"]["step"] == 5
    params = state["params"]["params"]
    assert all(torch.isfinite(v).all() for v in params.values())


def test_bad_inputs():
    vae = small_vae()
    x = binary_data()
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit(vae.model, vae.guide, bad, epochs=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit(vae.model, vae.guide, x, epochs=1, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="share their first dim"):
        fit(vae.model, vae.guide, (x, x[:5]), epochs=1, progress=False)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        fit(vae.model, vae.guide, x, epochs=1, resume=True, progress=False)




def test_two_fits_in_one_process_do_not_share_params():
    x = binary_data()
    first = small_vae(seed=0)
    fit(first.model, first.guide, x, epochs=1, progress=False)
    second = small_vae(seed=1)
    before = [p.detach().clone() for p in second.parameters()]
    fit(second.model, second.guide, x, epochs=0, progress=False)
    # epochs=0 takes no step: the second model keeps its own weights, not the first one's
    assert all(torch.equal(b, p) for b, p in zip(before, second.parameters()))
    fit(second.model, second.guide, x, epochs=1, progress=False)
    names = set(pyro.get_param_store().keys())
    assert any(n.startswith("decoder$$$") for n in names)
    stored = pyro.get_param_store().get_param("decoder$$$net.0.weight")
    assert stored is second.decoder.net[0].weight


@pytest.mark.cuda
def test_fit_on_cuda_keeps_everything_there():
    x = binary_data()
    vae = small_vae()
    result = fit(vae.model, vae.guide, x, epochs=1, device="cuda", progress=False)
    assert math.isfinite(result.losses[-1])
    store = pyro.get_param_store()
    assert all(store.get_param(n).is_cuda for n in store.keys())
    assert next(vae.parameters()).is_cuda

    def model(x, idx=None, num_data=None):
        pyro.param("cpu_param", torch.zeros(3))  # created on the CPU by mistake
        vae.model(x, idx, num_data)

    with pytest.raises(RuntimeError, match="cpu_param"):
        fit(model, vae.guide, x, epochs=1, device="cuda", progress=False)


def test_nan_allowed_only_where_a_mask_says_missing():
    from ppl_lvm.train import as_batch_tuple

    x = torch.rand(4, 3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="first bad rows: \\[1\\]"):
        as_batch_tuple((x, mask), "cpu")
    mask[1, 2] = False
    assert torch.isnan(as_batch_tuple((x, mask), "cpu")[0][1, 2])
    with pytest.raises(ValueError, match="NaN"):  # a float "mask" is just data
        as_batch_tuple((x, mask.float()), "cpu")


@pytest.mark.parametrize("validate, expected", [("first_epoch", [True, False, False]),
                                                 (True, [True, True, True]),
                                                 (False, [False, False, False])])
def test_validation_runs_while_every_row_is_seen_once(validate, expected):
    x = binary_data(num_data=40)
    vae = small_vae()
    seen = []

    def model(x, idx=None, num_data=None):
        if torch.is_grad_enabled():  # a step, not fit's probes and epoch-end checks
            seen.append(pyro.infer.util.is_validation_enabled())
        vae.model(x, idx, num_data)

    fit(model, vae.guide, x, epochs=3, batch_size=20, validate=validate, progress=False)
    assert seen == [flag for flag in expected for _ in range(2)]  # two batches an epoch
    assert pyro.infer.util.is_validation_enabled()  # restored afterwards


def test_first_epoch_validation_catches_non_binary_pixels():
    x = binary_data(num_data=40)
    x[37, 0] = 0.5  # one bad pixel, in whichever batch of epoch 1 holds row 37
    vae = small_vae()
    with pytest.raises(ValueError, match="support"):
        fit(vae.model, vae.guide, x, epochs=2, batch_size=20, progress=False)
    assert pyro.infer.util.is_validation_enabled()


def test_nonfinite_rows_are_found_chunk_by_chunk():
    from ppl_lvm.train import nonfinite_rows

    x = torch.zeros(50, 3)
    x[[7, 8, 31, 49], [0, 2, 1, 0]] = torch.tensor([math.nan, math.inf, -math.inf, math.nan])
    mask = torch.ones(50, 3, dtype=torch.bool)
    mask[8, 2] = False  # a missing value, masked out, is allowed to be NaN/inf
    for chunk_elements in (1, 7, 1 << 24):  # chunks of 1 row, 2 rows, all rows
        assert nonfinite_rows(x, chunk_elements=chunk_elements) == [7, 8, 31, 49]
        assert nonfinite_rows(x, mask, chunk_elements=chunk_elements) == [7, 31, 49]
        assert nonfinite_rows(x, limit=2, chunk_elements=chunk_elements) == [7, 8]
    with pytest.raises(ValueError, match=r"first bad rows: \[7, 8, 31, 49\]"):
        fit(lambda x: None, lambda x: None, x, epochs=0, progress=False)


# fit's grouped options (Schedule, Checkpointing, Evaluation) mean exactly its flat keywords

def grouped_data(num_data=40, data_dim=6):
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(num_data, data_dim, generator=gen) < 0.3).float()


def grouped_run(epochs=2, **options):
    torch.manual_seed(0)
    vae = VAE(6, z_dim=2, hidden_dim=8)
    return fit(vae.model, vae.guide, grouped_data(), epochs=epochs, batch_size=10, progress=False,
               **options)


def test_grouped_options_take_the_same_steps_as_the_flat_keywords(tmp_path):
    flat = grouped_run(lr=2e-2, lr_schedule="cosine", eval_data=grouped_data()[:8], eval_every=2,
                       checkpoint_dir=tmp_path / "flat", checkpoint_every=3)
    grouped = grouped_run(schedule=Schedule(lr=2e-2, lr_schedule="cosine"),
                          evaluation=Evaluation(data=grouped_data()[:8], every=2),
                          checkpointing=Checkpointing(directory=tmp_path / "grouped", every=3))
    assert grouped.losses == flat.losses and len(flat.losses) == 8
    assert grouped.eval_epochs == flat.eval_epochs == [2]
    assert grouped.eval_elbos == flat.eval_elbos
    assert (tmp_path / "grouped" / "checkpoint.pt").is_file()


def test_a_group_and_its_keyword_must_agree():
    with pytest.raises(ValueError, match="lr=0.5 and Schedule"):
        grouped_run(lr=0.5, schedule=Schedule(lr=2e-2))
    grouped_run(lr=2e-2, epochs=0, schedule=Schedule(lr=2e-2))  # the same value twice is fine
    with pytest.raises(TypeError, match="Schedule"):
        grouped_run(schedule={"lr": 2e-2})
