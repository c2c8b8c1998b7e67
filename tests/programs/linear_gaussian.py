"""A factor-analysis program written for this suite with its own names and plate dims: the latent
site is "latent", the observed one "obs", the data plate is at dim -2 and a "features" plate at
dim -1 (as Pyro's tests/infer/test_enum.py writes nested plates). Everything has a closed form:
x_n ~ N(μ, W Wᵀ + σ² I), latent_n | x_n ~ N(Σ Wᵀ (x_n - μ) / σ², Σ), Σ = (I + Wᵀ W / σ²)⁻¹.
"""
import torch

import pyro
import pyro.distributions as dist

WEIGHT = torch.tensor([[1.0, 0.0], [0.5, 1.0], [-1.0, 0.5], [0.0, 2.0]])  # W [D=4, k=2]
MEAN = torch.tensor([0.5, -1.0, 0.0, 2.0])  # μ [D]
NOISE = 0.5  # σ


def model(x):
    """x: [N, D]."""
    with pyro.plate("data", x.shape[0], dim=-2):
        h = pyro.sample("latent", dist.Normal(torch.zeros(2), 1.0).to_event(1))  # [N, 1, k]
        with pyro.plate("features", x.shape[1], dim=-1):
            pyro.sample("obs", dist.Normal(h.squeeze(-2) @ WEIGHT.T + MEAN, NOISE), obs=x)


def posterior(x):
    """The exact posterior of "latent" given all of x: means [N, k], covariance [k, k]."""
    precision = torch.eye(2) + WEIGHT.T @ WEIGHT / NOISE ** 2
    covariance = torch.linalg.inv(precision)
    return (x - MEAN) @ WEIGHT @ covariance / NOISE ** 2, covariance


def exact_guide(x):
    """q(latent | x) = p(latent | x): every importance weight equals p(x_n)."""
    loc, covariance = posterior(x)
    with pyro.plate("data", x.shape[0], dim=-2):
        pyro.sample("latent", dist.MultivariateNormal(loc.unsqueeze(-2), covariance))


def log_px(x):
    """log N(x_n; μ, W Wᵀ + σ² I): [N]."""
    covariance = WEIGHT @ WEIGHT.T + NOISE ** 2 * torch.eye(len(MEAN))
    return dist.MultivariateNormal(MEAN, covariance).log_prob(x)


def make_data(num_data=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(num_data, 2, generator=gen)
    return h @ WEIGHT.T + MEAN + NOISE * torch.randn(num_data, len(MEAN), generator=gen)
