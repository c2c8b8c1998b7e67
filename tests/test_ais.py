"""AIS, BDMC and PSIS k̂ against closed forms: PPCA's log p(x), a Gamma-Normal (Student-t) marginal,
Gaussian HMC targets, and importance weights with a known Pareto tail."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_lvm.ais import (
    SEED_BLOCK_ROWS, AISEstimate, _initial_state, _Noise, _Target, adapt_step_size,
    ais_log_marginal, bdmc, hmc_step, schedule_betas, simulate,
)
from ppl_lvm.estimators import LogMarginalEstimate, log_marginal
from ppl_lvm.models.ppca import PPCA
from ppl_lvm.plate import data_plate
from ppl_lvm.psis import pareto_khat, tail_size

DATA_DIM, Z_DIM, NUM_DATA = 5, 2, 40


pytestmark = pytest.mark.usefixtures("fresh_param_store")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """AIS runs thousands of tiny ops in sequence: on a busy machine a second intra-op thread
    makes each one wait for a core (10× slower here); one thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def scaled_guide(ppca_model, loc_factor=1.0, scale_factor=1.0):
    """q(z | x): the exact posterior with its mean and its scale multiplied by the factors."""
    def guide(x, idx=None, num_data=None):
        loc, scale_tril = ppca_model.exact_posterior(x)
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.MultivariateNormal(loc_factor * loc,
                                                     scale_tril=scale_factor * scale_tril))
    return guide


def mean_and_stderr(values):
    return values.mean().item(), values.std().item() / math.sqrt(values.numel())


# ---------------------------------------------------------------------------------------------
# schedules


def test_sigmoid_schedule_rises_from_zero_to_one_with_small_steps_at_the_ends():
    betas = schedule_betas(100)
    assert betas.shape == (101,) and betas[0] == 0 and betas[-1] == 1
    steps = betas.diff()
    assert (steps > 0).all()
    assert steps[0] < steps[50] / 10 and steps[-1] < steps[50] / 10
    assert torch.allclose(schedule_betas(4, "linear"), torch.tensor([0, 0.25, 0.5, 0.75, 1.0],
                                                                     dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_betas(10, "cosine")


# ---------------------------------------------------------------------------------------------
# AIS on PPCA: log p(x) = log N(x; b, W Wᵀ + σ² I)


def test_ais_from_the_prior_converges_to_exact_ppca_log_marginal(ppca):
    model, x = ppca
    truth = model.log_marginal_exact(x).detach()
    errors = {}
    for num_steps in (3, 30, 300):
        estimate = ais_log_marginal(model.model, None, x, num_steps=num_steps, num_samples=8,
                                    seed=0)
        assert isinstance(estimate, LogMarginalEstimate) and isinstance(estimate, AISEstimate)
        assert estimate.log_px.shape == (NUM_DATA,) and estimate.log_weights.shape == (8, NUM_DATA)
        errors[num_steps] = estimate.log_px - truth
    mean_abs = {t: e.abs().mean().item() for t, e in errors.items()}
    assert mean_abs[3] > mean_abs[30] > mean_abs[300]
    bias, stderr = mean_and_stderr(errors[300])
    assert abs(bias) < 3 * stderr  # within Monte Carlo error at large T
    assert mean_abs[3] > 2 and mean_abs[300] < 0.3


def test_ais_from_the_exact_posterior_guide_is_exact_for_any_t(ppca):
    model, x = ppca
    truth = model.log_marginal_exact(x).detach()
    estimate = ais_log_marginal(model.model, model.guide, x, num_steps=5, num_samples=3, seed=0)
    # p(x, z) / q(z | x) = p(x) for every z: every increment is exact
    assert torch.allclose(estimate.log_px, truth, atol=1e-4)


def test_ais_from_a_poor_guide_beats_importance_sampling_from_it(ppca):
    model, x = ppca
    truth = model.log_marginal_exact(x).detach()
    guide = scaled_guide(model, 0.5, 0.5)
    few = ais_log_marginal(model.model, guide, x, num_steps=1, num_samples=4, seed=0)
    many = ais_log_marginal(model.model, guide, x, num_steps=100, num_samples=4, seed=0)
    # T = 1 is importance sampling with K chains (a lower bound on average)
    few_error, many_error = few.log_px - truth, many.log_px - truth
    assert few_error.mean() < -0.5
    bias, stderr = mean_and_stderr(many_error)
    assert abs(bias) < 3 * stderr
    assert many_error.abs().mean() < few_error.abs().mean() / 3


def test_a_per_datapoint_guide_gets_its_rows_indices_in_every_chunk(ppca):
    model, x = ppca
    truth = model.log_marginal_exact(x).detach()
    loc_table, scale_tril = (t.detach() for t in model.exact_posterior(x))

    def guide(x, idx):  # q(z | x_n) = p(z | x_n), read from a table by the rows' indices
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc_table[idx], scale_tril=scale_tril))

    estimate = ais_log_marginal(model.model, guide, x, num_steps=3, num_samples=2, chunk_size=7,
                                seed=0)
    assert torch.allclose(estimate.log_px, truth, atol=1e-4)


