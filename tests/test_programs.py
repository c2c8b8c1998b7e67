"""Real Pyro programs as their authors wrote them (tests/programs/), through fit, the estimators,
infer_local and complete. Each test states its right answer: a closed form, enumeration or
Pyro's own full-batch loss. The class numbers are issue 11's failure classes."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from torch.distributions import constraints

from ppl_lvm import (AmortizedGuide, LocalGuide, amortization_gaps, estimate_log_marginal, fit,
                     infer_local, load_digits, log_marginal)
from ppl_lvm.estimators import log_weights
from ppl_lvm.completion import complete
from ppl_lvm.models.missing import top_half
from ppl_lvm.objectives import IWAE_ELBO
from ppl_lvm.program import bind, inspect_program
from tests.programs import gmm_tutorial, linear_gaussian, obs_mask, pyro_test_models
from tests.programs.ss_vae_m2 import SSVAE
from tests.programs.vae_example import VAE as ExampleVAE


pytestmark = pytest.mark.usefixtures("fresh_param_store")


# ---------------------------------------------------------------------------------------------
# class 1: global latents outside the data plate (Pyro's GMM tutorial)


def test_gmm_minibatch_losses_estimate_the_full_data_loss():  # class 1
    """At frozen parameters, fit's minibatch losses over one epoch of equal batches average to
    Pyro's own full-data TraceEnum_ELBO loss exactly (AutoDelta + enumeration: no sampling)."""
    data = gmm_tutorial.make_data()
    guide = gmm_tutorial.make_guide(data)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    full = elbo.loss(gmm_tutorial.model, guide, data)
    plate = inspect_program(gmm_tutorial.model, data).plate_name
    batches = torch.randperm(100, generator=torch.Generator().manual_seed(0)).reshape(5, 20)
    losses = [elbo.loss(bind(gmm_tutorial.model, idx, 100, plate), bind(guide, idx, 100, plate),
                        data[idx]) for idx in batches]
    assert sum(losses) / 5 == pytest.approx(full, rel=1e-6)


def test_gmm_trained_on_minibatches_reaches_the_full_batch_answer():  # class 1
    """The small component's weight: full-batch SVI and minibatch fit (cosine-decayed steps) agree;
    scaling the globals' priors by N / B too (the old rule) moved it from 0.098 to 0.060."""
    data = gmm_tutorial.make_data()
    # a start with one loc in each cluster (the tutorial keeps the best of 100 random starts)
    seed = next(s for s in range(100) if abs(float(torch.diff(
        gmm_tutorial.init_loc_fn_for(data, s)({"name": "locs"})))) > 4)

    def train(batch_size, epochs):
        pyro.clear_param_store()
        guide = gmm_tutorial.make_guide(data, seed)
        fit(gmm_tutorial.model, guide, data, epochs=epochs, batch_size=batch_size, lr=0.05,
            loss=TraceEnum_ELBO(max_plate_nesting=1), lr_schedule="cosine", progress=False, seed=0)
        return guide.median()
    full = train(100, 200)
    mini = train(25, 50)  # the same 200 steps
    small = int(full["locs"].argmax())
    assert full["weights"][small].item() == pytest.approx(0.10, abs=0.03)
    assert mini["weights"][small].item() == pytest.approx(full["weights"][small].item(), abs=0.01)
    assert torch.allclose(mini["locs"], full["locs"], atol=0.1)


