"""log p(x) estimators against closed forms: PPCA (linear-Gaussian) and a small Gaussian mixture."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_lvm import estimators
from ppl_lvm.estimators import (
    METHODS, SEED_BLOCK_ROWS, IWAE_ELBO, _plan, _RunningWeights, estimate_log_marginal,
    log_marginal,
)
from ppl_lvm.models.ppca import PPCA
from ppl_lvm.plate import data_plate

DATA_DIM, Z_DIM, NUM_DATA = 5, 2, 40


pytestmark = pytest.mark.usefixtures("fresh_param_store")


@pytest.fixture
def ppca():
    generator = torch.Generator().manual_seed(0)
    model = PPCA(torch.randn(DATA_DIM, Z_DIM, generator=generator),
                 torch.randn(DATA_DIM, generator=generator), 0.5)
    with torch.no_grad():
        z = torch.randn(NUM_DATA, Z_DIM, generator=generator)
        x = z @ model.weight.T + model.bias + 0.5 * torch.randn(NUM_DATA, DATA_DIM,
                                                                generator=generator)
    return model, x


def worse_guide(ppca_model):
    """q(z | x): the exact posterior's mean shrunk by 30%, its scale 1.5 times (a poor proposal)."""
    def guide(x, idx=None, num_data=None):
        loc, scale_tril = ppca_model.exact_posterior(x)
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.MultivariateNormal(0.7 * loc, scale_tril=1.5 * scale_tril))
    return guide


# ---------------------------------------------------------------------------------------------
# PPCA: log p(x) = log N(x; b, W Wᵀ + σ² I)


def test_exact_posterior_guide_gives_the_truth_for_every_k(ppca):
    model, x = ppca
    truth = model.log_marginal_exact(x).detach()
    for num_samples in (1, 10, 100):
        estimate = log_marginal(model.model, model.guide, x, num_samples=num_samples, seed=0)
        assert estimate.shape == (NUM_DATA,)
        assert torch.allclose(estimate, truth, atol=1e-4)


def test_bounds_are_ordered_and_converge(ppca):
    model, x = ppca
    guide = worse_guide(model)
    truth = model.log_marginal_exact(x).detach().mean().item()

    def mean(method, num_samples, seed=0):
        return log_marginal(model.model, guide, x, method=method, num_samples=num_samples,
                            seed=seed).mean().item()

    elbo, iwae_1 = mean("elbo", 1), mean("iwae", 1)
    assert iwae_1 == pytest.approx(elbo, abs=1e-5)  # IWAE_1 is the ELBO, draw for draw
    elbo_many = mean("elbo", 1000)
    iwae_10, iwae_100, iwae_1000 = mean("iwae", 10), mean("iwae", 100), mean("iwae", 1000)
    assert elbo_many < iwae_10 < iwae_100 < iwae_1000 <= truth + 0.01
    assert mean("elbo", 2000, seed=1) == pytest.approx(elbo_many, abs=0.1)  # no gain from K
    assert iwae_1000 == pytest.approx(truth, abs=0.05)
    assert mean("is", 1000) == pytest.approx(iwae_1000, abs=1e-6)  # "is" is "iwae"


def test_prior_monte_carlo_converges_slowly(ppca):
    model, x = ppca
    truth = model.log_marginal_exact(x).detach()
    few = log_marginal(model.model, None, x, method="prior", num_samples=10, seed=0)
    many = log_marginal(model.model, None, x, method="prior", num_samples=5000, seed=0)
    assert few.mean() < many.mean() <= truth.mean() + 0.05
    assert (many - truth).abs().mean() < (few - truth).abs().mean()


def test_result_gives_mean_stderr_and_ess_in_1_k(ppca):
    model, x = ppca
    result = estimate_log_marginal(model.model, worse_guide(model), x, num_samples=50, seed=0)
    assert result.log_px.shape == result.ess.shape == (NUM_DATA,)
    assert result.mean == pytest.approx(result.log_px.mean().item())
    assert result.stderr == pytest.approx(result.log_px.std().item() / math.sqrt(NUM_DATA))
    assert (result.ess >= 1).all() and (result.ess <= 50).all()
    assert result.ess.min() < 50  # a poor proposal wastes samples ...
    exact = estimate_log_marginal(model.model, model.guide, x, num_samples=50, seed=0)
    assert torch.allclose(exact.ess, torch.full_like(exact.ess, 50.0), rtol=1e-3)  # ... q = p(z|x) none


def test_same_seed_same_answer_whatever_the_chunk_size(ppca):
    model, x = ppca
    x = torch.cat([x, x, x])  # 120 rows: several seed blocks
    guide = worse_guide(model)
    runs = [log_marginal(model.model, guide, x, num_samples=20, seed=7, chunk_size=chunk_size)
            for chunk_size in (None, 1, 7, SEED_BLOCK_ROWS, 1000)]
    for run in runs[1:]:
        assert torch.equal(run, runs[0])
    other = log_marginal(model.model, guide, x, num_samples=20, seed=8)
    assert not torch.equal(other, runs[0])
    # a seeded call leaves the global RNG alone
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    log_marginal(model.model, guide, x, num_samples=5, seed=1)
    assert torch.equal(torch.rand(1), expected)


