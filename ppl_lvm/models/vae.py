"""The variational autoencoder: an infinite mixture of Gaussians (or Bernoullis).

z ~ N(0, I),  x | z ~ Bernoulli(logits_θ(z))  or  N(μ_θ(z), diag σ²_θ(z)),
and the amortized guide q_φ(z | x) = N(μ_φ(x), diag σ²_φ(x)) given by one MLP encoder.
"""
from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import pyro.infer.util
import torch
from torch import nn
from torch.nn import functional as F

from ppl_lvm.plate import data_plate

LIKELIHOODS = ("bernoulli", "gaussian")


def mlp(sizes, activation=nn.Softplus):
    """A stack of Linear layers with ``activation`` between them (none after the last)."""
    layers = []
    for i, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i > 0:
            layers.append(activation())
        layers.append(nn.Linear(size_in, size_out))
    return nn.Sequential(*layers)


def check_pixels(x, likelihood):
    """Pixels must lie in [0, 1]: a Gaussian decoder's mean is a sigmoid, so 0..255 grey levels
    cannot be fitted and the loss runs to ~1e9 nats with no other hint (checked while Pyro
    validates; a Bernoulli one also needs them binary, which Pyro's support check sees)."""
    low, high = x.min().item(), x.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"VAE(likelihood={likelihood!r}) models pixels at site 'x' in [0, 1], but x "
                         f"holds values in [{low:g}, {high:g}]: scale 0..255 grey levels by 1/255 "
                         "(the ppl_lvm.data loaders do)")


def _hidden_sizes(hidden_dim):
    return (hidden_dim,) if isinstance(hidden_dim, int) else tuple(hidden_dim)


class Encoder(nn.Module):
    """f_λ(x) = (μ_φ(x), σ_φ(x)): x [..., D] -> loc [..., Z], scale [..., Z] (scale > 0)."""

    def __init__(self, data_dim, z_dim=20, hidden_dim=400, input_dim=None):
        super().__init__()
        self.net = mlp((input_dim or data_dim, *_hidden_sizes(hidden_dim), 2 * z_dim))

    def forward(self, x):
        loc, raw_scale = self.net(x).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + 1e-4


class BernoulliDecoder(nn.Module):
    """p_θ(x | z) = Bernoulli(logits_θ(z)): z [..., Z] -> distribution with batch shape [..., D]."""

    def __init__(self, data_dim, z_dim=20, hidden_dim=400):
        super().__init__()
        self.net = mlp((z_dim, *_hidden_sizes(hidden_dim), data_dim))

    def forward(self, z):
        return dist.Bernoulli(logits=self.net(z))


class GaussianDecoder(nn.Module):
    """p_θ(x | z) = N(μ_θ(z), diag σ²_θ(z)), neural mean and neural diagonal scale.

    z [..., Z] -> distribution with batch shape [..., D]. The scale is bounded below by
    ``min_scale`` so the density of data on [0, 1] stays finite (pixels that are always 0
    would otherwise drive σ to 0 and log p(x) to +inf).
    """

    def __init__(self, data_dim, z_dim=20, hidden_dim=400, min_scale=1e-2):
        super().__init__()
        self.net = mlp((z_dim, *_hidden_sizes(hidden_dim), 2 * data_dim))
        self.min_scale = min_scale

    def forward(self, z):
        loc, raw_scale = self.net(z).chunk(2, dim=-1)
        return dist.Normal(torch.sigmoid(loc), F.softplus(raw_scale) + self.min_scale)


class VAE(nn.Module):
    """A VAE as a Pyro model/guide pair: ``model(x)`` samples z then x; ``guide(x)`` is q_φ(z | x).

    Args:
        data_dim: D, the size of one flattened datapoint.
        z_dim: Z, the size of the latent code.
        hidden_dim: an int or a tuple of hidden layer sizes (shared by encoder and decoder).
        likelihood: "bernoulli" (x in {0, 1}) or "gaussian" (x real, neural diagonal Σ).

    Sites: "z" [B, Z] (event dim 1) and "x" [B, D] (event dim 1), both in plate "data".
    """

    def __init__(self, data_dim: int, z_dim: int = 20, hidden_dim: int | tuple[int, ...] = 400,
                 likelihood: str = "bernoulli") -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")
        if data_dim < 1 or z_dim < 1:
            raise ValueError(f"data_dim and z_dim must be >= 1, got {data_dim} and {z_dim}")
        self.data_dim, self.z_dim, self.likelihood = data_dim, z_dim, likelihood
        self.hidden_dim = hidden_dim
        decoder = BernoulliDecoder if likelihood == "bernoulli" else GaussianDecoder
        self.decoder = decoder(data_dim, z_dim, hidden_dim)
        self.encoder = Encoder(data_dim, z_dim, hidden_dim)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments, enough to rebuild this VAE (checkpoints store it)."""
        return dict(data_dim=self.data_dim, z_dim=self.z_dim, hidden_dim=self.hidden_dim,
                    likelihood=self.likelihood)

    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None,
              num_data: int | None = None) -> None:
        """p_θ(x, z) = p(z) p_θ(x | z).  x: [B, D]; idx: optional [B] row indices; num_data: N."""
        pyro.module("decoder", self.decoder)
        if pyro.infer.util.is_validation_enabled():
            check_pixels(x, self.likelihood)
        with data_plate(x, idx, num_data):
            z_loc = x.new_zeros(x.shape[0], self.z_dim)
            z = pyro.sample("z", dist.Normal(z_loc, 1.0).to_event(1))
            pyro.sample("x", self.decoder(z).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, idx: torch.Tensor | None = None,
              num_data: int | None = None) -> None:
        """q_φ(z | x) = N(μ_φ(x), diag σ²_φ(x)), amortized by the encoder.  x: [B, D]."""
        pyro.module("encoder", self.encoder)
        with data_plate(x, idx, num_data):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's mean at the encoder's mean code: x [B, D] -> [B, D]."""
        loc, _ = self.encoder(x)
        return self.decoder(loc).mean

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral samples' means E[x | z], z ~ p(z): returns [num_samples, D]."""
        device = next(self.parameters()).device
        z = torch.randn(num_samples, self.z_dim, device=device, generator=generator)
        return self.decoder(z).mean
