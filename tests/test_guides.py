import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO

from ppl_lvm.data import binarize, load_digits
from ppl_lvm.estimators import log_marginal
from ppl_lvm.guides import (AmortizedGuide, LocalGuide, SemiAmortizedGuide, log_joint, refine,
                            score_function_infer)
from ppl_lvm.recipes import amortization_gaps, infer_local
from ppl_lvm.models.vae import VAE, Encoder
from ppl_lvm.plate import data_plate
from ppl_lvm.train import LOCAL_PREFIX, adam, bind_rows, fit, svi_step
from tests import closed_form


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def binary_data(num_data=60, data_dim=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.linspace(0.1, 0.9, data_dim)
    return (torch.rand(num_data, data_dim, generator=gen) < probs).float()


@pytest.fixture(scope="module")
def digits():
    x, _ = load_digits()
    return binarize(x, seed=0)


@pytest.fixture(scope="module")
def trained_vae(digits):
    torch.manual_seed(0)
    vae = VAE(digits.shape[1], z_dim=4, hidden_dim=64)
    fit(vae.model, vae.guide, digits[:1200], epochs=15, batch_size=100, lr=1e-2, progress=False)
    return vae


# ---------------------------------------------------------------------------------------------
# the local (per-datapoint) guide


def test_local_guide_rows_are_isolated_even_with_adam_momentum():
    x = binary_data(num_data=50)
    torch.manual_seed(0)
    vae = VAE(12, z_dim=3, hidden_dim=8)
    guide = LocalGuide(50, {"z": 3})
    pyro.clear_param_store()
    optim, loss = adam(local_lr=0.1), Trace_ELBO()
    for start in range(0, 50, 10):  # every row gets Adam moments
        idx = torch.arange(start, start + 10)
        svi_step(bind_rows(vae.model, idx, 50), bind_rows(guide, idx, 50), optim, loss, (x[idx],))
    table = pyro.param(guide.param_name)
    assert table.grad is None or table.grad.is_sparse
    before = table.detach().clone()
    idx = torch.tensor([3, 17, 41])
    svi_step(bind_rows(vae.model, idx, 50), bind_rows(guide, idx, 50), optim, loss, (x[idx],))
    after = pyro.param(guide.param_name).detach()
    others = torch.ones(50, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(after[others], before[others])
    assert (after[idx] != before[idx]).all(-1).all()
    assert [type(o) for o in optim._sparse.values()] == [torch.optim.SparseAdam]


def test_local_guide_reads_rows_and_samples_every_site():
    guide = LocalGuide(10, {"z": 2, "w": (2, 3)}, init_loc=0.5, init_scale=0.1)
    pyro.clear_param_store()
    x = torch.zeros(4, 5)
    trace = pyro.poutine.trace(guide).get_trace(x, idx=torch.tensor([0, 2, 4, 9]), num_data=10)
    assert trace.nodes["z"]["value"].shape == (4, 2)
    assert trace.nodes["w"]["value"].shape == (4, 2, 3)
    assert trace.nodes["w"]["fn"].event_shape == (2, 3)
    assert trace.nodes["z"]["scale"] == pytest.approx(10 / 4)
    assert guide.loc("w").shape == (10, 2, 3)
    assert torch.allclose(guide.scale("z"), torch.full((10, 2), 0.1))
    assert LOCAL_PREFIX in guide.param_name
    guide.initialize(torch.ones(2, 2), torch.full((2, 2), 2.0), site="z", rows=torch.tensor([1, 3]))
    assert torch.allclose(guide.loc("z")[[1, 3]], torch.ones(2, 2))
    assert torch.allclose(guide.scale("z")[[1, 3]], torch.full((2, 2), 2.0))
    assert torch.allclose(guide.loc("z")[0], torch.full((2,), 0.5))


def test_local_guide_refuses_new_rows():
    guide = LocalGuide(10, {"z": 2})
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="infer_local"):
        guide(torch.zeros(4, 3))
    with pytest.raises(IndexError, match="fitted on 10 rows.*infer_local"):
        guide(torch.zeros(2, 3), idx=torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="num_data=20"):
        guide(torch.zeros(2, 3), idx=torch.tensor([3, 4]), num_data=20)
    with pytest.raises(ValueError, match="site_shapes"):
        LocalGuide(10, {})


def linear_gaussian(weight, bias, noise):
    """z ~ N(0, I), x | z ~ N(W z + b, σ² I): the exact posterior is Gaussian."""
    def model(x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], weight.shape[1]), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight.T + bias, noise).to_event(1), obs=x)
    return model