def test_answer_does_not_depend_on_chunk_size_with_a_seed(ppca):
    model, x = ppca
    x = torch.cat([x, x[:30]])  # 70 rows: 3 seed blocks, the last one partial
    assert x.shape[0] > 2 * SEED_BLOCK_ROWS
    runs = [ais_log_marginal(model.model, None, x, num_steps=5, num_samples=3, seed=7,
                             chunk_size=chunk).log_px for chunk in (70, 32, 13, None)]
    one_row = ais_log_marginal(model.model, None, x, num_steps=5, num_samples=3, seed=7,
                               memory_bytes=1)  # the budget allows one row per call
    assert one_row.rows_per_call == 1
    runs.append(one_row.log_px)
    for run in runs[1:]:
        assert torch.allclose(run, runs[0], atol=1e-4)
    other = ais_log_marginal(model.model, None, x, num_steps=5, num_samples=3, seed=8).log_px
    assert not torch.allclose(other, runs[0], atol=1e-3)


def test_seeded_run_leaves_the_global_rng_alone(ppca):
    model, x = ppca
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ais_log_marginal(model.model, None, x[:4], num_steps=3, num_samples=2, seed=1)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------
# BDMC: lower ≤ log p(x) ≤ upper


def test_bdmc_sandwiches_exact_ppca_log_marginal_and_gap_shrinks(ppca):
    model, _ = ppca
    gaps = {}
    for num_steps in (10, 200):
        result = bdmc(model.model, num_data=NUM_DATA, data_shape=(DATA_DIM,), num_steps=num_steps,
                      num_samples=4, seed=0)
        assert result.x.shape == (NUM_DATA, DATA_DIM) and result.z["z"].shape == (NUM_DATA, Z_DIM)
        truth = model.log_marginal_exact(result.x).detach()
        low, low_err = mean_and_stderr(result.lower - truth)
        high, high_err = mean_and_stderr(result.upper - truth)
        assert low < 3 * low_err and high > -3 * high_err
        gaps[num_steps] = result.gap.mean().item()
        assert gaps[num_steps] > 0
    assert gaps[200] < gaps[10] / 4


def test_bdmc_with_given_exact_posterior_samples(ppca):
    model, x = ppca
    loc, scale_tril = model.exact_posterior(x)
    generator = torch.Generator().manual_seed(1)
    z = (loc + torch.randn(NUM_DATA, Z_DIM, generator=generator) @ scale_tril.T).detach()
    truth = model.log_marginal_exact(x).detach()
    result = bdmc(model.model, x=x, z=z, num_steps=100, num_samples=4, seed=0)
    assert result.z.keys() == {"z"}
    assert (result.upper - truth).mean() > -0.05 and (result.lower - truth).mean() < 0.05
    assert result.gap.mean() < 0.6
    with pytest.raises(ValueError, match="exact posterior samples z"):
        bdmc(model.model, x=x)