def test_particles_are_chunked_when_k_exceeds_the_memory_budget(ppca):
    model, x = ppca
    rows, particles = _plan(NUM_DATA, 5000, None, None, memory_bytes=10**5, bytes_per_unit=100)
    assert rows == 1 and particles == 1000
    truth = model.log_marginal_exact(x).detach()
    estimate = log_marginal(model.model, model.guide, x[:6], num_samples=3000, memory_bytes=10**5)
    assert torch.allclose(estimate, truth[:6], atol=1e-4)
    # partial log-sum-exps combine to the whole one
    log_weights = torch.randn(30, 4) * 5
    running = _RunningWeights()
    for part in log_weights.split(7):
        running.add(part)
    whole = _RunningWeights()
    whole.add(log_weights)
    assert torch.allclose(running.log_mean_weight(), whole.log_mean_weight())
    assert torch.allclose(running.ess(), whole.ess())
    assert torch.allclose(running.elbo(), log_weights.mean(0))


def test_unscaled_log_probs_ignore_num_data_scaling_and_annealing(ppca):
    model, x = ppca
    truth = model.log_marginal_exact(x).detach()

    def scaled_model(x):
        with pyro.poutine.scale(scale=0.1):  # KL annealing must not leak into evaluation
            model.model(x, num_data=10 * x.shape[0])

    def scaled_guide(x):
        model.guide(x, num_data=10 * x.shape[0])

    estimate = log_marginal(scaled_model, scaled_guide, x, num_samples=10)
    assert torch.allclose(estimate, truth, atol=1e-4)


def test_masked_sites_drop_out(ppca):
    ppca_model, x = ppca
    weight, bias = ppca_model.weight.detach(), ppca_model.bias.detach()

    def masked_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight.T + bias, 0.5).to_event(1), obs=x)
            with pyro.poutine.mask(mask=torch.tensor(False)):  # would add -5000 nats unmasked
                pyro.sample("noise", dist.Normal(0.0, 1.0), obs=torch.full((x.shape[0],), 100.0))

    estimate = log_marginal(masked_model, ppca_model.guide, x, num_samples=3)
    assert torch.allclose(estimate, ppca_model.log_marginal_exact(x).detach(), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# a Pyro-example-style model: model(x), its own plate, no idx / num_data

def test_pyro_example_style_model_without_idx_or_num_data(ppca):
    ppca_model, x = ppca
    weight, bias = ppca_model.weight.detach(), ppca_model.bias.detach()

    def model(data):
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("latent", dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z @ weight.T + bias, 0.5).to_event(1), obs=data)

    def guide(data):
        loc, scale_tril = ppca_model.exact_posterior(data)
        with pyro.plate("data", data.shape[0]):
            pyro.sample("latent", dist.MultivariateNormal(loc.detach(),
                                                          scale_tril=scale_tril.detach()))

    estimate = log_marginal(model, guide, x, num_samples=7, seed=0)
    assert torch.allclose(estimate, ppca_model.log_marginal_exact(x).detach(), atol=1e-4)


def test_non_vectorisable_model_falls_back_to_a_loop_with_a_warning(ppca):
    ppca_model, x = ppca
    weight, bias = ppca_model.weight.detach(), ppca_model.bias.detach()

    def model(data):
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1))
            z = z.view(data.shape[0], Z_DIM)  # assumes no extra batch dims: breaks with K
            pyro.sample("x", dist.Normal(z @ weight.T + bias, 0.5).to_event(1), obs=data)

    with pytest.warns(RuntimeWarning, match="loop over particles"):
        estimate = log_marginal(model, ppca_model.guide, x, num_samples=4)
    assert torch.allclose(estimate, ppca_model.log_marginal_exact(x).detach(), atol=1e-4)


def test_per_datapoint_guide_gets_its_rows_indices(ppca):
    model, x = ppca
    loc, scale_tril = model.exact_posterior(x)
    loc = loc.detach()
    seen = []

    def local_guide(x, idx=None, num_data=None):
        assert num_data is None  # never scaled at evaluation
        seen.append(idx)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc[idx], scale_tril=scale_tril.detach()))

    estimate = log_marginal(model.model, local_guide, x, num_samples=3, chunk_size=16)
    assert torch.allclose(estimate, model.log_marginal_exact(x).detach(), atol=1e-4)
    assert torch.equal(torch.cat(seen[-3:]), torch.arange(NUM_DATA))
    # a subset of rows with their own indices
    rows = torch.tensor([5, 17, 30])
    estimate = log_marginal(model.model, local_guide, x[rows], idx=rows, num_samples=3)
    assert torch.allclose(estimate, model.log_marginal_exact(x[rows]).detach(), atol=1e-4)


