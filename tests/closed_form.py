"""A linear-Gaussian (PPCA) program where everything the tests of per-datapoint inference need has a
closed form: z_n ~ N(0, I_k), x_n | z_n ~ N(W z_n + b, σ² I_D).

log p(x_n) = log N(x_n; b, W Wᵀ + σ² I); the posterior is N(m_n, Λ⁻¹) with Λ = I + Wᵀ W / σ²,
m_n = Λ⁻¹ Wᵀ (x_n - b) / σ²; the best mean-field Normal q*(z_n) has mean m_n and variances 1 / Λ_jj;
the ELBO of any diagonal Normal q = N(μ, diag s²) is ``elbo``.
"""
import math

import pyro
import pyro.distributions as dist
import torch

from ppl_lvm.plate import data_plate

WEIGHT = torch.tensor([[1.0, 0.8], [0.5, 1.0], [-1.0, -0.5], [0.2, 1.5], [0.8, 0.6]])  # [D=5, k=2]
BIAS = torch.tensor([0.5, -1.0, 0.0, 2.0, 1.0])
NOISE = 0.6


def model(x, idx=None, num_data=None):
    """x: [N, 5]; data plate "data" at dim -1, latent site "z" with event dim 1."""
    with data_plate(x, idx, num_data):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ WEIGHT.T + BIAS, NOISE).to_event(1), obs=x)


def precision():
    return torch.eye(2) + WEIGHT.T @ WEIGHT / NOISE ** 2


def posterior_mean(x):
    """m_n: [N, k]."""
    return torch.linalg.solve(precision(), WEIGHT.T @ (x - BIAS).T / NOISE ** 2).T


def optimal_scale():
    """q*'s standard deviations 1 / √Λ_jj: [k]."""
    return precision().diagonal().rsqrt()


def log_px(x):
    """log p(x_n): [N]."""
    covariance = WEIGHT @ WEIGHT.T + NOISE ** 2 * torch.eye(len(BIAS))
    return dist.MultivariateNormal(BIAS, covariance).log_prob(x)


def elbo(x, loc, scale):
    """ELBO of q(z_n) = N(loc_n, diag scale_n²): [N] (exact)."""
    data_dim, k = WEIGHT.shape
    residual = x - loc @ WEIGHT.T - BIAS
    expected_sq = (residual ** 2).sum(-1) + (scale ** 2 * (WEIGHT ** 2).sum(0)).sum(-1)
    likelihood = -0.5 * data_dim * math.log(2 * math.pi * NOISE ** 2) - expected_sq / (2 * NOISE ** 2)
    prior = -0.5 * k * math.log(2 * math.pi) - 0.5 * ((loc ** 2).sum(-1) + (scale ** 2).sum(-1))
    entropy = 0.5 * k * math.log(2 * math.pi * math.e) + scale.log().sum(-1)
    return likelihood + prior + entropy


def encoder(x):
    """A deliberately imperfect amortized q: 0.8 × the posterior mean, 1.3 × q*'s scales."""
    return 0.8 * posterior_mean(x), (1.3 * optimal_scale()).expand(x.shape[0], 2)


def amortized_guide(x, idx=None, num_data=None):
    loc, scale = encoder(x)
    with data_plate(x, idx, num_data):
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def make_data(num_data=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num_data, 2, generator=gen)
    return z @ WEIGHT.T + BIAS + NOISE * torch.randn(num_data, len(BIAS), generator=gen)


def exact_guide(x, idx=None, num_data=None):
    """q(z | x) = p(z | x), a correlated Normal: outside the mean-field family of q*."""
    with data_plate(x, idx, num_data):
        pyro.sample("z", dist.MultivariateNormal(posterior_mean(x), precision_matrix=precision()))


def gaps(x):
    """The closed-form (approximation gap, amortization gap) means for ``amortized_guide``."""
    optimal = elbo(x, posterior_mean(x), optimal_scale().expand(x.shape[0], -1))
    loc, scale = encoder(x)
    return (log_px(x) - optimal).mean().item(), (optimal - elbo(x, loc, scale)).mean().item()