def test_local_guide_reaches_the_closed_form_mean_field_optimum():
    # for a Gaussian posterior N(m, Λ⁻¹) the best diagonal Gaussian has mean m and variances
    # 1 / Λ_jj: Λ = I + WᵀW / σ², m_i = Λ⁻¹ Wᵀ (x_i - b) / σ²
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 2, generator=gen)
    bias, noise = torch.tensor([0.5, -1.0, 0.0]), 0.7
    x = torch.randn(40, 3, generator=gen) * 2
    precision = torch.eye(2) + weight.T @ weight / noise ** 2
    mean = torch.linalg.solve(precision, weight.T @ (x - bias).T / noise ** 2).T
    scale = precision.diagonal().rsqrt()
    model = linear_gaussian(weight, bias, noise)
    pyro.clear_param_store()
    loss = Trace_ELBO(num_particles=32, vectorize_particles=True, max_plate_nesting=1)
    guide = infer_local(model, x, site_shapes={"z": 2}, steps=250, lr=0.05, loss=loss)
    assert torch.allclose(guide.loc(), mean, atol=0.03)
    assert torch.allclose(guide.scale(), scale.expand(40, 2), rtol=0.05)
    # joint SVI through fit, on minibatches, gets there too (here θ is empty)
    guide = LocalGuide(40, {"z": 2})
    fit(model, guide, x, epochs=150, batch_size=10, local_lr=0.03, progress=False, loss=loss)
    assert torch.allclose(guide.loc(), mean, atol=0.1)
    assert torch.allclose(guide.scale(), scale.expand(40, 2), rtol=0.15)


def test_inner_loop_raises_each_batch_elbo_before_the_theta_step(digits):
    torch.manual_seed(0)
    x = digits[:300]
    vae = VAE(x.shape[1], z_dim=2, hidden_dim=32)
    guide = LocalGuide(300, {"z": 2})
    result = fit(vae.model, guide, x, epochs=2, batch_size=50, lr=1e-2, local_lr=0.1,
                 inner_steps=8, progress=False, loss=Trace_ELBO(num_particles=4))
    gains = torch.tensor(result.inner_gains)
    assert len(gains) == result.step == 12
    assert (gains > 0).float().mean() > 0.8
    assert gains.mean() > 0.1


def test_inner_steps_hold_theta_fixed_and_theta_step_holds_phi_fixed():
    x = binary_data(num_data=20)
    torch.manual_seed(0)
    vae = VAE(12, z_dim=2, hidden_dim=8)
    guide = LocalGuide(20, {"z": 2})
    decoder_before = [p.detach().clone() for p in vae.decoder.parameters()]
    fit(vae.model, guide, x, epochs=1, batch_size=20, inner_steps=3, progress=False, lr=0.0)
    # lr = 0 freezes θ: only the three inner steps moved φ
    assert all(torch.equal(a, b) for a, b in zip(decoder_before, vae.decoder.parameters()))
    assert not torch.equal(guide.loc(), torch.zeros(20, 2))
    with pytest.raises(ValueError, match="inner_steps"):
        fit(vae.model, guide, x, epochs=1, inner_steps=-1, progress=False)


def test_local_tables_save_and_resume_exactly(tmp_path):
    x = binary_data(num_data=40)

    def run(epochs, resume=False):
        torch.manual_seed(0)
        vae = VAE(12, z_dim=2, hidden_dim=8)
        guide = LocalGuide(40, {"z": 2})
        fit(vae.model, guide, x, epochs=epochs, batch_size=16, lr=1e-2, progress=False,
            inner_steps=2, checkpoint_dir=tmp_path / ("b" if resume or epochs == 1 else "a"),
            resume=resume)
        return guide.loc().clone(), guide.scale().clone(), [p.detach().clone() for p in vae.parameters()]

    loc, scale, params = run(3)
    run(1)
    loc2, scale2, params2 = run(3, resume=True)
    assert torch.equal(loc, loc2) and torch.equal(scale, scale2)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert any(name.startswith(LOCAL_PREFIX) for name in state["optim"])