def test_tensor_keywords_are_sliced_with_x(ppca):
    model, x = ppca
    weights = torch.linspace(0.5, 2.0, NUM_DATA)

    def weighted_model(x, row_scale):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(torch.zeros(DATA_DIM), row_scale[:, None]).to_event(1),
                        obs=x)

    def prior_guide(x, row_scale):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1))

    # declared per-row: each chunk of 8 rows gets its 8 scales
    estimate = log_marginal(weighted_model, prior_guide, x, num_samples=2, chunk_size=8,
                            row_scale=weights, per_row=("row_scale",))
    expected = dist.Normal(0.0, weights[:, None]).log_prob(x).sum(-1)
    assert torch.allclose(estimate, expected, atol=1e-4)
    # undeclared, its N rows are a coincidence to the package: a call that splits rows refuses
    with pytest.raises(ValueError, match="'row_scale' has 40 rows"):
        log_marginal(weighted_model, prior_guide, x, num_samples=2, chunk_size=8,
                     row_scale=weights)
    # unsplit, it is passed whole, which is the same thing
    whole = log_marginal(weighted_model, prior_guide, x, num_samples=2, row_scale=weights)
    assert torch.allclose(whole, expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# a small Gaussian mixture: log p(x) = log Σ_c π_c N(x; μ_c, σ² I)

MIX_WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
MIX_LOCS = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
MIX_SCALE = 0.7


def mixture_model(x, idx=None, num_data=None):
    with data_plate(x, idx, num_data):
        z = pyro.sample("z", dist.Categorical(MIX_WEIGHTS))
        pyro.sample("x", dist.Normal(MIX_LOCS[z], MIX_SCALE).to_event(1), obs=x)


def mixture_joint(x):
    """log π_c + log N(x; μ_c, σ² I): [N, C]."""
    return MIX_WEIGHTS.log() + dist.Normal(MIX_LOCS, MIX_SCALE).to_event(1).log_prob(x[:, None])


def mixture_proposal(x, idx=None, num_data=None):
    """q(z | x): the exact posterior, tempered to be flatter (a proposal, not the truth)."""
    with data_plate(x, idx, num_data):
        pyro.sample("z", dist.Categorical(logits=0.5 * mixture_joint(x)))


@pytest.fixture
def mixture_data():
    generator = torch.Generator().manual_seed(1)
    z = torch.multinomial(MIX_WEIGHTS, 60, replacement=True, generator=generator)
    return MIX_LOCS[z] + MIX_SCALE * torch.randn(60, 2, generator=generator)


def test_exact_enumeration_matches_the_closed_form(mixture_data):
    truth = mixture_joint(mixture_data).logsumexp(-1)
    result = estimate_log_marginal(mixture_model, None, mixture_data, method="exact", chunk_size=25)
    assert torch.allclose(result.log_px, truth, atol=1e-5)
    assert torch.isnan(result.ess).all()


def test_iwae_and_uniform_converge_to_the_exact_mixture_marginal(mixture_data):
    truth = mixture_joint(mixture_data).logsumexp(-1)
    iwae = log_marginal(mixture_model, mixture_proposal, mixture_data, num_samples=2000, seed=0)
    uniform = log_marginal(mixture_model, None, mixture_data, method="uniform",
                           num_samples=2000, seed=0)
    assert (iwae - truth).abs().max() < 0.05
    assert (uniform - truth).abs().max() < 0.1
    # with one draw, "uniform" is |Z| p(x, z) for a uniform z: unbiased for p(x), not log p(x)
    one = log_marginal(mixture_model, None, mixture_data, method="uniform", num_samples=1, seed=0)
    assert one.mean() < truth.mean()


def test_prior_monte_carlo_has_high_variance_on_the_mixture(mixture_data):
    x = mixture_data[:1].expand(200, 2)  # 200 independent estimates of one log p(x)
    prior = log_marginal(mixture_model, None, x, method="prior", num_samples=3, seed=0)
    iwae = log_marginal(mixture_model, mixture_proposal, x, num_samples=3, seed=0)
    assert prior.var() > 10 * iwae.var()


def test_exact_needs_discrete_latents(ppca):
    model, x = ppca
    with pytest.raises(ValueError, match="discrete"):
        log_marginal(model.model, None, x, method="exact")
    with pytest.raises(ValueError, match="finite"):
        log_marginal(model.model, None, x, method="uniform", num_samples=2)


# ---------------------------------------------------------------------------------------------
# errors


def test_clear_errors(ppca):
    model, x = ppca
    call = lambda **kw: log_marginal(model.model, model.guide, kw.pop("x", x), **kw)  # noqa: E731
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        call(x=bad)
    with pytest.raises(ValueError, match=r"shape \(40, 7\)"):
        call(x=torch.randn(NUM_DATA, DATA_DIM + 2))
    for num_samples in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_samples"):
            call(num_samples=num_samples)
    with pytest.raises(ValueError, match="prior.*uniform.*iwae.*elbo.*exact.*ais"):
        call(method="annealed")
    with pytest.raises(ValueError, match="needs a guide"):
        log_marginal(model.model, None, x)

    def wrong_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("w", dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1))
    with pytest.raises(ValueError, match=r"missing from the guide \['z'\].*\['w'\]"):
        log_marginal(model.model, wrong_guide, x)

    def no_data_plate(x):
        with pyro.plate("rows", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([x.shape[0], DATA_DIM]).to_event(1),
                        obs=x)
    # the plate over the rows is read from the program whatever its name: N(x; 0, I) exactly
    truth = dist.Normal(0.0, 1.0).log_prob(x).sum(-1)
    assert torch.allclose(log_marginal(no_data_plate, None, x, method="prior", num_samples=3), truth)
    with pytest.raises(ValueError, match="no plate named 'data'.*found: 'rows'"):
        log_marginal(no_data_plate, None, x, method="prior", plate_name="data")

    def global_latent(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(shift, 1.0).expand([x.shape[0], DATA_DIM]).to_event(1),
                        obs=x)
    with pytest.raises(ValueError, match=r"\['shift'\] are outside the data plate"):
        log_marginal(global_latent, None, x, method="prior")


