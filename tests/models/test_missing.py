import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from scipy.stats import multivariate_normal

from ppl_lvm.completion import (complete, imputation_scores, knn_imputation,
                                log_marginal_observed, mean_imputation, mixture_conditional)
from ppl_lvm.models.missing import (
    MaskedVAE, bottom_half, check_missing, fill_missing, left_half, make_mask, mcar, random_blocks,
    right_half, top_half)
from ppl_lvm.models.ppca import PPCA
from ppl_lvm.models.vae import VAE
from ppl_lvm.plate import data_plate
from ppl_lvm.train import fit


class MaskedPPCA(PPCA):
    """PPCA with missing entries: p(x_obs) = N(x_obs; b_o, W_o W_oᵀ + σ² I) and its exact posterior."""

    def model(self, x, mask, idx=None, num_data=None):
        pyro.module("ppca", self)
        x = fill_missing(x, mask)
        zeros = x.new_zeros(self.z_dim)
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            loc = z @ self.weight.T + self.bias
            pyro.sample("x", dist.Normal(loc, self.noise_scale).mask(mask).to_event(1), obs=x)

    def guide(self, x, mask, idx=None, num_data=None):
        """p(z | x_obs): precision I + W_oᵀ W_o / σ², per row (each row has its own mask)."""
        x = fill_missing(x, mask)
        variance = self.noise_scale**2
        weight = self.weight * mask[:, :, None]  # [N, D, M], rows of missing dims zeroed
        precision = torch.eye(self.z_dim) + weight.transpose(1, 2) @ weight / variance
        covariance = torch.linalg.inv(precision)
        resid = (fill_missing(x - self.bias, mask))[:, :, None]
        loc = (covariance @ weight.transpose(1, 2) @ resid).squeeze(-1) / variance
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(covariance)))

    def log_marginal_observed_exact(self, x, mask):
        out = []
        for row, observed in zip(x, mask):
            w, b = self.weight[observed], self.bias[observed]
            cov = w @ w.T + self.noise_scale**2 * torch.eye(int(observed.sum()))
            out.append(dist.MultivariateNormal(b, cov).log_prob(row[observed]))
        return torch.stack(out)


def make_ppca(data_dim=6, z_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(data_dim, z_dim, generator=g)
    bias = torch.randn(data_dim, generator=g)
    return MaskedPPCA(weight, bias, 0.5)


def binary_data(num_rows=96, data_dim=16, seed=0):
    """Two prototypes with 10 % flipped pixels: binary data with structure worth learning."""
    g = torch.Generator().manual_seed(seed)
    prototypes = (torch.rand(2, data_dim, generator=g) > 0.5).float()
    x = prototypes[torch.randint(2, (num_rows,), generator=g)]
    flip = torch.rand(num_rows, data_dim, generator=g) < 0.1
    return torch.where(flip, 1 - x, x)


# ---------------------------------------------------------------------------------------------
# masks


def test_half_masks_hide_the_named_half():
    image = torch.arange(16.0).reshape(4, 4)
    for mask_fn, hidden in [(top_half, image[:2]), (bottom_half, image[2:]),
                            (left_half, image[:, :2]), (right_half, image[:, 2:])]:
        mask = mask_fn(3, 16)
        assert mask.shape == (3, 16) and mask.dtype == torch.bool
        assert set(image.flatten()[~mask[0]].tolist()) == set(hidden.flatten().tolist())
        assert torch.equal(mask[0], mask[2])
    assert top_half(2, 784).reshape(2, 28, 28)[:, :14].sum() == 0


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75])
def test_mcar_exact_rate_and_seeded(rate):
    mask = mcar(50, 64, rate, seed=3)
    assert ((~mask).sum(-1) == round(rate * 64)).all()
    assert torch.equal(mask, mcar(50, 64, rate, seed=3))
    assert not torch.equal(mask, mcar(50, 64, rate, seed=4))
    with pytest.raises(ValueError, match="rate"):
        mcar(5, 64, 1.0)