def test_gmm_log_likelihood_per_datapoint_given_the_globals():  # class 1
    """log_marginal refuses the globals by default, naming them; with globals="median" it is
    log p(x_n | weights, locs, scale) at AutoDelta's values: the closed-form mixture density."""
    data = gmm_tutorial.make_data()
    guide = gmm_tutorial.make_guide(data)
    guide(data)
    with pytest.raises(ValueError, match=r"\['locs', 'scale', 'weights'\] are outside the data"):
        log_marginal(gmm_tutorial.model, guide, data, method="exact")
    estimate = estimate_log_marginal(gmm_tutorial.model, guide, data, method="exact",
                                     globals="median")
    g = guide.median()
    truth = torch.logsumexp(g["weights"].log() + dist.Normal(g["locs"], g["scale"]).log_prob(
        data[:, None]), -1).detach()
    assert estimate.globals == "median"
    assert torch.allclose(estimate.log_px, truth, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# class 2: autoguides and **kwargs as written


def conjugate_model(x):
    """μ ~ N(0, 1), x_n ~ N(μ, 1): posterior N(Σx / (N + 1), 1 / (N + 1))."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def test_an_autoguide_list_trains_on_minibatches_to_the_conjugate_posterior():  # class 2
    from pyro.infer.autoguide import AutoGuideList

    x = torch.randn(64, generator=torch.Generator().manual_seed(3)) + 1.0
    guide = AutoGuideList(conjugate_model)
    guide.append(AutoNormal(pyro.poutine.block(conjugate_model, expose=["mu"])))
    fit(conjugate_model, guide, x, epochs=200, batch_size=16, lr=0.05, lr_schedule="cosine",
        loss=Trace_ELBO(num_particles=8, vectorize_particles=True), progress=False)
    assert guide.median()["mu"].item() == pytest.approx(x.sum().item() / 65, abs=0.02)


def test_a_model_taking_kwargs_it_ignores_is_still_scaled():  # class 2
    """model(x, **kwargs) gets no idx/num_data (it would ignore them) but its data-plate sites
    are scaled by N / B: the minibatch losses average to the full-data loss."""
    def model(x, **kwargs):
        conjugate_model(x)

    def guide(x, **kwargs):
        pyro.sample("mu", dist.Delta(torch.tensor(0.5)))
    x = torch.randn(40, generator=torch.Generator().manual_seed(0))
    full = Trace_ELBO().loss(model, guide, x)
    plate = inspect_program(model, x).plate_name
    batches = torch.arange(40).reshape(4, 10)
    losses = [Trace_ELBO().loss(bind(model, i, 40, plate), bind(guide, i, 40, plate), x[i])
              for i in batches]
    assert sum(losses) / 4 == pytest.approx(full, rel=1e-6)


def test_an_autoguide_over_local_sites_is_refused_on_minibatches_and_scored_on_its_rows():  # class 2
    """AutoNormal on Pyro's example VAE holds one (loc, scale) per row of the data: fit refuses
    minibatches (it cannot follow their rows); trained full batch, log_marginal scores its rows
    and their IWAE bound is above the ELBO."""
    x = (load_digits()[0][:24].repeat(1, 13)[:, :784] > 0.5).float()
    vae = ExampleVAE(z_dim=2, hidden_dim=8)
    guide = AutoNormal(vae.model)
    with pytest.raises(ValueError, match=r"per-row parameters.*\['latent'\].*batch_size=24"):
        fit(vae.model, guide, x, epochs=1, batch_size=8, progress=False)
    fit(vae.model, guide, x, epochs=20, batch_size=24, lr=0.05, progress=False)
    elbo = log_marginal(vae.model, guide, x, method="elbo", num_samples=200, seed=0)
    iwae = log_marginal(vae.model, guide, x, num_samples=200, seed=0)
    assert elbo.shape == (24,) and (iwae.mean() > elbo.mean())


# ---------------------------------------------------------------------------------------------
# class 3: per-row data beyond x


def test_ss_vae_labels_ride_along_with_their_rows_in_fit():  # class 3
    """Pyro's SS-VAE (M2) trained on (x, y) with its own guide; and the package's guides called
    on (x, y) batches (they used to crash with 'multiple values for argument idx'). Right answer:
    the minibatch losses of fit's binding average to Pyro's full-data loss at frozen params."""
    torch.manual_seed(0)
    ss = SSVAE(output_size=10, input_size=64, z_dim=3, hidden_layers=[16])
    x = (load_digits()[0][:40] > 0.5).float()
    y = torch.nn.functional.one_hot(load_digits()[1][:40], 10).float()
    result = fit(ss.model, ss.guide, (x, y), epochs=2, batch_size=10, progress=False)
    assert len(result.losses) == 8 and all(math.isfinite(v) for v in result.losses)
    # the same model with the package's per-datapoint and amortized guides on (x, y)
    local = LocalGuide(40, {"z": 3})
    fit(ss.model, local, (x, y), epochs=2, batch_size=10, progress=False)
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(64, 6)

        def forward(self, v):
            loc, log_scale = self.net(v).chunk(2, -1)
            return loc, log_scale.exp()
    amortized = AmortizedGuide(Encoder())
    fit(ss.model, amortized, (x, y), epochs=1, batch_size=10, progress=False)
    # frozen params, a Delta guide: Σ_b minibatch loss / M = full loss
    loc = local.loc()

    def delta_guide(xs, ys=None, idx=None, num_data=None):
        rows = torch.arange(len(xs)) if idx is None else idx
        with pyro.plate("data", len(xs) if num_data is None else num_data, subsample=rows):
            pyro.sample("z", dist.Delta(loc[rows]).to_event(1))
    full = Trace_ELBO().loss(ss.model, delta_guide, x, y)
    batches = torch.arange(40).reshape(4, 10)
    losses = [Trace_ELBO().loss(bind(ss.model, i, 40, "data"), bind(delta_guide, i, 40, "data"),
                                x[i], y[i]) for i in batches]
    assert sum(losses) / 4 == pytest.approx(full, rel=1e-5)


def covariate_model(x, shift):
    """z ~ N(0, I_2), x | z ~ N(W z + shift_n, 0.5² I_3): a per-row covariate moves the posterior."""
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    with pyro.plate("rows", len(x)):
        z = pyro.sample("h", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))
        pyro.sample("obs", dist.Normal(z @ weight.T + shift, 0.5).to_event(1), obs=x)


def covariate_posterior_mean(x, shift):
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    precision = torch.eye(2) + weight.T @ weight / 0.25
    return torch.linalg.solve(precision, weight.T @ (x - shift).T / 0.25).T


def test_infer_local_keeps_per_row_keywords_with_their_rows():  # class 3, class 4
    """q* means of a linear-Gaussian model with a per-row covariate (and its own site and plate
    names) against the closed-form posterior means, row by row, with shuffled minibatches."""
    gen = torch.Generator().manual_seed(0)
    shift = 3.0 * torch.randn(12, 3, generator=gen)
    x = torch.randn(12, 3, generator=gen) + shift
    guide = infer_local(covariate_model, x, shift=shift, num_steps=150, lr=0.1, batch_size=6,
                        loss=Trace_ELBO(num_particles=16, vectorize_particles=True))
    assert guide.site_shapes == {"h": torch.Size([2])}
    assert torch.allclose(guide.loc(), covariate_posterior_mean(x, shift), atol=0.05)


def test_amortization_gaps_take_model_arguments():  # class 3
    gen = torch.Generator().manual_seed(1)
    shift = torch.randn(10, 3, generator=gen)
    x = torch.randn(10, 3, generator=gen) + shift

    def guide(x, shift):
        with pyro.plate("rows", len(x)):
            pyro.sample("h", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))
    gaps = amortization_gaps(covariate_model, guide, x, shift=shift, num_samples=500,
                             elbo_samples=200, local_steps=200, local_lr=0.05,
                             encoder=lambda v: (torch.zeros(len(v), 2), torch.ones(len(v), 2)))
    # a linear-Gaussian posterior is in the mean-field family up to correlation: small approx gap
    assert gaps.amortization_gap > 0.5 and -0.1 < gaps.approximation_gap < 0.5


# ---------------------------------------------------------------------------------------------
# class 4: site names and plate placement


def test_pyro_example_vae_is_completed_and_localised_under_its_own_site_names():  # class 4
    x = (load_digits()[0][:16].repeat(1, 13)[:, :784] > 0.5).float()
    vae = ExampleVAE(z_dim=2, hidden_dim=8)
    fit(vae.model, vae.guide, x, epochs=2, batch_size=8, progress=False)
    local = infer_local(vae.model, x[:4], encoder=vae.encoder, num_steps=20)
    assert local.site_shapes == {"latent": torch.Size([2])}
    mask = top_half(4, 784)
    completion = complete(vae.model, vae.guide, x[:4], mask, num_samples=3, num_particles=20,
                          seed=0)
    assert completion.samples.shape == (3, 4, 784)
    assert torch.equal(completion.samples[:, mask], x[:4][mask].expand(3, -1))


def test_a_data_plate_at_dim_minus_2_is_scored_exactly():  # class 4
    """Pyro's hand-written mixture (data plate at dim -2, components at -1, the component in a
    site named "mask"): log_marginal by enumeration equals MixtureOfDiagNormals' log_prob."""
    pyro.param("locs", torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 10.0]]))
    pyro.param("coord_scale", torch.tensor([[2.0, 1.0], [1.0, 2], [4.0, 4.0]]),
               constraint=constraints.positive)
    pyro.param("component_logits", torch.tensor([0.0, -1.0, 2.0]))
    data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 3.0], [1.0, 11.0]])
    truth = dist.MixtureOfDiagNormals(pyro.param("locs"), pyro.param("coord_scale"),
                                      pyro.param("component_logits")).log_prob(data).detach()
    exact = log_marginal(pyro_test_models.hand_model, None, data, method="exact")
    assert torch.allclose(exact, truth, atol=1e-5)
    prior = log_marginal(pyro_test_models.hand_model, None, data, method="prior",
                         num_samples=4000, seed=0)
    assert torch.allclose(prior, truth, atol=0.1)