def test_data_check_refuses_nan_and_inf_by_row_and_passes_huge_finite_values(ppca):
    """The NaN/inf test on x is one sum, then the exact test: a sum that overflows on finite
    values (3e38 × 40 rows) must not be taken for a non-finite value."""
    model, x = ppca
    huge = torch.full_like(x, 3e38)
    assert torch.isinf(huge.sum()) and torch.isfinite(huge).all()
    assert estimators._check_inputs(model.guide, huge, "iwae", 5, None, None) == 5
    for bad_value in (float("inf"), -float("inf"), float("nan")):
        bad = x.clone()
        bad[7, 2] = bad_value
        with pytest.raises(ValueError, match=r"NaN or inf in 1 rows \(first: \[7\]\)"):
            estimators._check_inputs(model.guide, bad, "iwae", 5, None, None)
    both = x.clone()
    both[4, 0], both[9, 1] = float("inf"), -float("inf")  # their sum is NaN: still caught
    with pytest.raises(ValueError, match=r"in 2 rows \(first: \[4, 9\]\)"):
        estimators._check_inputs(model.guide, both, "iwae", 5, None, None)


def test_observed_values_outside_the_support_are_refused_in_every_chunk():
    from ppl_lvm import VAE

    vae = VAE(12, z_dim=2, hidden_dim=8)
    x = (torch.rand(40, 12, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    x[30, 3] = 0.5  # past the probe's rows: caught by the per-chunk support check
    with pytest.raises(ValueError, match="outside the support"):
        log_marginal(vae.model, vae.guide, x, num_samples=2, chunk_size=8)


def test_methods_listed():
    assert set(METHODS) == {"prior", "uniform", "is", "iwae", "elbo", "exact", "ais"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_device_of_x():
    model = PPCA(torch.randn(DATA_DIM, Z_DIM), torch.randn(DATA_DIM), 0.5).cuda()
    x = torch.randn(NUM_DATA, DATA_DIM, device="cuda")
    result = estimate_log_marginal(model.model, model.guide, x, num_samples=10, seed=0)
    assert result.log_px.device == x.device and result.ess.device == x.device
    assert torch.allclose(result.log_px, model.log_marginal_exact(x).detach(), atol=1e-3)
    mixture = log_marginal(mixture_model, None, x[:, :2].cpu(), method="exact")
    assert mixture.device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# IWAE_ELBO: the training objective


def test_iwae_elbo_is_the_per_datapoint_bound_times_the_plate_scale(ppca):
    model, x = ppca
    batch, num_particles, num_data = x[:8], 5, 400
    draws = []

    def recording_guide(x, idx=None, num_data=None):
        loc, scale_tril = model.exact_posterior(x)
        with data_plate(x, idx, num_data):
            draws.append(pyro.sample("z", dist.MultivariateNormal(0.7 * loc,
                                                                  scale_tril=1.5 * scale_tril)))

    loss = IWAE_ELBO(num_particles).loss(model.model, recording_guide, batch,
                                         num_data=num_data)
    z = draws[-1].detach()  # [K, B, M]
    assert z.shape == (num_particles, 8, Z_DIM)
    loc, scale_tril = model.exact_posterior(batch)
    log_q = dist.MultivariateNormal(0.7 * loc, scale_tril=1.5 * scale_tril).log_prob(z)
    log_p = (dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
             + dist.Normal(z @ model.weight.T + model.bias, 0.5).log_prob(batch).sum(-1))
    bound = torch.logsumexp(log_p - log_q, 0) - math.log(num_particles)  # [B]
    expected = -(num_data / 8) * bound.sum()
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_renyi_alpha_0_differs_once_the_plate_is_scaled(ppca):
    """RenyiELBO(alpha=0) keeps datapoints apart when every site is in the data plate, but it
    exponentiates the *scaled* log weights: log mean_k w^s, not s log mean_k w."""
    model, x = ppca
    batch, guide = x[:8], worse_guide(model)
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=50, vectorize_particles=True,
                                 max_plate_nesting=1)
    iwae = IWAE_ELBO(50, max_plate_nesting=1)

    def both(**kwargs):
        pyro.set_rng_seed(0)
        a = renyi.loss(model.model, guide, batch, **kwargs)
        pyro.set_rng_seed(0)
        b = iwae.loss(model.model, guide, batch, **kwargs)
        return a, b

    renyi_loss, iwae_loss = both()
    assert renyi_loss == pytest.approx(iwae_loss, rel=1e-5)  # unscaled: the same bound
    renyi_loss, iwae_loss = both(num_data=800)  # s = 100
    assert abs(renyi_loss - iwae_loss) > 1.0
    # log mean_k w^s ≥ s log mean_k w (power means): Renyi's "bound" sits above s · IWAE_K
    assert renyi_loss < iwae_loss


def test_renyi_alpha_0_pools_the_batch_when_a_site_is_global():
    """With one site outside the data plate, RenyiELBO sums the plate away: one log weight per
    particle for the whole batch. IWAE_ELBO refuses rather than do that silently."""
    def model(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(shift, 1.0), obs=x)

    draws = []

    def guide(x):
        draws.append(pyro.sample("shift", dist.Normal(x.mean(), 0.5)))

    x = torch.tensor([0.5, -0.2, 1.0])
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=20, vectorize_particles=True,
                                 max_plate_nesting=1)
    loss = renyi.loss(model, guide, x)
    shift = draws[-1].reshape(-1)  # [K]
    # one joint weight per particle: log mean_k p(x_1, ..., x_B, s_k) / q(s_k)
    log_weights = (dist.Normal(0.0, 1.0).log_prob(shift)
                   + dist.Normal(shift[:, None], 1.0).log_prob(x).sum(-1)
                   - dist.Normal(x.mean(), 0.5).log_prob(shift))
    pooled = torch.logsumexp(log_weights, 0) - math.log(20)
    assert loss == pytest.approx(-pooled.item(), rel=1e-4)
    with pytest.raises(ValueError, match="outside the data plate"):
        IWAE_ELBO(20).loss(model, guide, x)


def test_iwae_elbo_trains_with_svi(ppca):
    model, x = ppca

    def guide(x, idx=None, num_data=None):
        loc = pyro.param("loc", torch.zeros(1, Z_DIM))
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.Normal(loc.expand(x.shape[0], Z_DIM), 1.0).to_event(1))

    svi = pyro.infer.SVI(model.model, guide, pyro.optim.Adam({"lr": 0.03}), IWAE_ELBO(4))
    pyro.set_rng_seed(0)
    first = sum(svi.step(x) for _ in range(5))
    for _ in range(60):
        svi.step(x)
    last = sum(svi.step(x) for _ in range(5))
    assert last < first