def test_random_blocks_hide_one_square_each():
    mask = random_blocks(20, 64, block_size=3, seed=1)
    assert ((~mask).sum(-1) == 9).all()
    assert torch.equal(mask, random_blocks(20, 64, block_size=3, seed=1))
    squares = (~mask).reshape(20, 8, 8)
    rows, cols = squares[0].nonzero().T
    assert rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2
    with pytest.raises(ValueError, match="whole"):
        random_blocks(2, 64, block_size=8)


def test_make_mask_by_name():
    assert torch.equal(make_mask("top_half", 2, 64), top_half(2, 64))
    assert torch.equal(make_mask("mcar", 2, 64, rate=0.5, seed=1), mcar(2, 64, 0.5, seed=1))
    with pytest.raises(ValueError, match="unknown mask"):
        make_mask("diagonal", 2, 64)
    with pytest.raises(ValueError, match="square"):
        top_half(2, 10)


# ---------------------------------------------------------------------------------------------
# clear errors; NaN where missing is fine


def test_bad_masks_and_values_get_clear_errors():
    x = torch.rand(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="bool"):
        check_missing(x, mask.float())
    with pytest.raises(ValueError, match="shape"):
        check_missing(x, mask[:, :5])
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match="no observed pixel"):
        check_missing(x, empty)
    bad = x.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="observed pixels"):
        check_missing(bad, mask)
    mask[1, 3] = False
    check_missing(bad, mask)  # NaN where missing: fine
    vae = MaskedVAE(6, 2, 8)
    for call in (lambda: vae.model(bad, mask.int()), lambda: complete(vae.model, vae.guide, x, empty),
                 lambda: log_marginal_observed(vae.model, vae.guide, x, empty)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError, match="NaN"):
        fit(vae.model, vae.guide, (bad, torch.ones(4, 6, dtype=torch.bool)), epochs=1,
            progress=False)


def test_nan_in_missing_pixels_never_reaches_the_loss():
    x = binary_data(64, 16)
    mask = mcar(64, 16, 0.5, seed=0)
    with_nan = torch.where(mask, x, float("nan"))
    results = []
    for data in (with_nan, fill_missing(x, mask)):
        torch.manual_seed(0)
        vae = MaskedVAE(16, 2, 8)
        results.append(fit(vae.model, vae.guide, (data, mask), epochs=2, batch_size=16,
                           progress=False).losses)
    assert all(math.isfinite(v) for v in results[0])
    assert results[0] == results[1]
    # gradients too: the backward pass of a masked NaN would be NaN
    vae = MaskedVAE(16, 2, 8)
    loss = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, with_nan, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------
# the masked likelihood


def test_masked_log_likelihood_is_the_observed_subvector_closed_form():
    ppca = make_ppca()
    x = torch.randn(12, 6) * 2
    mask = mcar(12, 6, 0.5, seed=0)
    mask[0] = True  # one complete row: the plain PPCA's log p(x)
    x = torch.where(mask, x, float("nan"))
    with torch.no_grad():
        exact = ppca.log_marginal_observed_exact(x, mask)
        # the exact posterior as proposal: every importance weight is p(x_obs), any K
        estimate = log_marginal_observed(ppca.model, ppca.guide, x, mask, num_samples=3, seed=0)
        plain = ppca.log_marginal_exact(fill_missing(x, mask)[:1])
    assert torch.allclose(estimate, exact, atol=1e-4)
    assert torch.allclose(exact[:1], plain, atol=1e-5)