def test_model_and_guide_plates_at_different_dims_are_refused_naming_both():  # class 4
    """The old behaviour: -4500 vs -560 nats, silently. Now: a ValueError naming both dims."""
    def model(x):
        with pyro.plate("data", len(x), dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 1, 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x.unsqueeze(-2))

    def guide(x):
        with pyro.plate("data", len(x), dim=-1):
            pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))
    x = torch.randn(6, 2)
    with pytest.raises(ValueError, match="at dim -2 in the model but at dim -1 in the guide"):
        log_marginal(model, guide, x, num_samples=4)


# ---------------------------------------------------------------------------------------------
# class 5: validation


def test_pyro_example_vae_on_grey_levels_is_scored_as_its_author_wrote_it():  # class 5
    """validate_args=False on a relaxed Bernoulli: log_marginal respects it. A Delta guide is no
    proposal (refused by name); a Normal guide of scale σ at the encoder's mean gives, per row,
    log w = log p(x, μ) + O(σ) - log q(z) with -log q(z) = 2 log σ + log 2π + |ε|²/2 (z in 2-d):
    the estimate lies in [truth + 2 log σ + log 2π, that + 8]."""
    x = load_digits()[0][:8].repeat(1, 13)[:, :784]  # grey levels in [0, 1]
    vae = ExampleVAE(z_dim=2, hidden_dim=8)
    sigma = 1e-3

    def delta_guide(x):
        with pyro.plate("data", x.shape[0]):
            loc, _ = vae.encoder(x)
            pyro.sample("latent", dist.Delta(loc).to_event(1))

    def narrow_guide(x):
        with pyro.plate("data", x.shape[0]):
            loc, _ = vae.encoder(x)
            pyro.sample("latent", dist.Normal(loc, sigma).to_event(1))
    with torch.no_grad():
        loc, _ = vae.encoder(x)
        p = vae.decoder(loc)
        truth = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1) + dist.Normal(0.0, 1.0).log_prob(
            loc).sum(-1)
    with pytest.raises(ValueError, match="'latent' is a Delta"):
        log_marginal(vae.model, delta_guide, x, num_samples=3)
    estimate = log_marginal(vae.model, narrow_guide, x, num_samples=1, seed=0)
    low = truth - 2 * math.log(1 / sigma) + math.log(2 * math.pi)
    assert ((estimate - low) > -0.1).all() and ((estimate - low) < 8).all(), estimate - low