def test_iwae_elbo_plugs_into_fit_with_or_without_num_data():
    from ppl_lvm import VAE, fit

    x = (torch.rand(64, 12, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    vae = VAE(12, z_dim=2, hidden_dim=16)
    result = fit(vae.model, vae.guide, x, epochs=2, batch_size=16, lr=1e-2,
                 loss=IWAE_ELBO(3), progress=False, seed=0)
    assert len(result.losses) == 8 and all(math.isfinite(v) for v in result.losses)
    # a model without idx / num_data is scaled by fit's poutine.scale: the same minibatch loss
    pyro.set_rng_seed(0)
    scaled = IWAE_ELBO(3).loss(vae.model, vae.guide, x[:16], idx=torch.arange(16), num_data=64)
    pyro.set_rng_seed(0)
    plain = IWAE_ELBO(3).loss(pyro.poutine.scale(vae.model, scale=4.0),
                              pyro.poutine.scale(vae.guide, scale=4.0), x[:16])
    assert scaled == pytest.approx(plain, rel=1e-5)


def linear_gaussian():
    """z ~ N(0, 1), x | z ~ N(θ z, 1); q(z | x) = N(a x + b, exp(c)) with φ = (a, b, c)."""
    theta = torch.tensor(1.5, requires_grad=True)
    phi = torch.tensor([0.2, 0.1, -0.3], requires_grad=True)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(theta * z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(phi[0] * x + phi[1], phi[2].exp()))

    return model, guide, theta, phi


def test_dreg_gradient_matches_iwae_in_expectation_with_lower_variance():
    model, guide, theta, phi = linear_gaussian()
    x = torch.tensor([0.8])
    gradients = {False: [], True: []}
    pyro.set_rng_seed(0)
    for dreg in (False, True):
        objective = IWAE_ELBO(num_particles=10, dreg=dreg)
        for _ in range(400):
            loss = objective.differentiable_loss(model, guide, x)
            gradients[dreg].append(torch.cat([g.reshape(-1) for g in
                                              torch.autograd.grad(loss, [phi, theta])]))
    iwae, dreg = torch.stack(gradients[False]), torch.stack(gradients[True])
    stderr = (iwae.var(0) / len(iwae) + dreg.var(0) / len(dreg)).sqrt()
    assert ((iwae.mean(0) - dreg.mean(0)).abs() < 4 * stderr).all()
    assert (dreg[:, :3].var(0) < iwae[:, :3].var(0)).all()  # the encoder's gradient
    # the value is the same bound either way
    pyro.set_rng_seed(1)
    a = IWAE_ELBO(10).loss(model, guide, x)
    pyro.set_rng_seed(1)
    b = IWAE_ELBO(10, dreg=True).differentiable_loss(model, guide, x).item()
    assert a == pytest.approx(b, rel=1e-5)


def test_dreg_leaves_the_model_gradient_unchanged():
    model, guide, theta, phi = linear_gaussian()
    x = torch.tensor([0.8, -1.0])
    grads = []
    for dreg in (False, True):
        pyro.set_rng_seed(2)
        loss = IWAE_ELBO(num_particles=6, dreg=dreg).differentiable_loss(model, guide, x)
        grads.append(torch.autograd.grad(loss, [theta])[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# programs as their authors wrote them (issue 11)


def test_global_latents_are_refused_or_fixed_at_the_guide_median():
    """A 2-component mixture with Dirichlet weights and per-component locs (Pyro's GMM tutorial):
    log p(x_n | weights, locs) at AutoDelta's values is the closed-form mixture density."""
    from pyro.infer.autoguide import AutoDelta

    @pyro.infer.config_enumerate
    def gmm(data):
        weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
        with pyro.plate("components", 2):
            locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=data)

    data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])
    guide = AutoDelta(pyro.poutine.block(gmm, expose=["weights", "locs"]))
    guide(data)
    median = guide.median()
    with pytest.raises(ValueError, match=r"\['locs', 'weights'\] are outside the data plate"):
        log_marginal(gmm, guide, data, method="exact")
    exact = log_marginal(gmm, guide, data, method="exact", globals="median")
    weights, locs = median["weights"], median["locs"]
    truth = torch.logsumexp(weights.log() + dist.Normal(locs, 1.0).log_prob(data[:, None]), -1)
    assert torch.allclose(exact, truth.detach(), atol=1e-5)
    given = estimate_log_marginal(gmm, guide, data, method="exact", globals=median)
    assert torch.allclose(given.log_px, truth.detach(), atol=1e-5) and given.globals == "given"
    assert list(pyro.get_param_store().keys()) == list(pyro.get_param_store().keys())


def test_model_and_guide_data_plates_at_different_dims_are_refused(ppca):
    model, x = ppca

    def guide_at_minus_2(x):
        loc, _ = model.exact_posterior(x)
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(loc[:, None], 1.0).to_event(1))
    with pytest.raises(ValueError, match=r"'data' is at dim -1 in the model but at dim -2 in the guide"):
        log_marginal(model.model, guide_at_minus_2, x, num_samples=3)