def test_bdmc_from_a_poor_guide_sandwiches_the_truth(ppca):
    model, _ = ppca
    result = bdmc(model.model, scaled_guide(model, 0.5, 0.5), num_data=NUM_DATA,
                  data_shape=(DATA_DIM,), num_steps=100, num_samples=4, seed=0)
    truth = model.log_marginal_exact(result.x).detach()
    low, low_err = mean_and_stderr(result.lower - truth)
    high, high_err = mean_and_stderr(result.upper - truth)
    assert low < 3 * low_err and high > -3 * high_err
    assert 0 < result.gap.mean() < 1.0


def test_simulate_draws_from_the_joint(ppca):
    model, _ = ppca
    x, z = simulate(model.model, 2000, (DATA_DIM,), seed=0)
    # x ~ N(b, W Wᵀ + σ² I): check the mean and the covariance
    covariance = model.weight @ model.weight.T + 0.25 * torch.eye(DATA_DIM)
    assert torch.allclose(x.mean(0), model.bias.detach(), atol=0.15)
    assert torch.allclose(torch.cov(x.T), covariance.detach(), atol=0.3)
    assert torch.allclose((x - z["z"] @ model.weight.T - model.bias).std(), torch.tensor(0.5),
                          atol=0.03)


# ---------------------------------------------------------------------------------------------
# HMC: invariance and step-size adaptation on a Gaussian target (PPCA's posterior at β = 1)


def posterior_chains(model, x, num_samples, seed=0):
    """A _Target at β = 1 and K exact posterior draws per row as its state."""
    target = _Target(model.model, None, x, "data", torch.arange(x.shape[0]), {})
    rows = slice(0, x.shape[0])
    loc, scale_tril = model.exact_posterior(x)
    generator = torch.Generator().manual_seed(seed)
    z = (loc + torch.randn(num_samples, *loc.shape, generator=generator) @ scale_tril.T).detach()
    return target, rows, _initial_state(target, rows, {"z": z}), loc.detach(), scale_tril.detach()


def test_hmc_transition_leaves_the_gaussian_posterior_invariant(ppca):
    model, x = ppca
    x = x[:4]
    target, rows, state, loc, scale_tril = posterior_chains(model, x, 2000)
    noise = _Noise(None, rows, x.device)
    torch.manual_seed(0)
    step = torch.full((4,), 0.15)
    accepted = []
    for _ in range(10):
        state, accept_prob = hmc_step(target, rows, state, 1.0, step, 3, noise)
        accepted.append(accept_prob.mean().item())
    assert 0.2 < sum(accepted) / len(accepted) < 0.99  # the chains did move
    z = state.u["z"]  # [K, 4, M]
    covariance = scale_tril @ scale_tril.T
    std = covariance.diagonal().sqrt()
    # moments of K = 2000 draws: mean within ~4 standard errors, covariance within ~10 %
    assert ((z.mean(0) - loc).abs() / std < 4 / math.sqrt(2000) * 1.5).all()
    for row in range(4):
        assert torch.allclose(torch.cov(z[:, row].T), covariance, rtol=0.12, atol=0.01)


def test_hmc_rejects_an_unstable_step_and_so_stays_exact(ppca):
    """A step size past leapfrog's stability limit gives proposals with huge energy errors: the
    Metropolis step must reject them (accepting them would blow the chains off the target)."""
    model, x = ppca
    x = x[:1]
    target, rows, state, loc, scale_tril = posterior_chains(model, x, 2000)
    noise = _Noise(None, rows, x.device)
    torch.manual_seed(0)
    big = torch.full((1,), 2.5)  # far past the stability limit of leapfrog on this Gaussian
    moved = state
    for _ in range(5):
        moved, accept_prob = hmc_step(target, rows, moved, 1.0, big, 3, noise)
    # Metropolis rejects the unstable proposals: the chains stay put, so they stay exact
    assert accept_prob.mean() < 0.05
    assert torch.allclose(moved.u["z"], state.u["z"], atol=0.5)