# ---------------------------------------------------------------------------------------------
# class 6: estimator corners


def test_masked_mixture_by_prior_and_uniform_sampling_matches_the_closed_form():  # class 6
    """Pyro's zero-inflated Poisson as a MaskedMixture: "prior" and "uniform" (which crashed in
    the support check) converge to the closed-form ZIP density, as "exact" gives it."""
    pyro.param("gate", torch.tensor(0.25), constraint=constraints.unit_interval)
    pyro.param("rate", torch.tensor(3.0), constraint=constraints.positive)
    data = torch.tensor([0.0, 1.0, 2.0, 5.0])
    truth = dist.ZeroInflatedPoisson(torch.tensor(3.0), gate=torch.tensor(0.25)).log_prob(data)
    model = pyro_test_models.composite_model
    assert torch.allclose(log_marginal(model, None, data, method="exact"), truth, atol=1e-5)
    for method in ("prior", "uniform"):
        estimate = log_marginal(model, None, data, method=method, num_samples=20000, seed=0)
        assert torch.allclose(estimate, truth, atol=0.05), method


# =============================================================================================
# More programs per class (tests/programs/obs_mask.py, linear_gaussian.py; Pyro's GMM tutorial)
def test_gmm_structure_is_read_from_its_traces():  # class 1
    """The tutorial's globals (weights, scale, locs in their own plate) are outside the data plate;
    the enumerated assignment and the observation are inside it; no idx/num_data keywords."""
    data = gmm_tutorial.make_data()
    structure = inspect_program(gmm_tutorial.model, data)
    assert (structure.plate_name, structure.plate_dim) == ("data", -1)
    assert set(structure.global_sites) == {"weights", "scale", "locs"}
    assert set(structure.local_sites) == {"assignment", "obs"}
    assert set(structure.observed_sites) == {"obs"}
    assert set(structure.latent_sites) == {"weights", "scale", "locs", "assignment"}
    assert structure.takes_rows is False