def test_a_per_row_param_guide_is_probed_without_side_effects(ppca):
    """A guide holding pyro.param("loc", [N, Z]) indexed by nothing: it scores its own N rows, and
    the estimator's probes leave the param store as it was (no 2-row param behind)."""
    model, x = ppca
    loc_exact, scale_tril = model.exact_posterior(x)

    def guide(x):
        loc = pyro.param("q_loc", lambda: loc_exact.detach().clone())
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril.detach()))
    guide(x)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    estimate = log_marginal(model.model, guide, x, num_samples=5, seed=0)
    assert torch.allclose(estimate, model.log_marginal_exact(x).detach(), atol=1e-4)
    after = dict(pyro.get_param_store().items())
    assert torch.equal(after["q_loc"], before["q_loc"])  # the same [N, Z] param, not a 2-row one
    assert {k for k in after if k not in before} <= {n for n in after if n.startswith("ppca$$$")}
    with pytest.raises(ValueError, match="scores only the rows it was fitted on"):
        log_marginal(model.model, guide, x[:10], num_samples=5)


def test_a_distribution_built_with_validate_args_false_is_scored_as_written():
    """Grey-level targets under Bernoulli(validate_args=False) train in Pyro; the estimator scores
    them too: Σ_d x log p + (1 - x) log(1 - p), here with no latent noise (a Delta guide)."""
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(0))
    probs = torch.tensor([0.2, 0.4, 0.6, 0.8])

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Bernoulli(probs=probs.expand(len(x), 4), validate_args=False)
                        .to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.0, 1.0))
    truth = (x * probs.log() + (1 - x) * (1 - probs).log()).sum(-1)
    assert torch.allclose(log_marginal(model, guide, x, num_samples=4), truth, atol=1e-5)


def test_iwae_elbo_loops_over_particles_when_the_program_cannot_be_vectorised(ppca):
    """A guide that reads its batch shape from a sample cannot run under the particle plate; the
    loss then loops over K particles and is the same per-datapoint bound (the exact posterior:
    every log weight is log p(x_n))."""
    model, x = ppca
    loc, scale_tril = model.exact_posterior(x)

    def stubborn_guide(x, idx=None, num_data=None):
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.MultivariateNormal(loc.detach(),
                                                         scale_tril=scale_tril.detach()))
            if z.dim() != 2:  # as a program that reshapes by a fixed batch shape fails
                raise RuntimeError(f"expected z of shape [N, Z], got {tuple(z.shape)}")
    with pytest.warns(RuntimeWarning, match="looping over the K particles"):
        loss = IWAE_ELBO(num_particles=5).loss(model.model, stubborn_guide, x)
    assert loss == pytest.approx(-model.log_marginal_exact(x).sum().item(), rel=1e-5)


def test_ais_through_log_marginal_and_khat_beside_the_ess(ppca):
    """method="ais" from the exact posterior is exact for any T; k̂ is +inf for the exact
    posterior's constant weights (no weight above the cutoff: no tail to fit, as arviz) and large (> 0.7) for a poor proposal (Vehtari et al.)."""
    model, x = ppca
    truth = model.log_marginal_exact(x).detach()
    ais = estimate_log_marginal(model.model, model.guide, x, method="ais", num_steps=5,
                                num_samples=4, seed=0)
    assert torch.allclose(ais.log_px, truth, atol=1e-3)
    exact_q = estimate_log_marginal(model.model, model.guide, x, num_samples=200, seed=0)
    assert torch.isposinf(exact_q.khat).all() and not exact_q.unreliable.any()
    prior = estimate_log_marginal(model.model, None, x, method="prior", num_samples=200, seed=0)
    assert (prior.khat > 0.7).float().mean() > 0.5 and "k̂ > 0.7" in repr(prior)


# ---------------------------------------------------------------------------------------------
# the density kernel's refusals and the whole-data bound (issue 18, class 1)


def _conjugate_rows():
    """z_n ~ N(0, 1), x_n | z_n ~ N(z_n, 1): p(x_n) = N(0, 2), p(z_n | x_n) = N(x_n / 2, 1 / 2)."""
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)
    return model, torch.tensor([0.3, -1.2, 2.0, 0.7])


