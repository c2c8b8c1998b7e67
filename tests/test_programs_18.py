"""Issue 18's failure classes 4-8 that lie outside the density kernel, each on a real program
(tests/programs/ or Pyro's examples) with its right answer stated: per-row parameter tables in a
guide (4), authors who subsample their own plate (5), train mode during evaluation (6), crashes
turned into answers or one clear line (7), completion's health check (8)."""
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import constraints
from torch.nn.functional import softplus

from ppl_lvm import LocalGuide, estimate_log_marginal, fit, infer_local, log_marginal, program
from ppl_lvm.ais import ais_log_marginal
from ppl_lvm.completion import complete
from ppl_lvm.train import read_structure
from ppl_lvm import cli
from tests.programs import linear_gaussian
from tests.programs.prodlda import ProdLDA


pytestmark = pytest.mark.usefixtures("fresh_param_store")


# ---------------------------------------------------------------------------------------------
# class 6: train mode during evaluation (Pyro's ProdLDA tutorial: BatchNorm1d and Dropout)


def _prodlda():
    """ProdLDA as the tutorial writes it, after a few SVI steps in train mode (BatchNorm's running
    statistics have moved), with 30 documents of 20 words over 12 words."""
    torch.manual_seed(0)
    docs = torch.distributions.Multinomial(20, torch.softmax(torch.randn(12), 0)).sample((30,))
    lda = ProdLDA(vocab_size=12, num_topics=3, hidden=16, dropout=0.2)
    svi = SVI(lda.model, lda.guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(5):
        svi.step(docs)
    return lda, docs


def _modes(module):
    return [m.training for m in module.modules()]


def _running_stats(module):
    return [b.clone() for name, b in module.named_buffers() if "running" in name]


def test_estimators_score_batchnorm_and_dropout_in_eval_mode_and_restore_the_mode():  # class 6
    """The right answer is the estimate with the network put in eval mode by hand (running
    statistics, no dropout). Before: train mode, -21.54 against -21.34 (and BatchNorm's running
    statistics moved by the evaluation). The mode each module had is restored, mixed modes too."""
    lda, docs = _prodlda()
    lda.encoder.bnmu.eval()  # a module the user left in eval mode stays there
    modes, stats = _modes(lda), _running_stats(lda)
    estimate = estimate_log_marginal(lda.model, lda.guide, docs, num_samples=20, seed=0)
    assert _modes(lda) == modes and lda.training and not lda.encoder.bnmu.training
    assert all(torch.equal(a, b) for a, b in zip(stats, _running_stats(lda)))
    lda.eval()
    expected = estimate_log_marginal(lda.model, lda.guide, docs, num_samples=20, seed=0)
    assert torch.allclose(estimate.log_px, expected.log_px, atol=1e-5)


def test_evaluation_mode_restores_modes_after_an_exception_and_sees_modules_however_held():
    """A module reached through a closure (not an argument, not an attribute of the program) is
    in eval mode while the program runs; an exception inside leaves every mode as it was."""
    lda, docs = _prodlda()
    seen = []

    def model(x):
        lda.decoder(torch.softmax(torch.zeros(len(x), 3), -1))
        seen.append(_modes(lda.decoder))
        raise RuntimeError("the author's own error")

    with pytest.raises(RuntimeError, match="author's own"):
        with program.evaluation_mode():
            model(docs)
    assert seen == [[False] * len(seen[0])] and all(_modes(lda))
    assert hasattr(cli.evaluate, "__wrapped__")  # ppl-lvm evaluate runs under evaluation_mode


# ---------------------------------------------------------------------------------------------
# class 4: per-row parameter tables in a guide (Pyro's examples/sparse_gamma_def.py)

# one layer of the sparse gamma DEF: z_n ~ Gamma(A, B) per word of K, x_nk | z_nk ~ Poisson(z_nk),
# so z_nk | x_nk ~ Gamma(A + x_nk, B + 1), posterior mean (A + x_nk) / (B + 1)
A, B = 2.0, 1.0


def gamma_poisson_model(x):
    with pyro.plate("data", x.size(0)):
        z = pyro.sample("z", dist.Gamma(torch.full((x.size(1),), A), B).to_event(1))
        pyro.sample("obs", dist.Poisson(z).to_event(1), obs=x)


def sparse_gamma_guide(x):
    """The custom guide of sparse_gamma_def.py for one layer (its sample_zs, unchanged): one
    (alpha, mean) per row and word, made with x.size(0) rows and indexed by position."""
    x_size, width = x.size(0), x.size(1)

    def rand_tensor(shape, mean, sigma):
        return mean * torch.ones(shape) + sigma * torch.randn(shape)

    alpha_z_q = pyro.param("alpha_z_q", lambda: rand_tensor((x_size, width), 0.5, 0.1))
    mean_z_q = pyro.param("mean_z_q", lambda: rand_tensor((x_size, width), 0.0, 0.1))
    alpha_z_q, mean_z_q = softplus(alpha_z_q), softplus(mean_z_q)
    with pyro.plate("data", x_size):
        pyro.sample("z", dist.Gamma(alpha_z_q, alpha_z_q / mean_z_q).to_event(1))


def _counts():
    return torch.poisson(torch.full((20, 3), 3.0), generator=torch.Generator().manual_seed(0))


def test_a_guide_indexed_by_position_is_trained_full_batch_with_rows_in_order():  # class 4
    """Right answer: the posterior means (A + x) / (B + 1) (from 1 to 5.5). Pyro's own SVI, full
    batch, 300 steps: max error 0.33; fit with batch_size=N: 0.21 (before: 2.06, rows shuffled
    every epoch so each row's (alpha, mean) met another row's counts)."""
    x = _counts()
    truth = (A + x) / (B + 1)
    elbo = TraceMeanField_ELBO()
    pyro.set_rng_seed(0)
    svi = SVI(gamma_poisson_model, sparse_gamma_guide, pyro.optim.Adam({"lr": 0.1}), elbo)
    with pyro.validation_enabled(False):
        for _ in range(300):
            svi.step(x)
    pyro_error = (softplus(pyro.param("mean_z_q")) - truth).abs().max()
    fit(gamma_poisson_model, sparse_gamma_guide, x, epochs=300, batch_size=20, lr=0.1, loss=elbo,
        optim=pyro.optim.Adam({"lr": 0.1}), progress=False)
    fit_error = (softplus(pyro.param("mean_z_q")) - truth).abs().max()
    assert pyro_error < 0.5 and fit_error < 0.5


def test_minibatches_are_refused_for_any_guide_parameter_with_one_row_per_datapoint():  # class 4
    """Not only autoguides: the hand-written table is named, and nothing is left in the store."""
    x = _counts()
    with pytest.raises(ValueError, match=r"parameter 'alpha_z_q' \(shape \[3, 3\].*batch_size=20"):
        fit(gamma_poisson_model, sparse_gamma_guide, x, epochs=1, batch_size=8, progress=False)

    def table_guide(x):  # a table of all N rows made up front, as a closure would
        loc = pyro.param("loc", torch.ones(20, 3), constraint=constraints.positive)
        with pyro.plate("data", x.size(0)):
            pyro.sample("z", dist.Gamma(loc[:x.size(0)], 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"parameter 'loc' \(shape \[20, 3\]"):
        fit(gamma_poisson_model, table_guide, x, epochs=1, batch_size=8, progress=False)


# ---------------------------------------------------------------------------------------------
# class 5: authors who subsample their own plate (Pyro's SVI tutorial part II, tensor shapes)


def subsampled_model(data):
    """Pyro's svi_part_ii.ipynb "observe_data" plate with subsample_size, around a conjugate mean."""
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data), subsample_size=10) as ind:
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data[ind])