def test_all_observed_mask_reproduces_the_plain_vae():
    torch.manual_seed(0)
    x = binary_data(8, 16)
    mask = torch.ones_like(x, dtype=torch.bool)
    masked = MaskedVAE(16, 3, 8, encoder_sees_mask=False)
    plain = VAE(16, 3, 8)
    plain.load_state_dict(masked.state_dict())
    z = torch.randn(8, 3)
    pyro.clear_param_store()
    traces = [poutine.trace(poutine.condition(fn, data={"z": z})).get_trace(*args)
              for fn, args in ((masked.model, (x, mask)), (plain.model, (x,)))]
    assert torch.allclose(traces[0].log_prob_sum(), traces[1].log_prob_sum())
    guides = [poutine.trace(poutine.condition(fn, data={"z": z})).get_trace(*args)
              for fn, args in ((masked.guide, (x, mask)), (plain.guide, (x,)))]
    assert torch.allclose(guides[0].log_prob_sum(), guides[1].log_prob_sum())
    # the MIWAE encoder sees [x̃, m]: 2D inputs
    assert MaskedVAE(16, 3, 8).encoder.net[0].in_features == 32


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75])
def test_training_with_missing_pixels(rate):
    x = binary_data(128, 16)
    mask = mcar(128, 16, rate, seed=1)
    x = torch.where(mask, x, float("nan"))
    torch.manual_seed(0)
    vae = MaskedVAE(16, 2, 16)
    result = fit(vae.model, vae.guide, (x, mask), epochs=8, batch_size=32, lr=1e-2, progress=False)
    assert all(math.isfinite(v) for v in result.losses)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    log_px = log_marginal_observed(vae.model, vae.guide, x, mask, num_samples=50, seed=0)
    assert log_px.shape == (128,) and torch.isfinite(log_px).all()
    # fewer observed pixels, fewer nats: log p(x_obs) <= 0 and bounded by -observed·0 pixels
    assert (log_px < 0).all()


def test_per_datapoint_guide_works_unchanged():
    x = binary_data(32, 16)
    mask = mcar(32, 16, 0.5, seed=0)
    vae = MaskedVAE(16, 2, 8)

    def local_guide(x, mask, idx=None, num_data=None):
        num = x.shape[0] if num_data is None else num_data
        loc = pyro.param("loc", torch.zeros(num, 2))
        scale = pyro.param("scale", torch.ones(num, 2), constraint=dist.constraints.positive)
        with data_plate(x, idx, num_data) as rows:
            pyro.sample("z", dist.Normal(loc[rows], scale[rows]).to_event(1))

    result = fit(vae.model, local_guide, (torch.where(mask, x, float("nan")), mask), epochs=3,
                 batch_size=8, progress=False)
    assert all(math.isfinite(v) for v in result.losses)
    assert pyro.param("loc").shape == (32, 2)


# ---------------------------------------------------------------------------------------------
# completion


def test_sir_with_the_exact_posterior_has_uniform_weights():
    ppca = make_ppca()
    x = torch.randn(5, 6)
    mask = mcar(5, 6, 0.5, seed=2)
    completion = complete(ppca.model, ppca.guide, x, mask, num_samples=4, num_particles=64, seed=0)
    exact = ppca.log_marginal_observed_exact(x, mask).detach()
    assert torch.allclose(completion.log_weights, exact.expand(64, 5), atol=1e-4)
    assert torch.allclose(completion.ess, torch.full((5,), 64.0), rtol=1e-4)


def test_completion_means_match_the_gaussian_conditional():
    """PPCA is one Gaussian N(b, WWᵀ + σ²I): SIR, MwG and the exact mixture conditional (C = 1) agree."""
    ppca = make_ppca(seed=1)
    x = torch.randn(4, 6)
    mask = mcar(4, 6, 0.5, seed=5)
    with torch.no_grad():
        cov = ppca.weight @ ppca.weight.T + ppca.noise_scale**2 * torch.eye(6)
        exact = mixture_conditional(torch.ones(1), ppca.bias[None], cov[None], x, mask,
                                    num_samples=2000, generator=torch.Generator().manual_seed(0))
    sir = complete(ppca.model, ppca.guide, x, mask, num_samples=2000, num_particles=2000, seed=0)
    mwg = complete(ppca.model, ppca.guide, x, mask, num_samples=300, method="mwg", num_steps=20,
                   seed=0)
    assert torch.allclose(exact.log_px, ppca.log_marginal_observed_exact(x, mask).detach(), atol=1e-4)
    for estimate in (sir.mean, mwg.mean, exact.samples.mean(0), sir.samples.mean(0)):
        assert torch.allclose(estimate, exact.mean, atol=0.12), (estimate - exact.mean).abs().max()
    # the spread of the completions: the conditional variance
    miss = ~mask[0]
    cov_mm = cov[miss][:, miss] - cov[miss][:, mask[0]] @ torch.linalg.solve(
        cov[mask[0]][:, mask[0]], cov[mask[0]][:, miss])
    assert torch.allclose(sir.samples[:, 0, miss].var(0), cov_mm.diagonal(), rtol=0.15)
    assert torch.allclose(exact.samples[:, 0, miss].var(0), cov_mm.diagonal(), rtol=0.15)
    assert ((mwg.acceptance > 0.1) & (mwg.acceptance <= 1)).all()