@pytest.mark.parametrize("initial", [1e-3, 1.0])
def test_step_size_adaptation_reaches_target_acceptance(ppca, initial):
    model, x = ppca
    x = x[:3]
    target, rows, state, _, _ = posterior_chains(model, x, 50)
    noise = _Noise(None, rows, x.device)
    torch.manual_seed(0)
    step = torch.full((3,), initial)
    history = []
    for _ in range(400):
        state, accept_prob = hmc_step(target, rows, state, 1.0, step, 2, noise)
        step = adapt_step_size(step, accept_prob.mean(0), 0.65)
        history.append(accept_prob.mean(0))
    late = torch.stack(history[-150:]).mean(0)  # [3] per datapoint
    assert ((late - 0.65).abs() < 0.1).all()


# ---------------------------------------------------------------------------------------------
# any Pyro program: constrained latents, nested plates, refusals


def gamma_normal_model(x, idx=None):
    """s_n ~ Gamma(a, b), x_{n,j} | s_n ~ N(0, 1 / s_n) for j ≤ J (a nested plate), and a second
    latent per (n, j): u_{n,j} ~ N(0, 1), y_{n,j} ~ N(u_{n,j}, 1) with y = x + 1 (independent)."""
    num_rows, num_obs = x.shape
    with pyro.plate("data", num_rows, dim=-2):
        precision = pyro.sample("s", dist.Gamma(x.new_tensor(3.0), x.new_tensor(2.0)))
        with pyro.plate("obs", num_obs, dim=-1):
            pyro.sample("x", dist.Normal(0.0, precision.rsqrt()), obs=x)
            u = pyro.sample("u", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("y", dist.Normal(u, 1.0), obs=x + 1)


def gamma_normal_log_marginal(x):
    """Student-t marginal Π_j ∫ N(x_j; 0, 1/s) Gamma(s; a, b) ds, plus Π_j N(y_j; 0, 2): [N]."""
    a, b, num_obs = 3.0, 2.0, x.shape[1]
    post_a, post_b = a + num_obs / 2, b + (x**2).sum(1) / 2
    log_t = (a * math.log(b) - math.lgamma(a) + math.lgamma(post_a) - post_a * post_b.log()
             - num_obs / 2 * math.log(2 * math.pi))
    return log_t + dist.Normal(0.0, math.sqrt(2.0)).log_prob(x + 1).sum(1)


def test_constrained_latent_and_nested_plates_match_closed_form():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=generator)
    truth = gamma_normal_log_marginal(x)
    estimate = ais_log_marginal(gamma_normal_model, None, x, num_steps=200, num_samples=8, seed=0)
    assert estimate.log_px.shape == (12,)
    assert (estimate.log_px - truth).abs().mean() < 0.1
    assert 0.3 < estimate.acceptance.mean() < 0.95