# ---------------------------------------------------------------------------------------------
# amortized and semi-amortized guides


def test_amortized_guide_takes_any_encoder():
    x = binary_data(num_data=40)
    torch.manual_seed(0)
    vae = VAE(12, z_dim=2, hidden_dim=8)
    encoder = Encoder(12, z_dim=2, hidden_dim=(16, 16))
    guide = AmortizedGuide(encoder, name="my_encoder")
    pyro.clear_param_store()
    trace = pyro.poutine.trace(guide).get_trace(x[:5])
    assert trace.nodes["z"]["value"].shape == (5, 2)
    assert "my_encoder$$$net.0.weight" in trace.nodes
    result = fit(vae.model, guide, x, epochs=20, batch_size=20, lr=1e-2, progress=False)
    assert result.epoch_losses[-1] < result.epoch_losses[0]


def test_log_joint_is_the_model_density_per_datapoint():
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(3, 2, generator=gen), torch.zeros(3)
    model = linear_gaussian(weight, bias, 0.5)
    x, z = torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)
    expected = (dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
                + dist.Normal(z @ weight.T + bias, 0.5).log_prob(x).sum(-1))
    assert torch.allclose(log_joint(model, {"z": z}, x, idx=torch.arange(4), num_data=100), expected)
    with pytest.raises(ValueError, match="latent site 'z'"):
        log_joint(model, {}, x)


def test_refine_climbs_the_elbo_and_can_backpropagate_to_the_encoder(trained_vae, digits):
    vae = trained_vae
    x = digits[1200:1300]
    loc, scale = vae.encoder(x)
    refined_loc, refined_scale = refine(vae.model, x, loc, scale, steps=5, lr=0.05, unroll=True)
    refined_loc.sum().backward()
    assert vae.encoder.net[0].weight.grad.abs().sum() > 0
    vae.encoder.zero_grad()
    loc, scale = vae.encoder(x)
    first_order, _ = refine(vae.model, x, loc, scale, steps=5, lr=0.05)
    first_order.sum().backward()  # straight through: d loc_S / d loc_0 = I
    assert vae.encoder.net[0].weight.grad.abs().sum() > 0
    vae.encoder.zero_grad()


def test_semi_amortized_elbo_is_at_least_the_amortized_one(trained_vae, digits):
    vae = trained_vae
    x = digits[1200:1400]
    amortized = log_marginal(vae.model, vae.guide, x, method="elbo", num_samples=200, seed=0)
    semi = SemiAmortizedGuide(vae.model, vae.encoder, steps=10, lr=0.2, num_particles=8)
    pyro.set_rng_seed(0)
    refined = log_marginal(vae.model, semi, x, method="elbo", num_samples=200, seed=0)
    gain = refined - amortized
    assert gain.mean() > 3 * gain.std() / math.sqrt(len(gain))
    assert gain.mean() > 0.05


def test_semi_amortized_guide_trains_a_vae(digits):
    torch.manual_seed(0)
    x = digits[:400]
    vae = VAE(x.shape[1], z_dim=2, hidden_dim=32)
    guide = SemiAmortizedGuide(vae.model, vae.encoder, steps=3, num_particles=2)
    result = fit(vae.model, guide, x, epochs=4, batch_size=100, lr=1e-2, progress=False)
    assert result.epoch_losses[-1] < result.epoch_losses[0] - 2


# ---------------------------------------------------------------------------------------------
# new rows, gaps


def test_infer_local_fits_new_rows_with_theta_fixed(trained_vae, digits):
    vae = trained_vae
    x_new = digits[1300:1350]
    before = [p.detach().clone() for p in vae.parameters()]
    guide = infer_local(vae.model, x_new, encoder=vae.encoder, steps=100, lr=0.03)
    assert all(torch.equal(a, b) for a, b in zip(before, vae.parameters()))
    assert all(p.requires_grad for p in vae.parameters())
    assert guide.num_data == 50 and guide.loc().shape == (50, 4)
    rows = torch.arange(50)
    local = log_marginal(vae.model, guide, x_new, method="elbo", num_samples=100, seed=0, idx=rows)
    amortized = log_marginal(vae.model, vae.guide, x_new, method="elbo", num_samples=100, seed=0)
    assert local.mean() > amortized.mean()
    # without an encoder the latent sites and their shapes are read from the model's trace
    assert infer_local(vae.model, x_new, steps=1).site_shapes == {"z": torch.Size([4])}


