"""A model of your own for `ppl-lvm train examples/my_model.py:build --data digits`.

build(data_dim, **options) returns an object with `model(x)` and `guide(x)`: here an nn.Module,
a VAE with a Gaussian decoder whose diagonal scale is a neural network (the lecture's
x | z ~ N(μ_θ(z), diag σ²_θ(z))), written as a plain Pyro program with its own site names.
Options come from the command line: `--option z_dim=4 --option hidden=64`.
"""
import pyro
import pyro.distributions as dist
import torch
from torch import nn


class GaussianVAE(nn.Module):
    def __init__(self, data_dim, z_dim=4, hidden=64):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Softplus(),
                                     nn.Linear(hidden, 2 * data_dim))
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.Softplus(),
                                     nn.Linear(hidden, 2 * z_dim))

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("images", len(x)):
            code = pyro.sample("code", dist.Normal(x.new_zeros(len(x), self.z_dim), 1.0)
                               .to_event(1))
            loc, raw = self.decoder(code).chunk(2, -1)
            scale = nn.functional.softplus(raw) + 0.05
            pyro.sample("pixels", dist.Normal(loc, scale).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("images", len(x)):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("code", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


def build(data_dim, z_dim=4, hidden=64):
    return GaussianVAE(data_dim, z_dim=int(z_dim), hidden=int(hidden))
