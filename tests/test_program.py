"""ppl_lvm.program: a program's structure read from its traces, and minibatch scaling of its sites."""
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal

from ppl_lvm.program import ScaleDataPlate, bind, inspect_program, names_keywords, takes_rows


pytestmark = pytest.mark.usefixtures("fresh_param_store")


def hierarchical(x, y):
    """A global scale, per-row latents 'h' in plate 'rows' at dim -2 with an inner plate at -1."""
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("rows", x.shape[0], dim=-2), pyro.plate("features", x.shape[1], dim=-1):
        h = pyro.sample("h", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(h, sigma), obs=x)
    with pyro.plate("rows_y", y.shape[0], dim=-1):
        pyro.sample("label", dist.Bernoulli(0.5), obs=y)


def test_structure_is_read_whatever_the_names_and_dims():
    x, y = torch.randn(7, 3), torch.ones(7)
    structure = inspect_program(hierarchical, x, y, plate_name="rows")
    assert structure.plate_name == "rows" and structure.plate_dim == -2
    assert structure.local_sites == ("h", "obs") and structure.global_sites == ("sigma", "label")
    assert structure.latent_sites == ("sigma", "h") and structure.local_latents == ("h",)
    assert structure.event_shapes == {"h": (3,)} and structure.nesting == 2
    assert not structure.takes_rows
    # two plates follow the rows: the one that every observed site sits in cannot be told, so ask
    with pytest.raises(ValueError, match="several plates.*'rows' \\(dim -2"):
        inspect_program(hierarchical, x, y)


def test_probing_leaves_no_param_and_no_rng_behind():
    def model(x):
        loc = pyro.param("loc", torch.zeros(x.shape[0]))  # a per-row param: 2 or 3 rows in a probe
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    assert inspect_program(model, torch.randn(10)).plate_name == "data"
    assert list(pyro.get_param_store().keys()) == []
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), expected)


def test_keywords_count_only_when_named():
    def named(x, idx=None, num_data=None):
        pass

    def forwards(x, **kwargs):
        pass
    assert takes_rows(named) and not takes_rows(forwards)
    guide = AutoNormal(lambda x: None)
    assert not names_keywords(guide, "idx")  # an autoguide forwards **kwargs to its model


def gmm(data):
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=data)


def test_minibatch_losses_average_to_the_full_data_loss_with_global_latents():
    """Only data-plate sites are scaled by N / B: with equal batches, the mean of the minibatch
    losses is the full-data loss exactly (globals counted once, not N / B times)."""
    data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0, 1.5, -0.5, 9.5])
    guide = AutoDelta(pyro.poutine.block(gmm, expose=["weights", "locs"]))
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    model = pyro.infer.config_enumerate(gmm)
    full = elbo.loss(model, guide, data)
    plate = inspect_program(model, data).plate_name
    batches = torch.randperm(8, generator=torch.Generator().manual_seed(0)).reshape(4, 2)
    minibatch = [elbo.loss(bind(model, i, 8, plate), bind(guide, i, 8, plate), data[i])
                 for i in batches]
    assert sum(minibatch) / 4 == pytest.approx(full, rel=1e-6)
    # the old rule (every site scaled by N / B) counts the priors of the globals 4 times
    scaled = [elbo.loss(pyro.poutine.scale(model, 4.0), pyro.poutine.scale(guide, 4.0), data[i])
              for i in batches]
    assert abs(sum(scaled) / 4 - full) > 1.0


def test_scale_data_plate_leaves_global_sites_alone():
    def model(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(shift, 1.0), obs=x)
    trace = pyro.poutine.trace(ScaleDataPlate(5.0, "data")(model)).get_trace(torch.zeros(3))
    assert trace.nodes["shift"]["scale"] == 1.0 and trace.nodes["x"]["scale"] == 5.0


def test_fit_trains_an_autoguide_on_a_conjugate_model_to_the_closed_form():
    """μ ~ N(0, 1), x_i ~ N(μ, 1): the posterior is N(Σx / (N + 1), 1 / (N + 1)). AutoNormal passed
    to fit as written (it takes **kwargs) on minibatches reaches it."""
    from ppl_lvm import fit

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)
    x = torch.randn(64, generator=torch.Generator().manual_seed(1)) + 2.0
    guide = AutoNormal(model)
    fit(model, guide, x, epochs=300, batch_size=16, lr=0.02, progress=False,
        loss=Trace_ELBO(num_particles=4, vectorize_particles=True))
    loc, scale = guide.median()["mu"], pyro.param("AutoNormal.scales.mu")
    assert loc.item() == pytest.approx(x.sum().item() / 65, abs=0.03)
    assert scale.item() == pytest.approx(65 ** -0.5, rel=0.15)