def test_gaps_are_nonnegative_up_to_monte_carlo_error(trained_vae, digits):
    vae = trained_vae
    x = digits[1400:1500]
    gaps = amortization_gaps(vae.model, vae.guide, x, num_samples=300, elbo_samples=100,
                             local_steps=150, local_lr=0.03)
    summary = gaps.summary()
    assert summary["approximation_gap"] > -3 * summary["approximation_gap_stderr"]
    assert summary["amortization_gap"] > -3 * summary["amortization_gap_stderr"]
    assert summary["log_px"] >= summary["elbo_optimal"] - 0.05
    assert gaps.inference_gap == pytest.approx(gaps.approximation_gap + gaps.amortization_gap)
    assert "amortization gap" in str(gaps)
    with pytest.raises(ValueError, match="proposal"):
        amortization_gaps(vae.model, vae.guide, x, proposal="prior")


# ---------------------------------------------------------------------------------------------
# discrete latents: score-function gradients


def test_baseline_lowers_the_variance_of_score_function_gradients():
    # z ~ Bernoulli(0.5), x | z ~ N(3 z + 20, 1): log p(x, z) is about -200, a large offset the
    # score function multiplies; a baseline removes it without changing the expectation
    x = torch.tensor([21.0, 23.0, 20.5, 22.0])

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(3 * z + 20.0, 1.0), obs=x)

    def make_guide(infer):
        def guide(x):
            logits = pyro.param("logits", torch.zeros(len(x)))
            with pyro.plate("data", len(x)):
                pyro.sample("z", dist.Bernoulli(logits=logits), infer=infer)
        return guide

    def gradients(infer, num=150):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide, elbo, grads = make_guide(infer), TraceGraph_ELBO(), []
        for _ in range(num):
            elbo.loss_and_grads(model, guide, x)
            logits = pyro.param("logits").unconstrained()
            grads.append(logits.grad.clone())
            logits.grad = None
        return torch.stack(grads[30:])  # after the moving average has warmed up

    plain = gradients(score_function_infer(None))
    baseline = gradients(score_function_infer("decaying_average", beta=0.9))
    assert score_function_infer(None) == {}
    assert torch.allclose(plain.mean(0), baseline.mean(0), atol=4 * plain.std(0).max() / math.sqrt(120))
    assert (baseline.var(0) < plain.var(0) / 20).all()
    with pytest.raises(ValueError, match="unknown baseline"):
        score_function_infer("average")


def test_gaps_command(tmp_path, capsys):
    import json

    from ppl_lvm.cli import main
    from ppl_lvm.runs import save_run

    out = tmp_path / "run"
    torch.manual_seed(0)
    data = {"name": "digits", "path": None, "test_fraction": 0.2, "split_seed": 0, "binarize": True}
    save_run(out, "vae", VAE(64, z_dim=2, hidden_dim=16), {"data": data})
    assert main(["gaps", str(out), "-K", "50", "--n", "20", "--elbo-samples", "10",
                 "--local-steps", "20"]) == 0
    printed = capsys.readouterr().out
    assert "amortization gap" in printed and "approximation gap" in printed
    summary = json.loads((out / "gaps.json").read_text())
    assert summary["num_data"] == 20 and summary["num_samples"] == 50
    assert main(["gaps", str(tmp_path / "missing")]) == 2


@pytest.mark.cuda
def test_local_guide_on_cuda():
    x = binary_data(num_data=40).cuda()
    torch.manual_seed(0)
    vae = VAE(12, z_dim=2, hidden_dim=8)
    guide = LocalGuide(40, {"z": 2})
    result = fit(vae.model, guide, x, epochs=3, batch_size=16, inner_steps=2, device="cuda",
                 progress=False)
    assert pyro.param(guide.param_name).device.type == "cuda"
    assert len(result.inner_gains) == result.step
    new = infer_local(vae.model, x[:5], site_shapes={"z": 2}, steps=5)
    assert new.loc().device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# non-amortized SVI that converges (issue 14)


