"""An author who subsamples her own plate, after Pyro's tensor_shapes tutorial
(tutorial/source/tensor_shapes.ipynb, pyro-ppl/pyro commit ff6ae1c9572591791aae8842bcd702fcf0b46fd6),
whose ``model2`` reads

    with pyro.plate("data", len(data), subsample_size=10) as ind:
        assert len(ind) == 10    # ind is a LongTensor that indexes the subsample.
        batch = data[ind]        # Select a minibatch of data.

Written for this suite in that style, with the data as an argument and a local latent added so
that everything has a closed form (the author's assertion kept):
z_n ~ N(loc, 1), x_n | z_n ~ N(z_n, 1)  =>  x_n ~ N(loc, 2),  z_n | x_n ~ N((x_n + loc) / 2, 1 / 2).
``guide`` is that exact posterior, subsampled the same way.
"""
import math

import torch

import pyro
from pyro.distributions import Normal

SUBSAMPLE = 3


def model(data):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", len(data), subsample_size=SUBSAMPLE) as ind:
        assert len(ind) == SUBSAMPLE
        batch = data[ind]
        z = pyro.sample("z", Normal(loc, 1.0).expand([SUBSAMPLE]))
        pyro.sample("x", Normal(z, 1.0), obs=batch)


def guide(data):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", len(data), subsample_size=SUBSAMPLE) as ind:
        batch = data[ind]
        pyro.sample("z", Normal((batch + loc) / 2, math.sqrt(0.5)))