def subsampled_guide(data):
    q_loc = pyro.param("q_loc", torch.tensor(0.0))
    q_scale = pyro.param("q_scale", torch.tensor(1.0), constraint=constraints.positive)
    pyro.sample("loc", dist.Normal(q_loc, q_scale))


def test_a_model_that_subsamples_its_own_plate_trains_as_pyros_svi_trains_it():  # class 5
    """Right answer: loc | x ~ N(Σx / (N + 0.01), 1 / (N + 0.01)), mean 3.037 here. Before: fit
    crashed in its 3-row probe with Pyro's subsample message. Now all rows go in at every step
    and the plate scales by its own N / B once: fit's 200 steps are Pyro's SVI's, bit for bit
    (q_loc 3.081; a second N / B would have halved q_scale), an epoch is N / B = 10 steps."""
    x = torch.randn(100, generator=torch.Generator().manual_seed(0)) + 3
    posterior_mean = x.sum() / (100 + 0.01)

    def optim():
        return pyro.optim.ClippedAdam({"lr": 0.1, "lrd": 0.01 ** (1 / 200)})

    pyro.set_rng_seed(0)
    svi = SVI(subsampled_model, subsampled_guide, optim(), Trace_ELBO())
    for _ in range(200):
        svi.step(x)
    expected = pyro.param("q_loc").item(), pyro.param("q_scale").item()
    result = fit(subsampled_model, subsampled_guide, x, epochs=20, batch_size=8, optim=optim(),
                 progress=False)
    assert result.step == 200
    assert (pyro.param("q_loc").item(), pyro.param("q_scale").item()) == expected
    assert abs(expected[0] - posterior_mean) < 0.1