def _linear_gaussian(num_data=16, seed=0):
    """z ~ N(0, I_2), x | z ~ N(W z, 0.5² I_4): the posterior is N(P⁻¹ Wᵀx / σ², P⁻¹) with
    P = I + WᵀW / σ², so the mean-field optimum has means P⁻¹Wᵀx / σ² and scales diag(P)^-½."""
    gen = torch.Generator().manual_seed(seed)
    weight, sigma = torch.randn(4, 2, generator=gen), 0.5
    x = torch.randn(num_data, 2, generator=gen) @ weight.T + sigma * torch.randn(num_data, 4,
                                                                                  generator=gen)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight.T, sigma).to_event(1), obs=x)
    precision = torch.eye(2) + weight.T @ weight / sigma**2
    mean = torch.linalg.solve(precision, weight.T @ x.T / sigma**2).T
    return model, x, mean, precision.diagonal().rsqrt()


def test_local_guide_reaches_the_mean_field_optimum_with_a_decaying_step():
    model, x, mean, scale = _linear_gaussian()
    loss = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    errors = {}
    for schedule, epochs in (("constant", 150), ("constant", 600), ("cosine", 150),
                             ("cosine", 600)):
        guide = LocalGuide(len(x), {"z": 2}, refine_after_fit=False)  # SGD alone
        fit(model, guide, x, epochs=epochs, batch_size=8, local_lr=0.1, lr_schedule=schedule,
            loss=loss, progress=False, seed=0)
        errors[schedule, epochs] = ((guide.loc() - mean).abs().max().item(),
                                    (guide.scale() / scale - 1).abs().max().item())
    mean_error, scale_error = errors["cosine", 600]
    assert mean_error < 0.04 and scale_error < 0.06, errors
    # more epochs bring it closer, where a constant step stays at its noise floor
    assert errors["cosine", 600][0] < errors["cosine", 150][0]
    assert errors["constant", 600][0] > 3 * mean_error and errors["constant", 600][1] > 2 * scale_error


# ---------------------------------------------------------------------------------------------
# per-datapoint inference that converges and says so (closed form: tests/closed_form.py)


def _errors(guide, x):
    """max |μ_i - m_i| and max |σ_i / σ*_j - 1| against the mean-field optimum q*."""
    loc_error = (guide.loc() - closed_form.posterior_mean(x)).abs().max().item()
    scale_error = (guide.scale() / closed_form.optimal_scale() - 1).abs().max().item()
    return loc_error, scale_error


@pytest.mark.parametrize("start", ["prior", "encoder"])
def test_infer_local_defaults_reach_the_mean_field_optimum_and_say_so(start):
    """Defaults only: loc error < 0.02 and scale error < 3 % (before: 2.59 and 201 % from N(0, 1),
    0.20 and 24 % from an encoder), every row reported converged."""
    x = closed_form.make_data(50)
    pyro.clear_param_store()
    encoder = closed_form.encoder if start == "encoder" else None
    guide = infer_local(closed_form.model, x, encoder=encoder)
    loc_error, scale_error = _errors(guide, x)
    assert loc_error < 0.02 and scale_error < 0.03
    assert guide.converged.shape == (50,) and guide.converged.all()
    assert (guide.convergence.residual < 1e-3).all() and guide.convergence.num_steps.max() <= 200
    assert "50/50 rows converged" in str(guide.convergence)


def test_infer_local_says_which_rows_did_not_converge():
    x = closed_form.make_data(8)
    pyro.clear_param_store()
    with pytest.warns(RuntimeWarning, match="did not converge"):
        guide = infer_local(closed_form.model, x, steps=1)
    assert not guide.converged.all()
    # the measurement alone agrees with the solver's own: a converged table measures converged
    from ppl_lvm.guides import local_convergence
    done = infer_local(closed_form.model, x, name="done")  # its own table
    assert local_convergence(closed_form.model, done, x).converged.all()
    assert not local_convergence(closed_form.model, guide, x).converged.all()


def test_fit_with_a_local_guide_ends_at_the_mean_field_optimum_and_reports_it():
    """fit + LocalGuide at defaults, 300 epochs: before, loc error 1.42 and scale error 141 %
    with nothing said; now φ_i are taken to q* for the final θ at the end and the result says
    so. With refine_after_fit=False, fit only measures them and warns."""
    x = closed_form.make_data(50)
    guide = LocalGuide(50, {"z": 2})
    result = fit(closed_form.model, guide, x, epochs=300, progress=False)
    loc_error, scale_error = _errors(guide, x)
    assert loc_error < 0.02 and scale_error < 0.03
    assert result.local_convergence.converged.all()
    guide = LocalGuide(50, {"z": 2}, refine_after_fit=False)
    with pytest.warns(RuntimeWarning, match="have not all converged"):
        result = fit(closed_form.model, guide, x, epochs=5, progress=False)
    assert not result.local_convergence.converged.all()