def test_gmm_globals_sampled_from_autodelta_are_its_median():  # class 1
    """AutoDelta's draws are its point: globals="sample" (any S) gives the same closed-form
    mixture density log Σ_k w_k N(x_n; loc_k, scale) as globals="median"."""
    data = gmm_tutorial.make_data()
    guide = gmm_tutorial.make_guide(data)
    guide(data)
    g = guide.median()
    truth = torch.logsumexp(g["weights"].log() + dist.Normal(g["locs"], g["scale"]).log_prob(
        data[:, None]), -1).detach()
    sampled = log_marginal(gmm_tutorial.model, guide, data, method="exact", globals="sample",
                           num_global_samples=3, seed=0)
    assert torch.allclose(sampled, truth, atol=1e-5)


def conjugate_autonormal(x, loc, scale):
    """An AutoNormal over conjugate_model's μ starting (and left) at N(loc, scale²)."""
    guide = AutoNormal(conjugate_model, init_loc_fn=lambda site: torch.tensor(loc),
                       init_scale=scale)
    guide(x)
    return guide


def test_conjugate_globals_sampled_from_autonormal_give_the_predictive_density():  # class 1
    """μ ~ q = N(m, s²) and x_n | μ ~ N(μ, 1): (1/S) Σ_s p(x_n | μ_s) → N(x_n; m, 1 + s²);
    globals="median" gives N(x_n; m, 1) exactly."""
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    guide = conjugate_autonormal(x, 0.3, 0.5)
    median = log_marginal(conjugate_model, guide, x, method="exact", globals="median")
    assert torch.allclose(median, dist.Normal(0.3, 1.0).log_prob(x), atol=1e-5)
    sampled = log_marginal(conjugate_model, guide, x, method="exact", globals="sample",
                           num_global_samples=1000, seed=0)
    predictive = dist.Normal(0.3, math.sqrt(1 + 0.5 ** 2)).log_prob(x)
    assert torch.allclose(sampled, predictive, atol=0.04)  # N(x_n; m, 1) is up to 0.18 away


def test_conjugate_autonormal_fit_on_minibatches_reaches_the_exact_posterior():  # class 2
    """AutoNormal as written, fit with batch_size < N: μ | x = N(Σx / (N + 1), 1 / (N + 1)), in
    AutoNormal's family, so both its loc and its scale reach the closed form."""
    x = torch.randn(48, generator=torch.Generator().manual_seed(5)) + 1.0
    guide = AutoNormal(conjugate_model)
    fit(conjugate_model, guide, x, epochs=150, batch_size=12, lr=0.05, lr_schedule="cosine",
        loss=Trace_ELBO(num_particles=16, vectorize_particles=True), progress=False)
    loc = pyro.param("AutoNormal.locs.mu").item()
    scale = pyro.param("AutoNormal.scales.mu").item()
    assert loc == pytest.approx(x.sum().item() / 49, abs=0.02)
    assert scale == pytest.approx(1 / math.sqrt(49), abs=0.02)


