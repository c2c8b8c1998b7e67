import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO, infer_discrete
from sklearn.cluster import kmeans_plusplus
from sklearn.mixture import GaussianMixture

from ppl_lvm.models.mog import (
    AmortizedCategoricalGuide,
    CategoricalEncoder,
    LocalCategoricalGuide,
    MixtureOfGaussians,
    enumeration_guide,
    kmeans_init,
    kmeans_pp_centers,
)
from ppl_lvm.mixtures import e_step, em_step, fit_mixture, m_step, select_components


def two_component_problem():
    """π = (0.3, 0.7), μ = (-1, 2), σ = (0.5, 1.5) in one dimension."""
    mog = MixtureOfGaussians(2, 1)
    mog.set_parameters(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0], [2.0]]),
                       torch.tensor([[0.25], [2.25]]))
    x = torch.tensor([[-2.0], [-1.0], [0.0], [0.5], [1.0], [3.0], [6.0]])
    return mog, x


def normal_pdf(x, loc, scale):
    return math.exp(-0.5 * ((x - loc) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))


def mixture_data(num_data=600, seed=0):
    """Three well separated 2-D clusters with known means."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.tensor([[-4.0, 0.0], [0.0, 4.0], [4.0, -1.0]])
    z = torch.multinomial(torch.tensor([0.2, 0.3, 0.5]), num_data, replacement=True, generator=generator)
    x = means[z] + torch.randn(num_data, 2, generator=generator) * torch.tensor([0.7, 0.4])
    return x, z, means


def random_mixture(covariance, K=3, D=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mog = MixtureOfGaussians(K, D, covariance)
    weights = torch.rand(K, generator=generator) + 0.2
    means = 3 * torch.randn(K, D, generator=generator)
    if covariance == "diag":
        cov = torch.rand(K, D, generator=generator) + 0.3
    else:
        a = torch.randn(K if covariance == "full" else 1, D, D, generator=generator)
        cov = a @ a.transpose(-1, -2) + 0.5 * torch.eye(D)
        cov = cov if covariance == "full" else cov[0]
    mog.set_parameters(weights / weights.sum(), means, cov)
    return mog


def test_responsibilities_are_bayes_rule():
    mog, x = two_component_problem()
    expected = []
    for value in x[:, 0].tolist():
        joint = [0.3 * normal_pdf(value, -1.0, 0.5), 0.7 * normal_pdf(value, 2.0, 1.5)]
        expected.append([j / sum(joint) for j in joint])
    with torch.no_grad():
        proba = mog.predict_proba(x)
        labels = mog.cluster(x)
    assert torch.allclose(proba, torch.tensor(expected), atol=1e-5)
    assert torch.equal(labels, proba.argmax(-1))


def test_infer_discrete_map_matches_cluster():
    mog, x = two_component_problem()
    pyro.clear_param_store()
    trace = pyro.poutine.trace(
        infer_discrete(mog.model, first_available_dim=-2, temperature=0)).get_trace(x)
    assert torch.equal(trace.nodes["z"]["value"], mog.cluster(x))


@pytest.mark.parametrize("covariance", ["diag", "full", "tied"])
def test_log_prob_is_the_sum_over_components(covariance):
    mog = random_mixture(covariance)
    x = torch.randn(20, 2) * 3
    weights, cov = mog.weights, mog.covariance_matrix
    expected = torch.zeros(20)
    for k in range(3):
        expected += weights[k] * torch.distributions.MultivariateNormal(mog.loc[k], cov[k]).log_prob(x).exp()
    with torch.no_grad():
        assert torch.allclose(mog.log_prob(x), expected.log(), atol=1e-4)


@pytest.mark.parametrize("covariance", ["diag", "full", "tied"])
def test_log_prob_and_bic_match_scikit_learn(covariance):
    x, _, _ = mixture_data(300)
    gm = GaussianMixture(3, covariance_type=covariance, random_state=0).fit(x.numpy())
    mog = MixtureOfGaussians(3, 2, covariance)
    mog.set_parameters(torch.tensor(gm.weights_, dtype=torch.float32),
                       torch.tensor(gm.means_, dtype=torch.float32),
                       torch.tensor(gm.covariances_, dtype=torch.float32))
    with torch.no_grad():
        assert np.allclose(mog.log_prob(x).numpy(), gm.score_samples(x.numpy()), atol=1e-3)
        assert mog.bic(x) == pytest.approx(gm.bic(x.numpy()), rel=1e-4)


def test_enumeration_loss_is_minus_log_likelihood():
    mog, x = two_component_problem()
    pyro.clear_param_store()
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(mog.model, enumeration_guide, x)
    assert loss == pytest.approx(-mog.log_prob(x).sum().item(), rel=1e-5)


def test_reinforce_and_enumeration_optimise_the_same_objective():
    mog, x = two_component_problem()
    pyro.clear_param_store()
    enum_loss = TraceEnum_ELBO(max_plate_nesting=1).loss(mog.model, enumeration_guide, x)
    with torch.no_grad():
        joint = mog.joint_log_prob(x)
    # at q = p(z | x) every sample of the ELBO equals log p(x): the two losses agree exactly
    exact_guide = LocalCategoricalGuide(len(x), 2, init_logits=joint.log_softmax(-1))
    for _ in range(5):
        assert TraceGraph_ELBO().loss(mog.model, exact_guide, x) == pytest.approx(enum_loss, rel=1e-5)
    # for any other q the Monte Carlo loss averages to the closed-form -ELBO(q) >= -log p(x)
    logits = torch.randn(len(x), 2, generator=torch.Generator().manual_seed(1))
    guide = LocalCategoricalGuide(len(x), 2, init_logits=logits)
    log_q = logits.log_softmax(-1)
    exact = -(log_q.exp() * (joint - log_q)).sum().item()
    pyro.set_rng_seed(0)
    elbo = TraceGraph_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    assert elbo.loss(mog.model, guide, x) == pytest.approx(exact, rel=0.01)
    assert exact > enum_loss


def test_reinforce_gradient_matches_enumeration_at_the_posterior():
    """With q = p(z | x), the expected model gradient of the ELBO is ∇ log p(x) (Fisher's identity)."""
    mog, x = two_component_problem()
    with torch.no_grad():
        log_resp = mog.joint_log_prob(x).log_softmax(-1)
    pyro.clear_param_store()
    TraceEnum_ELBO(max_plate_nesting=1).loss_and_grads(mog.model, enumeration_guide, x)
    enum_grad = mog.loc.grad.clone()
    mog.zero_grad()
    def guide(x):  # Pyro's baselines do not broadcast over vectorized particles
        with pyro.plate("data", len(x)):
            pyro.sample("z", pyro.distributions.Categorical(logits=log_resp))

    pyro.set_rng_seed(0)
    TraceGraph_ELBO(num_particles=4000, vectorize_particles=True,
                    max_plate_nesting=1).loss_and_grads(mog.model, guide, x)
    assert torch.allclose(mog.loc.grad, enum_grad, atol=0.05 * enum_grad.abs().max().item())


def overlapping_data(num_data=400, seed=0):
    """Three overlapping, correlated 2-D clusters: EM needs 100-600 iterations from k-means."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0, 0.0], [1.5, 0.5], [0.5, 2.0]])
    shear = 0.6 * torch.randn(3, 2, 2, generator=generator)
    z = torch.multinomial(torch.tensor([0.3, 0.3, 0.4]), num_data, replacement=True, generator=generator)
    noise = (shear[z] @ torch.randn(num_data, 2, 1, generator=generator)).squeeze(-1)
    return (means[z] + noise + 0.3 * torch.randn(num_data, 2, generator=generator)).double()


def scikit_learn_em(x, init, covariance, tol):
    """scikit-learn's EM from the ``kmeans_init`` start (its own k-means is overridden by the inits)."""
    weights, covariances = init["weights"].double().numpy(), init["covariances"].double().numpy()
    precisions = 1 / covariances if covariance == "diag" else np.linalg.inv(covariances)
    if covariance != "diag":  # sklearn checks symmetry exactly; inv is symmetric only to rounding
        precisions = (precisions + precisions.swapaxes(-1, -2)) / 2
    return GaussianMixture(len(weights), covariance_type=covariance, weights_init=weights / weights.sum(),
                           means_init=init["means"].double().numpy(), precisions_init=precisions,
                           init_params="random_from_data", tol=tol, max_iter=2000,
                           reg_covar=1e-6).fit(x.double().numpy())


def test_e_step_is_the_posterior_of_the_enumerated_pyro_model():
    mog = random_mixture("full").double()
    x = torch.randn(30, 2, dtype=torch.float64) * 3
    log_likelihood, log_resp = e_step(mog, x)
    # Pyro's parallel enumeration of the model: z's values along dim -2, one log p(x_i | z) per value
    pyro.clear_param_store()
    trace = pyro.poutine.trace(pyro.poutine.enum(mog.model, first_available_dim=-2)).get_trace(x)
    trace.compute_log_prob()
    joint = (trace.nodes["z"]["log_prob"] + trace.nodes["x"]["log_prob"]).T       # [N, K]
    assert torch.allclose(log_resp, joint.log_softmax(-1), atol=1e-12)
    assert torch.allclose(log_likelihood, joint.logsumexp(-1), atol=1e-12)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(mog.model, enumeration_guide, x)
    assert loss == pytest.approx(-log_likelihood.sum().item(), rel=1e-10)


@pytest.mark.parametrize("covariance", ["diag", "full", "tied"])
def test_m_step_with_hard_responsibilities_is_each_clusters_sample_moments(covariance):
    x, z, _ = mixture_data(90)
    x = x.double()
    params = m_step(x, torch.nn.functional.one_hot(z, 3).double(), covariance, reg_covar=0.01)
    for k in range(3):
        rows = x[z == k]
        assert params["weights"][k].item() == pytest.approx(len(rows) / 90, abs=1e-12)
        assert torch.allclose(params["means"][k], rows.mean(0), atol=1e-12)
        cov = torch.cov(rows.T, correction=0) + 0.01 * torch.eye(2, dtype=torch.float64)
        if covariance == "diag":
            assert torch.allclose(params["covariances"][k], cov.diagonal(), atol=1e-10)
        elif covariance == "full":
            assert torch.allclose(params["covariances"][k], cov, atol=1e-10)
    if covariance == "tied":
        within = sum(torch.cov(x[z == k].T, correction=0) * (z == k).sum() for k in range(3)) / 90
        assert torch.allclose(params["covariances"], within + 0.01 * torch.eye(2, dtype=torch.float64),
                              atol=1e-10)


@pytest.mark.parametrize("covariance", ["diag", "full", "tied"])
def test_em_step_never_lowers_the_log_likelihood(covariance):
    x = overlapping_data()
    mog = random_mixture(covariance, seed=1).double()   # a poor start, far from the clusters
    before = mog.log_prob(x).mean().item()
    first = before
    for _ in range(60):
        assert em_step(mog, x, reg_covar=0.0) == pytest.approx(before, abs=1e-12)
        with torch.no_grad():
            after = mog.log_prob(x).mean().item()
        assert after >= before - 1e-12
        before = after
    assert before > first + 0.5


@pytest.mark.parametrize("covariance", ["diag", "full", "tied"])
def test_em_fixed_point_is_scikit_learns(covariance):
    x = overlapping_data()
    init = kmeans_init(x, 3, seed=0, covariance=covariance)
    gm = scikit_learn_em(x, init, covariance, tol=1e-10)
    result = fit_mixture(x, 3, "em", covariance, init_params=init, tol=1e-10, max_iter=2000)
    mog = result.mixture
    assert result.converged and result.method == "em" and mog.loc.dtype == torch.float64
    assert result.epochs == gm.n_iter_ > 20                    # the same iterations, a real climb
    assert np.allclose(result.log_likelihoods, gm.lower_bounds_, atol=1e-8)
    with torch.no_grad():
        assert mog.log_prob(x).mean().item() == pytest.approx(gm.score(x.numpy()), abs=1e-5)
        covariances = mog.covariance_matrix.numpy()
    expected = (np.stack([np.diag(v) for v in gm.covariances_]) if covariance == "diag" else
                np.broadcast_to(gm.covariances_, (3, 2, 2)))
    assert np.allclose(mog.weights.detach().numpy(), gm.weights_, atol=1e-5)
    assert np.allclose(mog.loc.detach().numpy(), gm.means_, atol=1e-5)
    assert np.allclose(covariances, expected, atol=1e-5)
    # scikit-learn's default tol stops both after the same number of iterations
    default = fit_mixture(x, 3, "em", covariance, init_params=init)
    assert default.epochs == scikit_learn_em(x, init, covariance, tol=1e-3).n_iter_


def test_fit_mixture_defaults_to_em_and_its_guide_is_the_exact_posterior():
    x = overlapping_data(200)
    result = fit_mixture(x, 3)
    assert result.method == "em" and result.converged
    # the empty guide under enumeration is q = p(z | x): its loss is the final -log p(x)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(result.mixture.model, result.guide, x)
    with torch.no_grad():
        assert loss == pytest.approx(-result.mixture.log_prob(x).sum().item(), rel=1e-10)
    assert fit_mixture(x.float(), 3, "enum", max_epochs=2).method == "enum"


def test_em_clear_errors():
    x, _, _ = mixture_data(10)
    with pytest.raises(ValueError, match="num_components"):
        fit_mixture(x, 11, "em")
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        fit_mixture(bad, 2, "em")
    with pytest.raises(ValueError, match="covariance .*'spherical'"):
        fit_mixture(x, 2, "em", "spherical")
    with pytest.raises(ValueError, match="covariance"):
        m_step(x, torch.ones(10, 2) / 2, "spherical")
    with pytest.raises(ValueError, match="tol"):
        fit_mixture(x, 2, "em", tol=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        fit_mixture(x, 2, "em", max_iter=0)
    duplicated = torch.zeros(20, 2, dtype=torch.float64)
    duplicated[:10] += 1   # two points repeated: zero covariance without regularisation
    with pytest.raises(ValueError, match="reg_covar"):
        fit_mixture(duplicated, 2, "em", "full", reg_covar=0.0)


def test_enum_fit_recovers_the_means_up_to_permutation():
    x, z, means = mixture_data()
    result = fit_mixture(x, 3, "enum", max_epochs=300, seed=0)
    fitted = result.mixture.loc.detach()
    order = torch.cdist(means, fitted).argmin(-1)
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(fitted[order], means, atol=0.15)
    assert torch.allclose(result.mixture.weights.detach()[order], torch.bincount(z) / len(z), atol=0.03)
    assert result.losses[-1] <= result.losses[0] + 1e-6


def test_enum_fit_matches_em_on_the_same_start():
    x, _, _ = mixture_data(400, seed=1)
    init = kmeans_init(x, 3, seed=0)
    gm = GaussianMixture(3, covariance_type="diag", weights_init=init["weights"].double().numpy(),
                         means_init=init["means"].numpy(), precisions_init=1 / init["covariances"].numpy(),
                         tol=1e-6, max_iter=500).fit(x.numpy())
    result = fit_mixture(x, 3, "enum", init_params=init, max_epochs=500)
    with torch.no_grad():
        ll = result.mixture.log_prob(x).mean().item()
    assert ll == pytest.approx(gm.score(x.numpy()), abs=2e-3)


@pytest.mark.parametrize("method", ["reinforce", "amortized"])
def test_guided_fits_run_and_keep_the_clusters(method):
    x, z, means = mixture_data(300)
    result = fit_mixture(x, 3, method, max_epochs=6, batch_size=100, track_log_likelihood=True)
    assert len(result.losses) == len(result.log_likelihoods) == result.epochs
    assert all(math.isfinite(v) for v in result.losses)
    fitted = result.mixture.loc.detach()
    assert torch.cdist(means, fitted).min(-1).values.max() < 0.3


@pytest.mark.slow
def test_amortized_reinforce_estimator_runs():
    x, _, _ = mixture_data(200)
    result = fit_mixture(x, 3, "amortized", estimator="reinforce", max_epochs=5)
    assert result.epochs == 5 and isinstance(result.guide, AmortizedCategoricalGuide)


@pytest.mark.parametrize("covariance", ["diag", "full", "tied"])
def test_shapes_and_positive_definite_covariances(covariance):
    x, _, _ = mixture_data(200)
    result = fit_mixture(x, 4, "enum", covariance, max_epochs=30)
    mog = result.mixture
    with torch.no_grad():
        assert mog.predict_proba(x).shape == (200, 4)
        assert torch.allclose(mog.predict_proba(x).sum(-1), torch.ones(200))
        assert mog.cluster(x).shape == (200,) and mog.cluster(x).dtype == torch.long
        assert mog.log_prob(x).shape == (200,)
        assert mog.covariance_matrix.shape == (4, 2, 2)
        assert (torch.linalg.eigvalsh(mog.covariance_matrix) > 0).all()
        assert torch.allclose(mog.weights.sum(), torch.tensor(1.0))
        samples, labels = mog.sample(50, return_z=True)
    assert samples.shape == (50, 2) and labels.shape == (50,)


def test_ancestral_samples_have_the_mixture_moments():
    mog = random_mixture("full")
    x = mog.sample(40000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean = mog.weights @ mog.loc
    assert torch.allclose(x.mean(0), mean, atol=0.05)


def test_kmeans_init_is_seeded_and_close_to_the_clusters():
    x, _, means = mixture_data()
    a, b = kmeans_init(x, 3, seed=3), kmeans_init(x, 3, seed=3)
    assert torch.equal(a["means"], b["means"])
    assert torch.cdist(means, a["means"]).min(-1).values.max() < 0.2
    assert a["covariances"].shape == (3, 2) and torch.allclose(a["weights"].sum(), torch.tensor(1.0))


def test_kmeans_pp_centers_are_scikit_learns_seeding():
    x, _, _ = mixture_data(300)
    expected, indices = kmeans_plusplus(x.double().numpy(), 3, random_state=4)
    centers = kmeans_pp_centers(x, 3, seed=4)
    assert torch.equal(centers, x[torch.as_tensor(indices)])
    assert np.allclose(centers.double().numpy(), expected)
    # the same draws whatever the dtype of the data
    assert torch.equal(kmeans_pp_centers(x.double(), 3, seed=4), x.double()[torch.as_tensor(indices)])


def test_local_guide_reads_its_rows():
    guide = LocalCategoricalGuide(5, 3, init_logits=torch.eye(5, 3) * 50)
    x = torch.zeros(2, 1)
    trace = pyro.poutine.trace(guide).get_trace(x, idx=torch.tensor([1, 2]), num_data=5)
    assert trace.nodes["z"]["value"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="idx"):
        guide(x)


@pytest.mark.slow
def test_select_components_reports_held_out_ll_and_bic():
    x, _, _ = mixture_data(400)
    rows = select_components(x[:300], x[300:], [1, 3], max_epochs=100)
    assert [row["k"] for row in rows] == [1, 3]
    assert rows[1]["test_ll"] > rows[0]["test_ll"] and rows[1]["bic"] < rows[0]["bic"]


def test_clear_errors():
    with pytest.raises(ValueError, match="num_components"):
        MixtureOfGaussians(0, 2)
    with pytest.raises(ValueError, match="covariance"):
        MixtureOfGaussians(2, 2, "spherical")
    x, _, _ = mixture_data(10)
    with pytest.raises(ValueError, match="N=10"):
        fit_mixture(x, 11)
    with pytest.raises(ValueError, match="exceeds"):
        kmeans_init(x, 11)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_mixture(bad, 2)
    mog = MixtureOfGaussians(2, 3)
    with pytest.raises(ValueError, match="data_dim=3"):
        mog.log_prob(x)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        mog.log_prob(torch.zeros(3))
    with pytest.raises(ValueError, match="method"):
        fit_mixture(x, 2, "gibbs")
    with pytest.raises(ValueError, match="estimator"):
        AmortizedCategoricalGuide(CategoricalEncoder(2, 2), estimator="vimco")


@pytest.mark.cuda
def test_fit_on_cuda():
    x, _, _ = mixture_data(200)
    result = fit_mixture(x, 3, "enum", max_epochs=10, device="cuda")
    assert result.mixture.loc.device.type == "cuda"
    assert result.mixture.predict_proba(x.cuda()).device.type == "cuda"


@pytest.mark.cuda
@pytest.mark.parametrize("covariance", ["diag", "full", "tied"])
def test_em_on_cuda_is_em_on_cpu(covariance):
    x = overlapping_data()
    init = kmeans_init(x, 3, seed=0, covariance=covariance)
    cpu = fit_mixture(x, 3, "em", covariance, init_params=init, tol=1e-8)
    cuda = fit_mixture(x, 3, "em", covariance, init_params=init, tol=1e-8, device="cuda")
    assert cuda.mixture.loc.device.type == "cuda" and cuda.epochs == cpu.epochs
    assert np.allclose(cuda.log_likelihoods, cpu.log_likelihoods, atol=1e-9)
    assert torch.allclose(cuda.mixture.covariance_matrix.cpu(), cpu.mixture.covariance_matrix, atol=1e-8)
    assert cuda.mixture.predict_proba(x.cuda()).device.type == "cuda"


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_estimators_exact_log_marginal_is_the_closed_form(covariance):
    from ppl_lvm.estimators import log_marginal

    mog = random_mixture(covariance)
    x = torch.randn(15, 2) * 3
    estimate = log_marginal(mog.model, enumeration_guide, x, method="exact")
    with torch.no_grad():
        assert torch.allclose(estimate, mog.log_prob(x), atol=1e-4)


@pytest.mark.parametrize("covariance", ["diag", "full", "tied"])
def test_em_densities_from_precision_factors_are_the_components_log_prob(covariance):
    from ppl_lvm.mixtures import e_step, gaussian_log_prob, precision_cholesky

    torch.manual_seed(0)
    mixture = MixtureOfGaussians(3, 4, covariance).double()
    with torch.no_grad():
        for param in mixture.parameters():
            param.normal_(0, 0.5)
        x = torch.randn(7, 4, dtype=torch.float64) * 2
        expected = mixture.component().log_prob(x.unsqueeze(-2))          # torch's own, [N, K]
        actual = gaussian_log_prob(x, mixture.loc, precision_cholesky(mixture), covariance)
        assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-10)
        log_likelihood, log_resp = e_step(mixture, x)
        assert torch.allclose(log_likelihood, mixture.log_prob(x), rtol=1e-10, atol=1e-10)
        assert torch.allclose(log_resp.exp(), mixture.predict_proba(x), atol=1e-10)


def test_em_keeps_its_old_import_path():
    # EM moved to ppl_lvm.mixtures (models/ holds models only); the old path gives the same objects
    from ppl_lvm import mixtures
    from ppl_lvm.models.mog import e_step, em_step, gaussian_log_prob, m_step, precision_cholesky

    assert (e_step, em_step, m_step) == (mixtures.e_step, mixtures.em_step, mixtures.m_step)
    assert (gaussian_log_prob, precision_cholesky) == (mixtures.gaussian_log_prob,
                                                        mixtures.precision_cholesky)