@pytest.mark.parametrize("start", ["encoder", "prior"])
def test_gaps_equal_their_closed_forms_with_monte_carlo_errors(start):
    """Defaults only. Before: approximation gap 0.288 and amortization gap 0.693 with an encoder
    start, 3.62 and -2.65 without one (closed forms 0.269 and 0.683). log p(x) pools both
    proposals' weights; each gap comes with its Monte Carlo standard error."""
    x = closed_form.make_data(50)
    approximation, amortization = closed_form.gaps(x)
    encoder = closed_form.encoder if start == "encoder" else None
    gaps = amortization_gaps(closed_form.model, closed_form.amortized_guide, x, encoder=encoder,
                             site_shapes={"z": 2})
    assert gaps.approximation_gap == pytest.approx(approximation, abs=0.02)
    assert gaps.amortization_gap == pytest.approx(amortization, abs=0.02)
    assert gaps.optimal_converged.all() and not gaps.negative_amortization_gap
    assert 0 < gaps.approximation_gap_mc_stderr < 0.01 and 0 < gaps.amortization_gap_mc_stderr < 0.02
    assert (gaps.log_px - closed_form.log_px(x)).abs().mean() < 0.02
    assert gaps.log_px_stderr.shape == (50,) and (gaps.log_px_stderr < 0.1).all()
    summary = gaps.summary()
    assert summary["proposal"] == "pooled" and summary["num_converged"] == 50
    assert "MC ±" in str(gaps) and "NEGATIVE" not in str(gaps)


def test_a_negative_amortization_gap_is_flagged_loudly():
    """With the exact (correlated) posterior as the 'amortized' guide, ELBO(q_a) = log p(x) >
    ELBO(q*): the amortization gap is -0.269 (minus the closed-form approximation gap), which no
    amortized q inside q*'s family could give; it is flagged, not reported silently."""
    x = closed_form.make_data(30)
    approximation, _ = closed_form.gaps(x)
    with pytest.warns(RuntimeWarning, match="negative beyond 3 Monte Carlo errors"):
        gaps = amortization_gaps(closed_form.model, closed_form.exact_guide, x,
                                 site_shapes={"z": 2}, num_samples=1000, elbo_samples=400)
    assert gaps.negative_amortization_gap
    assert gaps.amortization_gap == pytest.approx(-approximation, abs=0.03)
    assert "NEGATIVE AMORTIZATION GAP" in str(gaps)


def test_gaps_are_not_reported_over_rows_whose_q_star_did_not_converge():
    x = closed_form.make_data(10)
    with pytest.warns(RuntimeWarning, match="q\\* did not converge"):
        gaps = amortization_gaps(closed_form.model, closed_form.amortized_guide, x,
                                 site_shapes={"z": 2}, local_steps=1, num_samples=200,
                                 elbo_samples=50)
    assert not gaps.optimal_converged.all()
    assert "NOT CONVERGED" in str(gaps)
    rows = gaps.optimal_converged
    expected = (gaps.elbo_optimal - gaps.elbo_amortized)[rows].mean().item() if rows.any() else math.nan
    assert gaps.amortization_gap == pytest.approx(expected, nan_ok=True)


def test_pooled_log_px_is_unbiased_where_the_per_row_max_is_not():
    """Pooling the two proposals' weights (a deterministic mixture) estimates p(x) without bias;
    the per-row max of two IWAE estimates ("best", the old default) is biased upward. Over many
    independent copies of 5 rows at small K, the max sits above the pooled estimate."""
    x = closed_form.make_data(5).repeat(40, 1)
    common = dict(site_shapes={"z": 2}, encoder=closed_form.encoder, num_samples=20,
                  elbo_samples=10)
    pooled = amortization_gaps(closed_form.model, closed_form.amortized_guide, x, **common)
    best = amortization_gaps(closed_form.model, closed_form.amortized_guide, x,
                             proposal="best", **common)
    truth = closed_form.log_px(x)
    pooled_error = (pooled.log_px.double() - truth).mean().item()
    best_error = (best.log_px.double() - truth).mean().item()
    pooled_stderr = (pooled.log_px.double() - truth).std().item() / math.sqrt(len(x))
    assert abs(pooled_error) < 4 * pooled_stderr + 0.01
    assert best_error > pooled_error + 0.01