def hierarchical_model(x):
    """μ ~ N(0, 1) global; z_n ~ N(μ, 1), x_n ~ N(z_n, 0.5²): z_n | x_n, μ is
    N((μ + 4 x_n) / 5, 1 / 5)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def test_infer_local_with_an_autodelta_over_the_globals():  # class 2
    """infer_local fixes the global μ at AutoDelta's value (poutine.block(expose=["mu"]), as the
    GMM tutorial writes it) and fits q*(z_n): its means are (μ + 4 x_n) / 5, row by row."""
    x = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0, 4.0])
    globals_guide = AutoDelta(pyro.poutine.block(hierarchical_model, expose=["mu"]),
                              init_loc_fn=lambda site: torch.tensor(0.7))
    globals_guide(x)
    local = infer_local(hierarchical_model, x, globals_guide=globals_guide, num_steps=300,
                        lr=0.1, loss=Trace_ELBO(num_particles=16, vectorize_particles=True))
    assert torch.allclose(local.loc().reshape(-1), (0.7 + 4 * x) / 5, atol=0.03)


def test_obs_mask_program_fit_on_minibatches_reaches_the_closed_form_posterior():  # class 1, 3
    """Pyro's test_obs_mask_ok program: a global x and a per-row mask of which y are observed,
    passed as data (y, mask) to fit with batch_size < N. The mask must follow its rows and x's
    prior must count once: loc, scale → Σ_obs y / (n_obs + 1), 1 / √(n_obs + 1)."""
    data, mask = obs_mask.make_data()
    fit(obs_mask.model, obs_mask.guide, (data, mask), epochs=100, batch_size=8, lr=0.05,
        lr_schedule="cosine", loss=Trace_ELBO(num_particles=16, vectorize_particles=True),
        progress=False)
    loc, scale = obs_mask.posterior_of_x(data, mask)
    assert pyro.param("loc").item() == pytest.approx(loc, abs=0.03)
    assert pyro.param("scale").item() == pytest.approx(scale, abs=0.03)


def test_semi_supervised_labels_are_scored_exactly():  # class 3, class 6
    """A label observed on some rows (obs_mask) and enumerated on the others: "exact" is the
    closed form log π_y + log N(x; loc_y, 1) on labelled rows and log Σ_y on unlabelled ones (and
    its sum is Pyro's own TraceEnum_ELBO loss, which is exact here)."""
    x, y, observed = obs_mask.make_label_data()
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    full = elbo.loss(obs_mask.label_model, obs_mask.label_guide, x, y, observed)
    truth = obs_mask.label_log_px(x, y, observed)
    assert -truth.sum().item() == pytest.approx(full, rel=1e-5)
    exact = log_marginal(obs_mask.label_model, None, x, method="exact", y=y, observed=observed)
    assert torch.allclose(exact, truth, atol=1e-5)


def test_semi_supervised_labels_trained_by_fit_with_enumeration():  # class 3
    """fit on (x, y, observed) minibatches with TraceEnum_ELBO: at frozen parameters the
    minibatch losses of fit's binding average to Pyro's full-data loss; after a few steps the
    trained model's "prior" estimate (no latent but the label) matches the closed form."""
    x, y, observed = obs_mask.make_label_data()
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    result = fit(obs_mask.label_model, obs_mask.label_guide, (x, y, observed), epochs=3,
                 batch_size=4, lr=0.1, loss=elbo, progress=False)
    assert len(result.losses) == 12 and pyro.param("locs").detach().diff().item() != 4.0
    model, guide = obs_mask.label_model, obs_mask.label_guide
    plate = inspect_program(model, x, y, observed).plate_name
    full = elbo.loss(model, guide, x, y, observed)
    batches = torch.randperm(16, generator=torch.Generator().manual_seed(1)).reshape(4, 4)
    losses = [elbo.loss(bind(model, i, 16, plate), bind(guide, i, 16, plate), x[i], y[i],
                        observed[i]) for i in batches]
    assert sum(losses) / 4 == pytest.approx(full, rel=1e-5)
    truth = obs_mask.label_log_px(x, y, observed)
    prior = log_marginal(model, None, x, method="prior", num_samples=4000, seed=0, y=y,
                         observed=observed)
    assert torch.allclose(prior, truth, atol=0.05)


def test_log_marginal_takes_the_model_arguments_after_x_as_the_other_tools_do():  # class 3
    """fit(data=(x, y, observed)), log_weights(model, guide, x, y, observed), infer_local and
    amortization_gaps all take the model's further positional arguments; log_marginal must too,
    with the same answer as passing them by keyword."""
    x, y, observed = obs_mask.make_label_data()
    truth = obs_mask.label_log_px(x, y, observed)
    weights = log_weights(obs_mask.label_model, None, x, y, observed, num_samples=5, seed=0)
    assert weights.shape == (5, 16)
    by_position = log_marginal(obs_mask.label_model, None, x, y, observed, method="exact")
    assert torch.allclose(by_position, truth, atol=1e-5)


def test_ss_vae_unlabelled_rows_score_as_the_sum_over_labels():  # class 3
    """Pyro's SS-VAE trained by fit as its example trains it (TraceEnum_ELBO, the guide's y
    enumerated; labelled and unlabelled data), then scored on unlabelled rows: log p(x) from
    IWAE over (y, z) ~ q must equal log Σ_y p(x, y), each p(x, y) an IWAE estimate with y given."""
    from pyro.infer import config_enumerate

    torch.manual_seed(0)
    ss = SSVAE(output_size=10, input_size=64, z_dim=2, hidden_layers=[16], config_enum="parallel")
    images, labels = load_digits()
    x = (images[:48] > 0.5).float()
    y = torch.nn.functional.one_hot(labels[:48], 10).float()
    guide = config_enumerate(ss.guide, "parallel", expand=True)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    fit(ss.model, guide, (x[:16], y[:16]), epochs=2, batch_size=8, loss=elbo, progress=False)
    result = fit(ss.model, guide, x[16:], epochs=2, batch_size=8, loss=elbo, progress=False,
                 clear_params=False)
    assert all(math.isfinite(v) for v in result.losses)
    rows = x[40:46]
    unlabelled = log_marginal(ss.model, ss.guide, rows, num_samples=40000, seed=0)
    per_label = torch.stack([
        log_marginal(ss.model, ss.guide, rows, num_samples=4000, seed=0,
                     ys=torch.nn.functional.one_hot(torch.full((6,), k), 10).float())
        for k in range(10)])
    # both are IWAE estimates still converging at these K (within ±0.15 here); a lost log p(y)
    # or q(y | x) term would be off by about log 10
    assert torch.allclose(unlabelled, per_label.logsumexp(0), atol=0.25)


def test_factor_analysis_at_dim_minus_2_is_scored_in_closed_form():  # class 4
    """Sites "latent"/"obs", data plate at dim -2, features at -1. With q = the exact posterior
    every log weight is log p(x_n), so log_weights [K, N] and IWAE are the closed form to
    rounding. (infer_local's q* means: the closed-form posterior means, next test.)"""
    x = linear_gaussian.make_data()
    truth = linear_gaussian.log_px(x)
    structure = inspect_program(linear_gaussian.model, x)
    assert (structure.plate_name, structure.plate_dim) == ("data", -2)
    assert structure.latent_sites == ("latent",) and structure.observed_sites == ("obs",)
    weights = log_weights(linear_gaussian.model, linear_gaussian.exact_guide, x, num_samples=7,
                          seed=0)
    assert weights.shape == (7, 6)
    assert torch.allclose(weights, truth.expand(7, -1), atol=1e-4)
    iwae = log_marginal(linear_gaussian.model, linear_gaussian.exact_guide, x, num_samples=3)
    assert torch.allclose(iwae, truth, atol=1e-4)


def test_infer_local_at_plate_dim_minus_2_reaches_the_closed_form_posterior_means():  # class 4
    x = linear_gaussian.make_data()
    local = infer_local(linear_gaussian.model, x, num_steps=300, lr=0.1,
                        loss=Trace_ELBO(num_particles=16, vectorize_particles=True))
    means, _ = linear_gaussian.posterior(x)
    assert torch.allclose(local.loc().reshape(6, 2), means, atol=0.05)


def test_factor_analysis_gaps_with_an_encoder_sum_to_zero_for_the_exact_guide():  # class 4
    """amortization_gaps on a model whose latent is "latent" (not "z") at plate dim -2, q* started
    from an encoder: with the exact posterior as the amortized guide, log p(x) - ELBO(q_amortized)
    = approximation gap + amortization gap = 0 (every log weight is log p(x_n))."""
    x = linear_gaussian.make_data()
    means, covariance = linear_gaussian.posterior(x)

    def encoder(rows):
        loc, _ = linear_gaussian.posterior(rows)
        return loc.unsqueeze(-2), covariance.diagonal().sqrt().expand(len(rows), 1, 2)
    gaps = amortization_gaps(linear_gaussian.model, linear_gaussian.exact_guide, x,
                             encoder=encoder, num_samples=50, elbo_samples=20, local_steps=20,
                             proposal="amortized")  # "best" may take a lucky q* IWAE above log p
    assert torch.allclose(gaps.log_px, linear_gaussian.log_px(x), atol=1e-4)
    assert gaps.inference_gap == pytest.approx(0.0, abs=1e-4)
    assert gaps.amortization_gap < 0  # mean-field q* cannot reach the correlated posterior


def test_factor_analysis_completion_is_the_conditional_gaussian_mean():  # class 4
    """complete() on model(x) (no mask argument) whose observed site is "obs" at plate dim -2,
    with a guide q(latent | x_obs) = p(latent | x_obs): its mean of the missing features is
    E[x_miss | x_obs] of N(μ, W Wᵀ + σ² I)."""
    x = linear_gaussian.make_data(num_data=3, seed=2)
    mask = torch.tensor([True, True, False, False]).expand(3, 4)
    weight, mean, noise = linear_gaussian.WEIGHT, linear_gaussian.MEAN, linear_gaussian.NOISE
    obs_weight = weight[:2]

    def observed_guide(x, mask=None):
        precision = torch.eye(2) + obs_weight.T @ obs_weight / noise ** 2
        covariance = torch.linalg.inv(precision)
        loc = (x[:, :2] - mean[:2]) @ obs_weight @ covariance / noise ** 2
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("latent", dist.MultivariateNormal(loc.unsqueeze(-2), covariance))
    cov = weight @ weight.T + noise ** 2 * torch.eye(4)
    conditional = mean[2:] + (x[:, :2] - mean[:2]) @ torch.linalg.solve(cov[:2, :2], cov[:2, 2:])
    completion = complete(linear_gaussian.model, observed_guide, x, mask, num_samples=2,
                          num_particles=20000, seed=0)
    assert torch.equal(completion.mean[:, :2], x[:, :2])
    assert torch.allclose(completion.mean[:, 2:], conditional, atol=0.05)


def linear_probability_model(x, covariate):
    """P(x_n = 1) = a + b c_n, a probability built in the model (not a sigmoid): nothing keeps it
    in [0, 1] as a and b train; torch clamps it inside Bernoulli, so the loss stays finite."""
    a = pyro.param("a", torch.tensor(0.8))
    b = pyro.param("b", torch.tensor(0.1))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Bernoulli(probs=a + b * covariate), obs=x)


