"""Partially observed data from Pyro's test suite (tests/infer/test_valid_models.py,
``test_obs_mask_ok``, pyro-ppl/pyro commit ff6ae1c95): a global latent ``x`` outside the plate and a
per-row ``obs_mask`` saying which y are observed; the guide samples ``y_unobserved`` under
``poutine.mask(mask=~mask)``. The model and guide are unchanged but for taking ``data`` and ``mask``
as arguments (the test closes over them) and the plate being as long as the data.

``label_model`` is written for this suite in the same style: a semi-supervised two-component
mixture whose discrete label y is observed on some rows (``obs_mask``) and enumerated on the others.
"""
import torch

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import config_enumerate
from torch.distributions import constraints


def model(data, mask):
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    with pyro.plate("plate", len(data)):
        y = pyro.sample("y", dist.Normal(x, 1.0), obs=data, obs_mask=mask)
        assert ((y == data) == mask).all()


def guide(data, mask):
    loc = pyro.param("loc", torch.zeros(()))
    scale = pyro.param("scale", torch.ones(()), constraint=constraints.positive)
    x = pyro.sample("x", dist.Normal(loc, scale))
    with pyro.plate("plate", len(data)):
        with poutine.mask(mask=~mask):
            pyro.sample("y_unobserved", dist.Normal(x, 1.0))


def make_data(num_data=24, seed=0):
    """data [N] around 2, mask [N] bool (about half observed)."""
    gen = torch.Generator().manual_seed(seed)
    data = 2.0 + torch.randn(num_data, generator=gen)
    mask = torch.rand(num_data, generator=gen) < 0.5
    return data, mask


def posterior_of_x(data, mask):
    """x | observed y: N(Σ_obs y / (n_obs + 1), 1 / (n_obs + 1)) (the unobserved y integrate out)."""
    count = mask.sum().item()
    return data[mask].sum().item() / (count + 1), (1.0 / (count + 1)) ** 0.5


@config_enumerate
def label_model(x, y, observed):
    """y_n ~ Categorical(weights) (observed where ``observed``), x_n | y_n ~ N(locs[y_n], 1)."""
    weights, locs = label_params()
    with pyro.plate("data", len(x)):
        label = pyro.sample("y", dist.Categorical(weights), obs=y, obs_mask=observed)
        pyro.sample("x", dist.Normal(locs[label], 1.0), obs=x)


def label_params():
    """The mixture's weights π and locs, created at their starting values if not yet trained."""
    return (pyro.param("weights", torch.tensor([0.3, 0.7]), constraint=constraints.simplex),
            pyro.param("locs", torch.tensor([-2.0, 2.0])))


def label_guide(x, y, observed):
    pass


def make_label_data(num_data=16, seed=0):
    """x [N] float, y [N] long in {0, 1}, observed [N] bool (about half the labels known)."""
    gen = torch.Generator().manual_seed(seed)
    y = (torch.rand(num_data, generator=gen) < 0.7).long()
    x = torch.tensor([-2.0, 2.0])[y] + torch.randn(num_data, generator=gen)
    observed = torch.rand(num_data, generator=gen) < 0.5
    return x, y, observed


def label_log_px(x, y, observed):
    """Closed form per row: log π_y + log N(x; loc_y, 1) where y is observed, else the log-sum over y."""
    weights, locs = (value.detach() for value in label_params())
    joint = weights.log() + dist.Normal(locs, 1.0).log_prob(x[:, None])
    return torch.where(observed, joint.gather(1, y[:, None]).squeeze(1), joint.logsumexp(1))
