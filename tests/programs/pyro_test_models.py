"""Models from Pyro's own test suite (tests/infer/test_enum.py, pyro-ppl/pyro commit ff6ae1c95),
with the data passed as an argument instead of a closure."""
import torch

import pyro
import pyro.distributions as dist
from pyro import poutine


def composite_model(data):
    """test_elbo_zip's zero-inflated Poisson as a MaskedMixture over an enumerated Bernoulli."""
    gate = pyro.param("gate")
    rate = pyro.param("rate")
    dist1 = dist.Delta(torch.tensor(0.0))
    dist0 = dist.Poisson(rate)
    with pyro.plate("data", len(data)):
        mask = pyro.sample(
            "mask", dist.Bernoulli(gate), infer={"enumerate": "parallel"}
        ).bool()
        pyro.sample("obs", dist.MaskedMixture(mask, dist0, dist1), obs=data)


def hand_model(data):
    """test_mixture_of_diag_normals' hand-written mixture: the data plate at dim -2, components
    at dim -1, the component chosen by an enumerated site named "mask"."""
    locs = pyro.param("locs")
    coord_scale = pyro.param("coord_scale")
    component_logits = pyro.param("component_logits")
    with pyro.plate("data", len(data), dim=-2):
        which = pyro.sample(
            "mask",
            dist.Categorical(logits=component_logits),
            infer={"enumerate": "parallel"},
        )
        with pyro.plate(
            "components", len(component_logits), dim=-1
        ) as component_ind:
            with poutine.mask(mask=(which == component_ind)):
                pyro.sample(
                    "obs",
                    dist.Normal(locs, coord_scale).to_event(1),
                    obs=data.unsqueeze(-2),
                )