def test_complete_keeps_observed_pixels_and_is_seeded():
    torch.manual_seed(0)
    vae = MaskedVAE(16, 2, 8)
    x = binary_data(6, 16)
    mask = top_half(6, 16)
    x_nan = torch.where(mask, x, float("nan"))
    for method in ("sir", "mwg"):
        first = complete(vae.model, vae.guide, x_nan, mask, num_samples=5, method=method,
                         num_particles=50, num_steps=10, seed=1)
        again = complete(vae.model, vae.guide, x_nan, mask, num_samples=5, method=method,
                         num_particles=50, num_steps=10, seed=1)
        assert first.samples.shape == (5, 6, 16) and first.mean.shape == (6, 16)
        assert torch.equal(first.samples, again.samples)
        assert torch.equal(first.samples[:, mask], x[mask].expand(5, -1))
        assert set(first.samples.unique().tolist()) <= {0.0, 1.0}
        assert ((first.mean >= 0) & (first.mean <= 1)).all()
        assert torch.equal(first.most_probable()[mask], x[mask])
        assert first.sample_means.shape == (5, 6, 16)
        assert torch.equal(first.sample_means[:, mask], x[mask].expand(5, -1))
    proposal = complete(vae.model, vae.guide, x, mask, method="mwg", proposal="completed",
                        num_samples=3, num_steps=5)
    assert proposal.acceptance.shape == (6,)
    start = complete(vae.model, vae.guide, x, mask, method="mwg", num_samples=3, num_steps=0)
    assert torch.allclose(start.mean, start.sample_means.mean(0))
    with pytest.raises(ValueError, match="method"):
        complete(vae.model, vae.guide, x, mask, method="gibbs")


# ---------------------------------------------------------------------------------------------
# the exact mixture conditional


def _mixture(num_components=3, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = torch.softmax(torch.randn(num_components, generator=g), 0).double()
    means = (3 * torch.randn(num_components, dim, generator=g)).double()
    factors = torch.randn(num_components, dim, dim, generator=g).double()
    covs = factors @ factors.transpose(1, 2) / dim + 0.3 * torch.eye(dim).double()
    return weights, means, covs


def test_mixture_conditional_matches_the_formula():
    weights, means, covs = _mixture()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 5, generator=g).double() * 3
    mask = mcar(10, 5, 0.4, seed=0)
    mask[:3] = mcar(3, 5, 0.6, seed=1)  # several patterns
    result = mixture_conditional(weights, means, covs, torch.where(mask, x, float("nan")), mask)
    for n in range(10):
        o, m = mask[n].numpy(), ~mask[n].numpy()
        xo = x[n].numpy()[o]
        joint = np.array([weights[c].item() * multivariate_normal(
            means[c].numpy()[o], covs[c].numpy()[np.ix_(o, o)]).pdf(xo) for c in range(3)])
        resp = joint / joint.sum()
        np.testing.assert_allclose(result.responsibilities[n].numpy(), resp, rtol=1e-6)
        np.testing.assert_allclose(result.log_px[n].item(), np.log(joint.sum()), rtol=1e-8)
        expected = np.zeros(5)
        for c in range(3):
            cov = covs[c].numpy()
            cond = means[c].numpy()[m] + cov[np.ix_(m, o)] @ np.linalg.solve(
                cov[np.ix_(o, o)], xo - means[c].numpy()[o])
            np.testing.assert_allclose(result.component_means[n, c].numpy()[m], cond, rtol=1e-6,
                                       atol=1e-9)
            expected[m] += resp[c] * cond
        expected[o] = xo
        np.testing.assert_allclose(result.mean[n].numpy(), expected, rtol=1e-6, atol=1e-9)