def test_a_subsampling_model_is_scored_on_every_row_and_refused_by_ais_naming_the_plate():  # class 5
    """z_n ~ N(0, 1), x_n ~ N(z_n, 1) in a plate with subsample_size=5 of 20 rows, the exact
    posterior N(x_n / 2, 1/2) as its guide (subsampled alike). Right answer: every IWAE weight is
    p(x_n) = N(x_n; 0, 2), for all 20 rows (before: Pyro's subsample message from the 2-row probe).
    log_marginal scores the rows 5 at a time, the plate's draw replaced by those rows and its
    N / B scale undone; AIS refuses in one line naming the plate and its subsample_size."""
    def model(x):
        with pyro.plate("data", len(x), subsample_size=5) as ind:
            assert len(ind) == 5
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([5]))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x[ind])

    def guide(x):
        with pyro.plate("data", len(x), subsample_size=5) as ind:
            pyro.sample("z", dist.Normal(x[ind] / 2, 0.5 ** 0.5))

    x = torch.randn(18, generator=torch.Generator().manual_seed(2))  # a short last block of 3
    right = dist.Normal(0.0, 2.0 ** 0.5).log_prob(x)
    assert torch.allclose(log_marginal(model, guide, x, num_samples=4, seed=0), right, atol=1e-5)
    message = r"data plate 'data' subsamples itself \(subsample_size=5 of 18 rows\)"
    with pytest.raises(ValueError, match=message):
        ais_log_marginal(model, guide, x, num_steps=2, num_samples=2)


def test_the_structure_probe_respects_the_authors_own_shape_check():  # class 5
    """A model that asserts its row count is read on all its rows, not crashed on two, and fit
    trains it full batch. Right answer: z_n | x_n = N(x_n / 2, 1/2); a guide with one (loc, scale)
    per row (rows kept in order) reaches loc = x / 2."""
    x = torch.randn(12, generator=torch.Generator().manual_seed(1))

    def model(x):
        assert x.shape[0] == 12, "the author's own check"
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", lambda: torch.zeros(len(x)))
        scale = pyro.param("scale", lambda: torch.ones(len(x)), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, scale))

    structure = read_structure(model, (x,), None, {})
    assert structure.plate_name == "data" and structure.local_latents == ("z",)
    fit(model, guide, x, epochs=300, batch_size=12, lr=0.05, lr_schedule="cosine",
        loss=Trace_ELBO(num_particles=8, vectorize_particles=True), progress=False)
    assert torch.allclose(pyro.param("loc").detach(), x / 2, atol=0.1)


# ---------------------------------------------------------------------------------------------
# class 7: crashes turned into right answers or one clear line