def test_a_joint_guide_is_refused_per_datapoint_and_its_whole_data_bound_is_exact():
    from pyro.infer.autoguide import AutoDiagonalNormal
    from pyro.nn import PyroParam
    from torch.distributions import constraints
    from ppl_lvm import joint_log_marginal
    pyro.clear_param_store()
    model, x = _conjugate_rows()
    guide = AutoDiagonalNormal(model)
    guide(x)
    # q = the exact posterior: every log weight equals log p(x_1..N)
    guide.loc = PyroParam(x / 2)
    guide.scale = PyroParam(torch.full_like(x, 0.5 ** 0.5), constraint=constraints.positive)
    truth = dist.Normal(0.0, 2 ** 0.5).log_prob(x).sum()
    with pytest.raises(ValueError, match="_AutoDiagonalNormal_latent"):
        log_marginal(model, guide, x, num_samples=4)
    for method in ("elbo", "iwae"):
        estimate = joint_log_marginal(model, guide, x, method=method, num_samples=5, seed=0)
        assert torch.allclose(estimate, truth, atol=1e-4), (method, estimate, truth)
    # the prior as proposal: unbiased for p(x), a lower bound in log
    prior = joint_log_marginal(model, None, x, method="prior", num_samples=20000, seed=0)
    assert abs(prior.item() - truth.item()) < 0.3


def test_a_point_mass_guide_is_refused_as_a_proposal():
    from pyro.infer.autoguide import AutoDelta
    pyro.clear_param_store()
    model, x = _conjugate_rows()
    guide = AutoDelta(model)
    with pytest.raises(ValueError, match="'z' is a Delta"):
        log_marginal(model, guide, x, num_samples=4)


def test_a_factor_outside_the_data_plate_is_named_as_a_factor():
    def model(x):
        pyro.factor("prior_penalty", torch.tensor(-3.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))
    x = torch.tensor([0.3, -1.2])
    with pytest.raises(ValueError, match="'prior_penalty' \\(a pyro.factor\\)"):
        log_marginal(model, guide, x, num_samples=4)
    from ppl_lvm import joint_log_marginal
    truth = dist.Normal(0.0, 2 ** 0.5).log_prob(x).sum() - 3.0
    assert torch.allclose(joint_log_marginal(model, guide, x, num_samples=3, seed=1), truth,
                          atol=1e-4)


# Monte Carlo errors and seeds that depend only on (seed, rows, K)


def test_a_seeded_estimate_is_bit_identical_across_memory_budgets_and_device_defaults(ppca):
    """K = 2000 exceeds a seed block of particles; the budget used to change how many particles a
    seeded call drew per stream (up to 1 nat apart at K = 2000). Now only (seed, rows, K) count,
    so the CPU and GPU default budgets give the same number too."""
    from ppl_lvm.estimators import DEFAULT_MEMORY_BYTES, CPU_MEMORY_BYTES
    model, x = ppca
    guide = worse_guide(model)
    runs = [estimate_log_marginal(model.model, guide, x, num_samples=2000, seed=3,
                                  memory_bytes=budget, chunk_size=chunk)
            for budget, chunk in ((DEFAULT_MEMORY_BYTES, None), (CPU_MEMORY_BYTES, None),
                                  (1 << 16, None), (1 << 10, 5))]
    for run in runs[1:]:
        assert torch.equal(run.log_px, runs[0].log_px)
        assert torch.equal(run.mc_stderr, runs[0].mc_stderr)
    truth = model.log_marginal_exact(x).detach()
    assert (runs[0].log_px - truth).abs().max() < 5 * runs[0].mc_stderr.max() + 1e-3


def test_monte_carlo_stderr_predicts_the_spread_over_seeds(ppca):
    """mc_stderr (delta method on log mean w) against its definition: 300 independent copies of
    the same 4 rows, each estimated with K = 100; the std of a row's 300 estimates is its Monte
    Carlo error. The ELBO's error, std(log w) / √K, likewise."""
    model, x = ppca
    guide = worse_guide(model)
    copies = 300
    rows = x[:4].repeat(copies, 1)
    for method in ("iwae", "elbo"):
        estimate = estimate_log_marginal(model.model, guide, rows, method=method,
                                         num_samples=100, seed=0)
        spread = estimate.log_px.reshape(copies, 4).std(0)
        predicted = estimate.mc_stderr.reshape(copies, 4).mean(0)
        assert torch.allclose(predicted, spread, rtol=0.2), (method, predicted, spread)
        # the total's error: rows are independent
        assert estimate.mean_mc_stderr == pytest.approx(
            math.sqrt((estimate.mc_stderr ** 2).sum().item()) / len(rows), rel=1e-5)
        assert "Monte Carlo ±" in repr(estimate)
    exact = estimate_log_marginal(model.model, model.guide, x[:3], num_samples=50, seed=0)
    assert exact.mc_stderr.max() < 1e-3  # the exact posterior proposal: every weight is p(x)