def test_a_probability_leaving_the_unit_interval_after_epoch_1_stops_fit():  # class 5
    """Every row is 1, so a and b climb by about lr a step: in epoch 1 (validated) the
    probabilities stay in [0, 1], after it they leave. Right answer: an error naming the site
    and the epoch, not a run that goes on with a finite loss."""
    x = torch.ones(16)
    covariate = torch.linspace(0.0, 1.0, 16)
    with pytest.raises(ValueError, match=r"(?s)epoch 1.*'x'.*probs"):
        fit(linear_probability_model, lambda x, covariate: None, (x, covariate), epochs=4,
            batch_size=8, lr=0.03, progress=False)


def test_a_guide_with_a_per_row_param_is_scored_without_side_effects():  # class 6
    """A guide creating pyro.param("posterior_loc") with one row per datapoint (sized by the call's
    x), set to the exact posterior means: log_marginal is Pyro's own value (the closed form: the
    exact posterior makes every weight p(x_n)) and the param store is as it was."""
    x = linear_gaussian.make_data()
    _, covariance = linear_gaussian.posterior(x)

    def per_row_guide(x):
        loc = pyro.param("posterior_loc", lambda: linear_gaussian.posterior(x)[0])
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("latent", dist.MultivariateNormal(loc.unsqueeze(-2), covariance))
    per_row_guide(x)  # as after training: the store holds the [N, k] table
    before = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    scores = log_marginal(linear_gaussian.model, per_row_guide, x, num_samples=5)
    assert torch.allclose(scores, linear_gaussian.log_px(x), atol=1e-4)
    after = dict(pyro.get_param_store().items())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name].detach(), value) for name, value in before.items())


def test_iwae_elbo_loops_over_particles_for_a_model_that_cannot_vectorise():  # class 6
    """A model reshaping its latent to [N, k] breaks under a particle dim; IWAE_ELBO must fall back
    to a loop. With the exact posterior as guide, the IWAE loss is -Σ_n log p(x_n) exactly."""
    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            h = pyro.sample("latent", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            h = h.reshape(x.shape[0], 2)  # fine for one particle, wrong for [K, N, 1, 2]
            with pyro.plate("features", x.shape[1], dim=-1):
                pyro.sample("obs", dist.Normal(h @ linear_gaussian.WEIGHT.T
                                               + linear_gaussian.MEAN, linear_gaussian.NOISE),
                            obs=x)
    x = linear_gaussian.make_data()
    loss = IWAE_ELBO(num_particles=4)
    value = loss.loss(model, linear_gaussian.exact_guide, x)
    assert loss.vectorized is False
    assert value == pytest.approx(-linear_gaussian.log_px(x).sum().item(), rel=1e-5)