def test_refuses_discrete_and_global_latents_naming_the_site():
    def discrete(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def global_latent(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    x = torch.randn(4)
    with pytest.raises(ValueError, match="'c' is discrete"):
        ais_log_marginal(discrete, None, x, num_steps=2, num_samples=2)
    with pytest.raises(ValueError, match="'mu' is outside the data plate"):
        ais_log_marginal(global_latent, None, x, num_steps=2, num_samples=2)


def test_simulate_refuses_a_model_with_observed_sites_besides_x():
    with pytest.raises(ValueError, match="observed sites \\['y'\\] besides x 'x'"):
        simulate(gamma_normal_model, 4, (3,))


def test_refuses_a_guide_with_other_sites(ppca):
    model, x = ppca

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("w", dist.Normal(x.new_zeros(x.shape[0], Z_DIM), 1.0).to_event(1))

    with pytest.raises(ValueError, match="missing from the guide \\['z'\\]"):
        ais_log_marginal(model.model, guide, x, num_steps=2, num_samples=2)


@pytest.mark.cuda
def test_ais_runs_on_cuda(ppca):
    model, x = ppca
    model = model.cuda()
    x = x.cuda()
    estimate = ais_log_marginal(model.model, None, x, num_steps=300, num_samples=8, seed=0)
    assert estimate.log_px.device.type == "cuda" and estimate.step_size.device.type == "cuda"
    truth = model.log_marginal_exact(x).detach()
    error = estimate.log_px - truth  # on the CPU (4 seeds): mean |error| 0.22-0.29, bias ≤ 1.3 s.e.
    assert error.abs().mean() < 0.4
    assert error.mean().abs() < 4 * error.std() / len(error) ** 0.5 + 0.05
    result = bdmc(model.model, num_data=8, data_shape=(DATA_DIM,), device="cuda", num_steps=20,
                  num_samples=2, seed=0)
    assert result.x.device.type == "cuda" and result.gap.device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# PSIS k̂


def test_khat_recovers_a_known_pareto_tail():
    generator = torch.Generator().manual_seed(0)
    for shape in (0.3, 0.7, 1.2):
        uniform = torch.rand(5000, 20, generator=generator, dtype=torch.float64)
        log_weights = -shape * uniform.log()  # w = U^-ξ: a Pareto tail of index 1 / ξ
        khat = pareto_khat(log_weights)
        assert khat.shape == (20,)
        assert abs(khat.mean().item() - shape) < 0.05


@pytest.mark.parametrize("scale,expected", [(0.5, 0.75), (0.7, 0.51), (0.9, 0.19)])
def test_khat_of_a_narrow_gaussian_proposal(scale, expected):
    """Target N(0, 1), proposal N(0, s²) with s < 1: w ∝ exp(z² (1/s² - 1) / 2) has a Pareto tail
    of shape k = 1 - s² (up to log factors)."""
    generator = torch.Generator().manual_seed(0)
    z = scale * torch.randn(2000, 50, generator=generator, dtype=torch.float64)
    log_weights = -z**2 / 2 + z**2 / (2 * scale**2)
    assert abs(pareto_khat(log_weights).mean().item() - expected) < 0.1


def test_khat_small_for_good_proposals_large_for_a_mismatched_one(ppca):
    model, x = ppca
    loc, scale_tril = (t.detach() for t in model.exact_posterior(x))
    generator = torch.Generator().manual_seed(0)

    def khat(loc_factor, scale_factor, num_samples=2000):
        proposal = dist.MultivariateNormal(loc_factor * loc, scale_tril=scale_factor * scale_tril)
        eps = torch.randn(num_samples, NUM_DATA, Z_DIM, generator=generator)
        z = loc_factor * loc + eps @ (scale_factor * scale_tril).T
        with torch.no_grad():
            likelihood = dist.Normal(z @ model.weight.T + model.bias, model.noise_scale)
            log_joint = (dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
                         + likelihood.log_prob(x).sum(-1))
        return pareto_khat(log_joint - proposal.log_prob(z))

    # exact posterior: weights equal up to rounding, none above the cutoff: no fit (arviz: inf)
    assert (khat(1.0, 1.0) == math.inf).all()
    assert (khat(1.0, 1.3) < 0.5).all()  # wider than the posterior: bounded weights
    assert khat(0.7, 0.3).median() > 0.7  # narrow and off-centre: a heavy tail


def test_khat_edge_cases():
    assert torch.isinf(pareto_khat(torch.zeros(20, 2))).all()  # M = 4 tail weights: too few
    assert tail_size(100) == 20 and tail_size(10000) == 300
    assert (pareto_khat(torch.zeros(100, 2)) == math.inf).all()  # all tied: no tail (as arviz)
    assert pareto_khat(torch.randn(100)).dim() == 0
    log_weights = torch.randn(100, 2, dtype=torch.float64)
    log_weights[3, 1] = math.nan
    khat = pareto_khat(log_weights)
    assert torch.isfinite(khat[0]) and torch.isnan(khat[1])
    shifted = pareto_khat(log_weights[:, :1] + 1000.0)  # only ratios matter
    assert torch.allclose(shifted, khat[:1])


# ---------------------------------------------------------------------------------------------
# a trained MNIST VAE


@pytest.mark.slow
def test_ais_beats_iwae_at_matched_cost_and_bdmc_brackets_on_mnist_vae():
    from ppl_lvm import VAE, binarize, fit, load_mnist, train_test_split
    from ppl_lvm.estimators import estimate_log_marginal

    x, _ = load_mnist()
    x_train, x_test = train_test_split(x, test_fraction=0.1, seed=0)
    x_test = binarize(x_test[:20], method="stochastic", seed=1)
    vae = VAE(x.shape[1], z_dim=10, hidden_dim=200)
    fit(vae.model, vae.guide, x_train, epochs=30, batch_size=100, lr=1e-3, seed=0, progress=False,
        transform=lambda batch: binarize(batch, method="stochastic"))  # ~10 s
    # AIS: K chains × (T transitions × L leapfrog gradients); IWAE: as many model evaluations
    # (AIS's each add a backward pass: AIS gets about 2× IWAE's time here)
    num_chains, num_steps, leapfrog = 4, 200, 4
    cost = num_chains * num_steps * leapfrog
    ais = ais_log_marginal(vae.model, vae.guide, x_test, num_steps=num_steps,
                           num_samples=num_chains, leapfrog_steps=leapfrog, seed=0)
    iwae = estimate_log_marginal(vae.model, vae.guide, x_test, num_samples=cost, seed=0)
    assert ais.mean > iwae.mean  # ~0.25 nats here
    # the prior proposal is hopeless on 784 pixels: k̂ says so
    from ppl_lvm.estimators import _Program
    program = _Program(vae.model, None, x_test, "prior", "data", torch.arange(20), {})
    with torch.no_grad():
        prior_log_weights = program.log_weights(slice(0, 20), 500)
    assert pareto_khat(prior_log_weights).median() > 0.7

    simulated = bdmc(vae.model, vae.guide, num_data=20, data_shape=(x.shape[1],),
                     num_steps=num_steps, num_samples=num_chains, leapfrog_steps=leapfrog, seed=0)
    iwae_sim = estimate_log_marginal(vae.model, vae.guide, simulated.x, num_samples=cost, seed=0)
    ais_sim = ais_log_marginal(vae.model, vae.guide, simulated.x, num_steps=num_steps,
                               num_samples=num_chains, leapfrog_steps=leapfrog, seed=1)
    # the sandwich holds in expectation: paired per-image differences, within 3 standard errors
    def at_least(high, low):
        difference, stderr = mean_and_stderr(high - low)
        return difference > -3 * stderr - 0.01

    assert at_least(simulated.upper, simulated.lower)
    assert at_least(simulated.upper, iwae_sim.log_px) and at_least(iwae_sim.log_px, simulated.lower)
    assert at_least(simulated.upper, ais_sim.log_px) and at_least(ais_sim.log_px, simulated.lower)
    assert simulated.gap.mean() < 1.0


def test_ais_estimates_carry_their_monte_carlo_error():
    """Issue 19: AIS gives each row its Monte Carlo standard error from its K chains' weights,
    sqrt((K Σw² / (Σw)² - 1) / (K - 1)) (the delta method on log mean w), as importance sampling
    does: 0 where every chain's weight is p(x) (the exact posterior as f_0), > 0 from the prior."""
    import math as _math

    import pyro.distributions as _dist

    from ppl_lvm.ais import ais_log_marginal

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", _dist.Normal(0.0, 1.0))
            pyro.sample("x", _dist.Normal(z, 1.0), obs=x)

    def exact_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", _dist.Normal(x / 2, _math.sqrt(0.5)))
    x = torch.tensor([0.5, -1.0, 2.0])
    exact = ais_log_marginal(model, exact_guide, x, num_samples=8, num_steps=5, seed=0)
    assert torch.allclose(exact.mc_stderr, torch.zeros(3), atol=1e-3)
    prior = ais_log_marginal(model, None, x, num_samples=8, num_steps=5, seed=0)
    weights = prior.log_weights.double()
    ratio = (torch.logsumexp(2 * weights, 0) - 2 * torch.logsumexp(weights, 0)).exp()
    expected = ((8 * ratio - 1) / 7).clamp(min=0).sqrt()
    assert (prior.mc_stderr > 0).all()
    assert torch.allclose(prior.mc_stderr.double(), expected, atol=1e-5)
    assert prior.mean_mc_stderr > 0


def test_ais_takes_the_estimators_one_memory_default(ppca, monkeypatch):
    """One memory default for every estimator (issue 21): AIS, like log_marginal, plans its calls
    with particles.default_memory_bytes(device) (before: 1 GiB for AIS, 64 MiB for IWAE on the
    CPU). With the CPU default cut to the bytes of one row's chains, AIS takes one row per call,
    exactly as memory_bytes=that budget does."""
    from ppl_lvm import particles

    model, x = ppca
    explicit = ais_log_marginal(model.model, None, x[:5], num_steps=3, num_samples=2, seed=0,
                                memory_bytes=1)
    assert explicit.rows_per_call == 1
    monkeypatch.setattr(particles, "CPU_MEMORY_BYTES", 1)
    default = ais_log_marginal(model.model, None, x[:5], num_steps=3, num_samples=2, seed=0)
    assert default.rows_per_call == 1
    assert torch.equal(default.log_px, explicit.log_px)


def _shifted_model(x, y):
    """z_n ~ N(0, 1), x_n | z_n ~ N(z_n + y_n, 0.5²): log p(x_n | y_n) = log N(x_n; y_n, 1.25)."""
    with pyro.plate("rows", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(z + y, 0.5), obs=x)


def test_ais_takes_further_arguments_by_position_and_knows_their_rows_from_per_row():
    """One rule for the model's further arguments (issue 21): AIS takes them by position like
    every estimator (before: a TypeError, and log_marginal(method="ais") refused them), and a
    per-row one is sliced with x only when per_row says so (before: any tensor with N rows was
    sliced, a guess from its shape). Right answer: log N(x_n; y_n, 1 + 0.5²), in 3 chunks."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(9, generator=gen) * 3
    x = y + torch.randn(9, generator=gen) * 1.25 ** 0.5
    truth = dist.Normal(y, 1.25 ** 0.5).log_prob(x)
    common = dict(num_temperatures=200, num_samples=8, seed=0, chunk_size=4)
    by_position = ais_log_marginal(_shifted_model, None, x, y, per_row=(0,), **common)
    by_name = ais_log_marginal(_shifted_model, None, x, y=y, per_row=("y",), **common)
    assert torch.equal(by_position.log_px, by_name.log_px)
    # K = 8 chains, T = 200: within 0.3 nats (measured 0.17); a y row paired with another x row
    # would be off by several nats (y ~ 3 N(0, 1))
    assert torch.allclose(by_position.log_px, truth, atol=0.3)
    via_log_marginal = log_marginal(_shifted_model, None, x, y, per_row=(0,), method="ais",
                                    **common)
    assert torch.equal(via_log_marginal, by_position.log_px)
    with pytest.raises(ValueError, match="argument 'y' has 9 rows like x.*per_row"):
        ais_log_marginal(_shifted_model, None, x, y, **common)
    with pytest.raises(TypeError, match="'y' was given both by position and by keyword"):
        ais_log_marginal(_shifted_model, None, x, y, y=y, per_row=("y",), **common)
