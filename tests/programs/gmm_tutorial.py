"""Pyro's GMM tutorial (tutorial/source/gmm.ipynb, pyro-ppl/pyro commit ff6ae1c95): global
mixture weights (Dirichlet), a global scale (LogNormal) and per-component locs in their own plate;
the assignment enumerated in the data plate; AutoDelta over the globals. Unchanged but for the
data, which is an argument of ``init_loc_fn`` here instead of a notebook global."""
import torch

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDelta

K = 2  # Fixed number of components.


@config_enumerate
def model(data):
    # Global variables.
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))

    with pyro.plate("data", len(data)):
        # Local variables.
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def init_loc_fn_for(data, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def init_loc_fn(site):
        if site["name"] == "weights":
            # Initialize weights to uniform.
            return torch.ones(K) / K
        if site["name"] == "scale":
            return (data.var() / 2).sqrt()
        if site["name"] == "locs":
            return data[torch.multinomial(torch.ones(len(data)) / len(data), K,
                                          generator=generator)]
        raise ValueError(site["name"])
    return init_loc_fn


def make_guide(data, seed=None):
    """The tutorial's ``initialize``: AutoDelta over the globals; without a seed, the best of
    the tutorial's random initialisations by initial loss (it takes 100; 20 here)."""
    if seed is None:
        seed = min(range(20), key=lambda s: TraceEnum_ELBO(max_plate_nesting=1).loss(
            model, make_guide(data, s), data))
        pyro.clear_param_store()
    return AutoDelta(poutine.block(model, expose=["weights", "locs", "scale"]),
                     init_loc_fn=init_loc_fn_for(data, seed))


def make_data(num_small=10, num_large=90, seed=0):
    """Two clusters, the small one ~10 % of the points (the tutorial uses 5 points)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(num_large, generator=generator),
                      8.0 + torch.randn(num_small, generator=generator)])
