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
    fit_mixture,
    kmeans_init,
    kmeans_pp_centers,
    select_components,
)


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


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_estimators_exact_log_marginal_is_the_closed_form(covariance):
    from ppl_lvm.estimators import log_marginal

    mog = random_mixture(covariance)
    x = torch.randn(15, 2) * 3
    estimate = log_marginal(mog.model, enumeration_guide, x, method="exact")
    with torch.no_grad():
        assert torch.allclose(estimate, mog.log_prob(x), atol=1e-4)
