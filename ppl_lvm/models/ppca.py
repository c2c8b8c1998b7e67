"""Probabilistic PCA: the linear-Gaussian latent-variable model whose log p(x) is known in closed form.

z ~ N(0, I_M), x | z ~ N(W z + b, σ² I_D)  =>  p(x) = N(x; b, W Wᵀ + σ² I_D) and
p(z | x) = N(Σ Wᵀ (x - b) / σ², Σ) with Σ = (I_M + Wᵀ W / σ²)⁻¹. The truth every estimator of
log p(x) (prior MC, importance sampling, ELBO, IWAE) is checked against.
"""
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_lvm.plate import data_plate


class PPCA(nn.Module):
    """PPCA with parameters θ = (W [D, M], b [D], σ); ``model`` and ``guide`` follow the data plate.

    Args:
        weight: [D, M] the loading matrix W.
        bias: [D] the mean b.
        noise_scale: σ > 0, the observation noise's standard deviation.
    """

    def __init__(self, weight, bias, noise_scale):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.get_default_dtype()))
        self.bias = nn.Parameter(torch.as_tensor(bias, dtype=self.weight.dtype))
        self.log_noise_scale = nn.Parameter(torch.as_tensor(noise_scale, dtype=self.weight.dtype).log())

    @property
    def noise_scale(self):
        return self.log_noise_scale.exp()

    @property
    def z_dim(self):
        return self.weight.shape[1]

    def model(self, x, idx=None, num_data=None):
        """p(z) p(x | z). x: [B, D]; "z": [B, M] with batch dim B (plate "data") and event dim M."""
        pyro.module("ppca", self)
        zeros = x.new_zeros(self.z_dim)
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            loc = z @ self.weight.T + self.bias
            pyro.sample("x", dist.Normal(loc, self.noise_scale).to_event(1), obs=x)

    def exact_posterior(self, x):
        """p(z | x) = N(loc, scale_tril scale_trilᵀ). x: [N, D]; returns loc [N, M], scale_tril [M, M]."""
        weight, variance = self.weight, self.noise_scale**2
        precision = torch.eye(self.z_dim, dtype=x.dtype, device=x.device) + weight.T @ weight / variance
        covariance = torch.linalg.inv(precision)
        loc = (x - self.bias) @ weight @ covariance / variance
        return loc, torch.linalg.cholesky(covariance)

    def guide(self, x, idx=None, num_data=None):
        """The exact posterior as guide: q(z | x) = p(z | x), so every importance weight equals p(x)."""
        loc, scale_tril = self.exact_posterior(x)
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    def log_marginal_exact(self, x):
        """log p(x) = log N(x; b, W Wᵀ + σ² I). x: [N, D]; returns [N]."""
        dim = x.shape[-1]
        covariance = self.weight @ self.weight.T + self.noise_scale**2 * torch.eye(
            dim, dtype=x.dtype, device=x.device
        )
        return dist.MultivariateNormal(self.bias, covariance_matrix=covariance).log_prob(x)