def test_pooled_log_px_with_a_semi_amortized_guide_scores_each_draw_under_its_own_noise():
    """A SemiAmortizedGuide refines with noise of its own: its density at a draw is the one its
    refinement had when it drew. Scored so, the pooled estimate of log p(x) is the closed form."""
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            loc, scale = closed_form.encoder(x)
            return loc + 0 * self.unused, scale

    x = closed_form.make_data(40)
    semi = SemiAmortizedGuide(closed_form.model, Encoder(), steps=2, lr=0.2, num_particles=2)
    gaps = amortization_gaps(closed_form.model, semi, x, encoder=closed_form.encoder,
                             num_samples=2000, elbo_samples=200)
    error = (gaps.log_px - closed_form.log_px(x)).mean().item()
    assert abs(error) < 4 * gaps.summary()["log_px_mc_stderr"] + 0.01


def plates_of_equal_size_model(second):
    """z_i ~ N(0, 1) in plate "rows" (dim -2), x_ij | z_i ~ N(z_i, 1) in a second plate ``second``
    over the D columns (dim -1): with D equal to the batch, both plates are as long as the rows."""

    def model(x):
        with pyro.plate("rows", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))  # [B, 1]
            with pyro.plate(second, x.shape[1], dim=-1):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    return model


@pytest.mark.parametrize("second", ["features", "data"])
def test_log_joint_reads_the_data_plate_where_another_plate_has_the_batchs_size(second):
    # closed form: log p(x_i, z_i) = log N(z_i; 0, 1) + Σ_j log N(x_ij; z_i, 1)
    from ppl_lvm.guides import data_plate_name

    model = plates_of_equal_size_model(second)
    x, z = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), torch.randn(4, 1)
    exact = (dist.Normal(0.0, 1.0).log_prob(z[:, 0])
             + dist.Normal(z, 1.0).log_prob(x).sum(-1))
    assert data_plate_name(model, x) == "rows"
    torch.testing.assert_close(log_joint(model, {"z": z}, x, plate_name="rows"), exact)
    # the size match alone cannot tell the plates apart: refused, or (a plate named "data") misread
    if second == "data":
        assert not torch.allclose(log_joint(model, {"z": z}, x), exact)
    else:
        with pytest.raises(ValueError, match="several plates"):
            log_joint(model, {"z": z}, x)


@pytest.mark.parametrize("second", ["features", "data"])
def test_refine_and_the_semi_amortized_guide_reach_the_posterior_with_a_second_plate(second):
    # N = 2 rows of D = 32 columns, 16 particles: the model sees 2 · 16 = 32 rows, as many as
    # columns. Exact posterior: z_i | x_i ~ N(Σ_j x_ij / (D + 1), 1 / (D + 1)).
    model = plates_of_equal_size_model(second)
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(1)) + 1.0
    post_loc, post_scale = x.sum(-1, keepdim=True) / 33, torch.full((2, 1), 33 ** -0.5)

    class Start(torch.nn.Module):
        def forward(self, x):
            return x.new_zeros(x.shape[0], 1), x.new_ones(x.shape[0], 1)

    torch.manual_seed(0)
    loc, scale = refine(model, x, *Start()(x), steps=200, num_particles=16)
    torch.testing.assert_close(loc, post_loc, atol=0.02, rtol=0)
    torch.testing.assert_close(scale, post_scale, atol=0.0, rtol=0.05)
    guide = SemiAmortizedGuide(model, Start(), steps=200, num_particles=16, event_dim=1)
    torch.manual_seed(0)
    site = pyro.poutine.trace(guide).get_trace(x).nodes["z"]
    assert guide.plate_name == "rows"
    torch.testing.assert_close(site["fn"].base_dist.loc, post_loc, atol=0.02, rtol=0)
    torch.testing.assert_close(site["fn"].base_dist.scale, post_scale, atol=0.0, rtol=0.05)