def test_mixture_conditional_diagonal_equals_full_and_samples_match():
    weights, means, covs = _mixture(seed=2)
    variances = covs.diagonal(dim1=1, dim2=2)
    x = torch.randn(6, 5).double()
    mask = mcar(6, 5, 0.4, seed=3)
    diagonal = mixture_conditional(weights, means, variances, x, mask, num_samples=20000,
                                   generator=torch.Generator().manual_seed(0))
    full = mixture_conditional(weights, means, torch.diag_embed(variances), x, mask, num_samples=3)
    assert torch.allclose(diagonal.mean, full.mean) and torch.allclose(diagonal.log_px, full.log_px)
    assert torch.allclose(diagonal.samples.mean(0), diagonal.mean, atol=0.1)
    assert torch.equal(full.samples[:, mask], x[mask].expand(3, -1))


def test_masked_mixture_learns_from_missing_pixels_and_matches_the_exact_conditional():
    from pyro.infer import TraceEnum_ELBO

    from ppl_lvm.estimators import log_marginal
    from ppl_lvm.completion import mixture_completion
    from ppl_lvm.models.missing import masked_mixture_model
    from ppl_lvm.models.mog import MixtureOfGaussians

    mixture = MixtureOfGaussians(3, 5)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 5, generator=g) + 4, torch.randn(40, 5, generator=g) - 4])
    mask = mcar(80, 5, 0.4, seed=0)
    x_nan = torch.where(mask, x, float("nan"))
    model = masked_mixture_model(mixture)
    with torch.no_grad():
        enumerated = log_marginal(model, None, fill_missing(x, mask), method="exact", mask=mask)
    assert torch.allclose(enumerated, mixture_completion(mixture, x_nan, mask).log_px, atol=1e-5)
    every = torch.ones_like(mask)
    with torch.no_grad():  # all observed: the plain mixture's log p(x)
        plain = log_marginal(model, None, x, method="exact", mask=every)
        assert torch.allclose(plain, mixture.log_prob(x), atol=1e-5)
    result = fit(model, lambda x, mask, idx=None, num_data=None: None, (x_nan, mask),
                 loss=TraceEnum_ELBO(max_plate_nesting=1), epochs=40, batch_size=40, lr=0.1,
                 progress=False)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    completion = mixture_completion(mixture, x_nan, mask)
    # the two clusters are told apart from the observed pixels: completions on the right side
    assert ((completion.mean[:40][~mask[:40]] > 0).float().mean() > 0.9)
    assert ((completion.mean[40:][~mask[40:]] < 0).float().mean() > 0.9)
    with pytest.raises(ValueError, match="diag"):
        masked_mixture_model(MixtureOfGaussians(2, 5, covariance="full"))


# ---------------------------------------------------------------------------------------------
# imputation scores and baselines


def test_imputation_scores_and_baselines():
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, False, True, False], [True, True, False, False]])
    scores = imputation_scores(x, mask, torch.tensor([[1.0, 0.2, 1.0, 0.4], [0.0, 0.0, 0.9, 0.6]]))
    assert scores["accuracy"] == pytest.approx(0.5)  # 0.2→0 ✓, 0.4→0 ✗, 0.9→1 ✓, 0.6→1 ✗
    expected = -np.mean(np.log([0.8, 0.4, 0.9, 0.4]))
    assert scores["cross_entropy"] == pytest.approx(expected)
    train = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    train_mask = torch.ones_like(train, dtype=torch.bool)
    train_mask[2, 1] = False
    imputed = mean_imputation(train, train_mask, x, mask)
    assert torch.allclose(imputed[0, 1], torch.tensor(0.5)) and imputed[0, 0] == 1.0
    knn = knn_imputation(train, train_mask, x, mask, n_neighbors=1)
    assert knn[0, 1] == 0.0 and knn[0, 3] == 1.0  # nearest on observed pixels: the first row