def test_a_seeded_estimate_ignores_the_global_rng_and_draws_its_normal_noise_on_the_cpu(ppca,
                                                                                       monkeypatch):
    """Issue 19: given seed, the answer does not depend on the global RNG's state. On a device
    other than the CPU the Normal-family noise ε is drawn by the CPU's generator and moved there,
    so the device's generator cannot change it: a Normal and a MultivariateNormal draw on the
    "meta" device advance the CPU's generator exactly as the same draws on the CPU do, and the
    patch of torch's Normal modules is undone on exit (and never made for the CPU)."""
    from ppl_lvm.particles import _NORMAL_MODULES, _standard_normal, noise_from_cpu

    model, x = ppca
    guide = worse_guide(model)
    torch.manual_seed(1)
    first = estimate_log_marginal(model.model, guide, x, num_samples=300, seed=4)
    torch.manual_seed(2)
    torch.rand(1000)
    second = estimate_log_marginal(model.model, guide, x, num_samples=300, seed=4)
    assert torch.equal(first.log_px, second.log_px)

    def draw(device):
        zeros, eye = torch.zeros(5, 3, device=device), torch.eye(3, device=device)
        normal = torch.distributions.Normal(zeros, 1.0 + zeros, validate_args=False).rsample()
        joint = torch.distributions.MultivariateNormal(zeros, scale_tril=eye,
                                                       validate_args=False).rsample()
        return normal, joint

    torch.manual_seed(0)
    on_cpu = draw("cpu")
    expected = torch.get_rng_state()
    torch.manual_seed(0)
    with noise_from_cpu("meta"):
        assert all(module._standard_normal is not _standard_normal for module in _NORMAL_MODULES)
        with noise_from_cpu("meta"):  # re-entrant
            elsewhere = draw("meta")
    assert torch.equal(torch.get_rng_state(), expected)
    assert all(value.device.type == "meta" for value in elsewhere)
    assert all(module._standard_normal is _standard_normal for module in _NORMAL_MODULES)
    with noise_from_cpu("cpu"):
        assert all(module._standard_normal is _standard_normal for module in _NORMAL_MODULES)
        torch.manual_seed(0)
        assert all(torch.equal(a, b) for a, b in zip(draw("cpu"), on_cpu))

    # the route a GPU takes, forced on the CPU: every ε of a VAE's guide comes through it (one
    # draw per seed block) and the estimate is bit-identical to the plain CPU one
    import ppl_lvm.particles as particles
    from ppl_lvm.models.vae import VAE
    torch.manual_seed(0)
    vae = VAE(data_dim=20, z_dim=4, hidden_dim=32)
    x = torch.bernoulli(torch.rand(70, 20, generator=torch.Generator().manual_seed(1)))
    plain = estimate_log_marginal(vae.model, vae.guide, x, num_samples=300, seed=0)
    shapes = []

    def counting(shape, dtype, device):
        shapes.append(tuple(shape))
        return _standard_normal_from_cpu(shape, dtype, device)

    _standard_normal_from_cpu = particles._standard_normal_from_cpu
    monkeypatch.setattr(particles, "_standard_normal_from_cpu", counting)
    with noise_from_cpu("meta"):
        routed = estimate_log_marginal(vae.model, vae.guide, x, num_samples=300, seed=0)
    assert torch.equal(routed.log_px, plain.log_px)
    assert sorted(shapes) == sorted((k, n, 4) for n in (32, 32, 6) for k in (128, 128, 44))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_seeded_estimate_is_the_same_on_cpu_and_cuda():
    """Issue 19: a VAE (Normal guide) scored with seed 0 and K = 300 on 70 rows (three seed
    blocks) gives the same per-row log p(x) on the CPU and on CUDA up to float error (1e-4
    relative): the noise depends only on (seed, rows, K), not on the device's generator or its
    default memory budget."""
    from ppl_lvm.models.vae import VAE

    torch.manual_seed(0)
    vae = VAE(data_dim=20, z_dim=4, hidden_dim=32)
    x = torch.bernoulli(torch.rand(70, 20, generator=torch.Generator().manual_seed(1)))
    on_cpu = estimate_log_marginal(vae.model, vae.guide, x, num_samples=300, seed=0)
    vae.cuda()
    on_cuda = estimate_log_marginal(vae.model, vae.guide, x.cuda(), num_samples=300, seed=0)
    assert torch.allclose(on_cuda.log_px.cpu(), on_cpu.log_px, rtol=1e-4, atol=0)
    assert torch.allclose(on_cuda.mc_stderr.cpu(), on_cpu.mc_stderr, rtol=1e-3, atol=1e-6)


def test_seed_blocks_seed_the_generators_as_torch_manual_seed_does():
    """particles.seed_all (each 32-row seed block's seeding) skips torch.manual_seed's lazy
    seeding of absent accelerators, which recorded a Python stack per call (a K = 1 estimate on
    500 rows: 26.9 -> 21.3 ms): the CPU generator, and so every seeded answer, is unchanged."""
    from ppl_lvm.particles import seed_all

    seed = (1 << 40) + 12345
    seed_all(seed)
    ours = (torch.rand(5), torch.randn(3, dtype=torch.float64), torch.randint(0, 10**6, (4,)))
    torch.manual_seed(seed)
    reference = (torch.rand(5), torch.randn(3, dtype=torch.float64), torch.randint(0, 10**6, (4,)))
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)
    if torch.cuda.is_available():
        seed_all(seed)
        ours = torch.rand(5, device="cuda")
        torch.manual_seed(seed)
        assert torch.equal(ours, torch.rand(5, device="cuda"))