def test_infer_local_proposes_a_positive_latent_inside_its_support():  # class 7
    """The Gamma-Poisson layer of sparse_gamma_def: infer_local's LocalGuide is a log-normal for the
    Gamma site. Right answer: log p(x_n) = Σ_k NegBinomial(x_nk; A, 1 / (B + 1)) in closed form;
    IWAE with K=500 is within 0.06 nats of it on every row (before: a Normal proposed negative
    rates and the model's Poisson raised)."""
    x = _counts()
    guide = infer_local(gamma_poisson_model, x, steps=300, lr=0.05)
    exact = dist.NegativeBinomial(total_count=torch.tensor(A), probs=torch.tensor(1 / (B + 1))
                                  ).log_prob(x).sum(-1)
    estimate = log_marginal(gamma_poisson_model, guide, x, num_samples=500, seed=0)
    assert (estimate - exact).abs().max() < 0.1


def test_a_local_guide_refuses_a_support_it_cannot_reach_naming_the_site():  # class 7
    with pytest.raises(ValueError, match=r"site 'theta' has support Simplex"):
        LocalGuide(4, {"theta": 3}, supports={"theta": constraints.simplex})


@pytest.mark.slow
def test_ais_on_a_program_that_cannot_be_vectorised_loops_over_its_chains():  # class 7
    """ProdLDA's BatchNorm1d reads [K, B, V] as [batch, channels, length]: AIS's K chains cannot
    run through it vectorised (before: RuntimeError 'running_mean should contain 30 elements not
    12' from inside torch). AIS then traces chain by chain: a lower bound near IWAE's (here mean
    -22.30 against IWAE-200's -22.31 with K=4, T=20; K=2, T=5 below), every row finite."""
    lda, docs = _prodlda()
    iwae = log_marginal(lda.model, lda.guide, docs, num_samples=50, seed=0)
    ais = ais_log_marginal(lda.model, lda.guide, docs, num_steps=5, num_samples=2, seed=0)
    assert torch.isfinite(ais.log_px).all() and abs(ais.log_px.mean() - iwae.mean()) < 1.0


# ---------------------------------------------------------------------------------------------
# class 8: completion's health check (factor analysis, tests/programs/linear_gaussian.py)


def zero_filled_encoder(x):
    """q(latent | x) = p(latent | x) for a fully observed x: complete feeds it the zero-filled
    image, so where features are missing it proposes from the wrong place (a VAE encoder
    trained on complete data, in closed form)."""
    loc, covariance = linear_gaussian.posterior(x)
    with pyro.plate("data", x.shape[0], dim=-2):
        pyro.sample("latent", dist.MultivariateNormal(loc.unsqueeze(-2), covariance))


def test_completion_reports_khat_and_defaults_to_what_is_right():  # class 8
    """Right answer: E[x_miss | x_obs] of N(μ, W Wᵀ + σ² I) in closed form (conditional sd 1.0
    and 1.7). SIR from the zero-filled encoder: max error 1.96 on the missing features, k̂ 0.73-1.11,
    ESS 2.8-53 of 1000 (before: the default, and it said nothing; MwG with the observed proposal:
    1.76). Now SIR reports k̂ and warns; the default ("auto") moves the rows SIR cannot be
    trusted on to MwG with the completed proposal: max error 0.11 (256 chains, 100 steps)."""
    x = linear_gaussian.make_data(num_data=4, seed=5)
    mask = torch.tensor([True, False, True, False]).expand(4, 4)
    w, mu, noise = linear_gaussian.WEIGHT, linear_gaussian.MEAN, linear_gaussian.NOISE
    cov = w @ w.T + noise ** 2 * torch.eye(4)
    o, m = mask[0], ~mask[0]
    right = mu[m] + (x[:, o] - mu[o]) @ torch.linalg.solve(cov[o][:, o], cov[o][:, m])
    with pytest.warns(RuntimeWarning, match="k̂"):
        sir = complete(linear_gaussian.model, zero_filled_encoder, x, mask, method="sir", seed=0)
    assert sir.khat.shape == (4,) and (sir.khat > 0.7).any() and not sir.trusted.all()
    assert (sir.mean[:, m] - right).abs().max() > 1.0
    default = complete(linear_gaussian.model, zero_filled_encoder, x, mask, num_samples=256,
                       num_steps=100, seed=0)
    assert default.trusted.all() and default.method in ("mwg", "sir+mwg")
    assert (default.mean[:, m] - right).abs().max() < 0.3