# ---------------------------------------------------------------------------------------------
# the CLI: `ppl-lvm complete RUN` (lives here to keep tests/test_cli.py free of merge churn)


def test_cli_complete_writes_a_grid(tmp_path, capsys):
    from ppl_lvm.cli import main

    run = tmp_path / "run"
    assert main(["train", "vae", "--out", str(run), "--data", "digits", "--epochs", "1",
                 "--z-dim", "2", "--hidden-dim", "16", "--batch-size", "256", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["complete", str(run), "--mask", "top_half", "--n", "5", "--samples", "3",
                 "--num-particles", "20"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and (run / "completions_top_half.png").is_file()
    out = tmp_path / "mwg.png"
    assert main(["complete", str(run), "--mask", "mcar", "--rate", "0.25", "--method", "mwg",
                 "--num-steps", "3", "--n", "4", "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["complete", str(tmp_path / "nothing")]) == 2
    assert main(["complete", str(run), "--mask", "mcar", "--rate", "1.0"]) == 2
    assert "rate" in capsys.readouterr().err


def test_complete_in_row_chunks(monkeypatch):
    import ppl_lvm.completion as completion

    monkeypatch.setattr(completion, "ROWS_PER_CALL", 40)  # 40 // 10 particles = 4 rows per call
    ppca = make_ppca()
    x = torch.randn(10, 6)
    mask = mcar(10, 6, 0.5, seed=2)
    for method in ("sir", "mwg"):
        result = complete(ppca.model, ppca.guide, x, mask, num_samples=3, method=method,
                          num_particles=10, num_steps=2, seed=0)
        assert result.samples.shape == result.sample_means.shape == (3, 10, 6)
        assert torch.equal(result.samples[:, mask], x[mask].expand(3, -1))
    assert result.acceptance.shape == (10,)
    sir = complete(ppca.model, ppca.guide, x, mask, num_particles=10, seed=0)
    assert sir.log_weights.shape == (10, 10) and sir.ess.shape == (10,)


def test_a_model_without_a_mask_argument_is_completed_with_its_observed_site_masked():
    """A plain VAE (``model(x)``, trained on complete data) completed as written: its observed
    site, whatever its name, gets the mask per pixel. The right answer: the same log weights and
    completions as the MaskedVAE that takes the mask itself, with the same weights."""
    torch.manual_seed(0)
    masked = MaskedVAE(16, z_dim=2, hidden_dim=8, encoder_sees_mask=False)
    decoder, encoder = masked.decoder, masked.encoder

    def model(images):  # its own names: plate "pixels_of_rows", site "image"
        pyro.module("decoder", decoder)
        with pyro.plate("pixels_of_rows", images.shape[0]):
            code = pyro.sample("code", dist.Normal(images.new_zeros(len(images), 2), 1.0).to_event(1))
            pyro.sample("image", decoder(code).to_event(1), obs=images)

    def guide(images):
        pyro.module("encoder", encoder)
        with pyro.plate("pixels_of_rows", images.shape[0]):
            loc, scale = encoder(images)
            pyro.sample("code", dist.Normal(loc, scale).to_event(1))

    def masked_guide(x, mask):  # masked.guide with the site renamed
        pyro.module("encoder", encoder)
        with data_plate(x):
            loc, scale = encoder(masked.encoder_input(x, mask))
            pyro.sample("code", dist.Normal(loc, scale).to_event(1))

    def masked_model(x, mask):
        pyro.module("decoder", decoder)
        with data_plate(x):
            code = pyro.sample("code", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            pyro.sample("x", decoder(code).mask(mask).to_event(1), obs=fill_missing(x, mask))

    x = binary_data(num_rows=6)
    mask = top_half(6, 16, image_shape=(4, 4))
    plain = complete(model, guide, x, mask, num_samples=3, num_particles=32, seed=0)
    reference = complete(masked_model, masked_guide, x, mask, num_samples=3, num_particles=32,
                         seed=0)
    assert torch.allclose(plain.log_weights, reference.log_weights, atol=1e-5)
    assert torch.allclose(plain.mean, reference.mean, atol=1e-6)
    assert torch.equal(plain.samples, reference.samples)
