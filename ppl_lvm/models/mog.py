"""The mixture of Gaussians, the shallow latent variable model of the lecture, as a Pyro program.

z ~ Categorical(π),  x | z = k ~ N(μ_k, Σ_k);  clustering is the posterior p(z | x) (Bayes' rule).
Its guides: the empty one (z enumerated: q(z_i) = p(z_i | x_i)), a per-datapoint q(z_i) = Cat(φ_i)
for REINFORCE, and an amortized encoder q(z | x) = Cat(φ(x)); k-means++ gives a start. The
procedures that fit it (EM, the three SVI fits, choosing K) are in ``ppl_lvm.mixtures``.
"""
from __future__ import annotations

import math
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
from torch import nn
from torch.nn import functional as F

from ppl_lvm.plate import data_plate

COVARIANCES = ("diag", "full", "tied")
METHODS = ("em", "enum", "reinforce", "amortized")


def check_data(x, data_dim=None, name="x"):
    """Raise a clear error unless ``x`` is a finite float tensor [N, D] (D = ``data_dim`` if given)."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch tensor [N, D], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [N, D], got {tuple(x.shape)}")
    if data_dim is not None and x.shape[1] != data_dim:
        raise ValueError(f"{name} has {x.shape[1]} columns but the mixture has data_dim={data_dim}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        rows = (~torch.isfinite(x)).any(-1).nonzero()[:5, 0].tolist()
        raise ValueError(f"{name} contains NaN or inf (first bad rows: {rows})")
    return x


def _tril_raw(scale_tril):
    """Inverse of ``_tril``: unconstrained [..., D, D] whose diagonal is log of the diagonal."""
    raw = torch.tril(scale_tril, -1)
    return raw + torch.diag_embed(scale_tril.diagonal(dim1=-2, dim2=-1).log())


def _tril(raw):
    """Lower-triangular Cholesky factor with positive diagonal from an unconstrained [..., D, D]."""
    return torch.tril(raw, -1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())


class MixtureOfGaussians(nn.Module):
    """p(z) = Cat(π), p(x | z = k) = N(μ_k, Σ_k), a Pyro model with sites "z" and "x" in plate "data".

    Args:
        num_components: K >= 1.
        data_dim: D, the size of one datapoint.
        covariance: "diag" (Σ_k = diag σ_k², σ_k = exp(log_scale_k)), "full" (Σ_k = L_k L_kᵀ, L_k
            lower-triangular with positive diagonal) or "tied" (one L shared by all k).
        device: where the parameters live.

    Parameters (nn.Parameters, registered with ``pyro.module("mog", self)`` by ``model``):
    ``logits`` [K] (π = softmax(logits), on the simplex), ``loc`` [K, D] (μ), and ``log_scale``
    [K, D] (diag) or ``raw_scale_tril`` [K, D, D] (full) / [D, D] (tied).
    """

    def __init__(self, num_components: int, data_dim: int, covariance: str = "diag",
                 device: str | torch.device | None = None) -> None:
        super().__init__()
        if int(num_components) != num_components or num_components < 1:
            raise ValueError(f"num_components K must be an integer >= 1, got {num_components}")
        if int(data_dim) != data_dim or data_dim < 1:
            raise ValueError(f"data_dim D must be an integer >= 1, got {data_dim}")
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        self.num_components, self.data_dim, self.covariance = int(num_components), int(data_dim), covariance
        K, D = self.num_components, self.data_dim
        self.logits = nn.Parameter(torch.zeros(K, device=device))
        # distinct means so that an uninitialised mixture is not degenerate
        self.loc = nn.Parameter(torch.randn(K, D, generator=torch.Generator().manual_seed(0)).to(device))
        if covariance == "diag":
            self.log_scale = nn.Parameter(torch.zeros(K, D, device=device))
        elif covariance == "full":
            self.raw_scale_tril = nn.Parameter(torch.zeros(K, D, D, device=device))
        else:
            self.raw_scale_tril = nn.Parameter(torch.zeros(D, D, device=device))

    def config(self) -> dict[str, Any]:
        return dict(num_components=self.num_components, data_dim=self.data_dim,
                    covariance=self.covariance)

    # ---- parameters as the lecture writes them -------------------------------------------------
    @property
    def weights(self) -> torch.Tensor:
        """π [K], on the simplex."""
        return F.softmax(self.logits, -1)

    @property
    def scale_tril(self) -> torch.Tensor:
        """L_k [K, D, D] with Σ_k = L_k L_kᵀ (diagonal for "diag")."""
        if self.covariance == "diag":
            return torch.diag_embed(self.log_scale.exp())
        return _tril(self.raw_scale_tril).expand(self.num_components, self.data_dim, self.data_dim)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        """Σ_k [K, D, D], positive definite."""
        tril = self.scale_tril
        return tril @ tril.transpose(-1, -2)

    def component(self, z: torch.Tensor | None = None) -> dist.TorchDistribution:
        """p(x | z): a distribution with event shape [D] and batch shape z.shape (or [K] if z is None)."""
        index = slice(None) if z is None else z
        if self.covariance == "diag":
            return dist.Normal(self.loc[index], self.log_scale.exp()[index]).to_event(1)
        tril = _tril(self.raw_scale_tril)
        if self.covariance == "full":
            tril = tril[index]
        return dist.MultivariateNormal(self.loc[index], scale_tril=tril)

    # ---- the Pyro model ---------------------------------------------------------------------------
    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None,
              num_data: int | None = None) -> None:
        """z_i ~ Cat(π), x_i | z_i ~ N(μ_{z_i}, Σ_{z_i}) for the rows x [B, D] (plate "data", dim -1).

        z is marked for parallel enumeration: ``TraceEnum_ELBO`` with an empty guide sums it out
        exactly (the loss is then -log p(x)); a guide that samples "z" takes precedence.
        """
        pyro.module("mog", self)
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Categorical(logits=self.logits), infer={"enumerate": "parallel"})
            pyro.sample("x", self.component(z), obs=x)

    # ---- exact inference --------------------------------------------------------------------------
    def joint_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_i, z_i = k) = log π_k + log N(x_i | μ_k, Σ_k): x [N, D] -> [N, K]."""
        check_data(x, self.data_dim)
        return F.log_softmax(self.logits, -1) + self.component().log_prob(x.unsqueeze(-2))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_i) = logsumexp_k log p(x_i, z_i = k): x [N, D] -> [N] (nats)."""
        return self.joint_log_prob(x).logsumexp(-1)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Responsibilities p(z_i = k | x_i) by Bayes' rule: x [N, D] -> [N, K], rows sum to 1."""
        return F.softmax(self.joint_log_prob(x), -1)

    def cluster(self, x: torch.Tensor) -> torch.Tensor:
        """The MAP cluster argmax_k p(z_i = k | x_i): x [N, D] -> [N] long."""
        return self.joint_log_prob(x).argmax(-1)

    def sample(self, num_samples: int, generator: torch.Generator | None = None,
               return_z: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Ancestral sampling z ~ Cat(π), x ~ N(μ_z, Σ_z): returns x [n, D] (and z [n] if return_z)."""
        with torch.no_grad():
            z = torch.multinomial(self.weights, num_samples, replacement=True, generator=generator)
            noise = torch.randn(num_samples, self.data_dim, device=self.loc.device, dtype=self.loc.dtype,
                                generator=generator)
            x = self.loc[z] + (self.scale_tril[z] @ noise.unsqueeze(-1)).squeeze(-1)
        return (x, z) if return_z else x

    def num_parameters(self) -> int:
        """Free parameters: (K - 1) weights + K D means + covariance parameters (as scikit-learn)."""
        K, D = self.num_components, self.data_dim
        cov = {"diag": K * D, "full": K * D * (D + 1) // 2, "tied": D * (D + 1) // 2}[self.covariance]
        return K - 1 + K * D + cov

    def bic(self, x: torch.Tensor) -> float:
        """Bayesian information criterion -2 Σ_i log p(x_i) + p log N (lower is better); x [N, D]."""
        with torch.no_grad():
            return (-2 * self.log_prob(x).sum() + self.num_parameters() * math.log(x.shape[0])).item()

    # ---- initialisation ---------------------------------------------------------------------------
    def init_kmeans_pp(self, x: torch.Tensor, seed: int = 0, num_iters: int = 20,
                       reg_covar: float = 1e-6) -> torch.Tensor:
        """Set π, μ, Σ from k-means (k-means++ seeding, then Lloyd): the hard-assignment M-step.

        x: [N, D]. Returns the cluster labels [N] (long). Deterministic given ``seed``.
        """
        check_data(x, self.data_dim)
        params = kmeans_init(x, self.num_components, seed=seed, num_iters=num_iters,
                             covariance=self.covariance, reg_covar=reg_covar)
        self.set_parameters(params["weights"], params["means"], params["covariances"])
        return params["labels"]

    def set_parameters(self, weights: torch.Tensor, means: torch.Tensor,
                       covariances: torch.Tensor) -> None:
        """Set π [K], μ [K, D] and Σ ([K, D] variances for "diag", [K, D, D] for "full", [D, D] "tied").

        The values are moved to the parameters' device and dtype before the log and the Cholesky.
        """
        with torch.no_grad():
            like = dict(device=self.loc.device, dtype=self.loc.dtype)
            self.logits.copy_(weights.to(**like).log())
            self.loc.copy_(means.to(**like))
            if self.covariance == "diag":
                self.log_scale.copy_(0.5 * covariances.to(**like).log())
            else:
                self.raw_scale_tril.copy_(_tril_raw(torch.linalg.cholesky(covariances.to(**like))))


def kmeans_pp_centers(x, num_components, seed=0):
    """k-means++ seeding (scikit-learn's ``kmeans_plusplus``, greedy: each new centre is the best of
    2 + log K draws with probability ∝ squared distance): x [N, D] -> [K, D], rows of x, on x's device.

    The draws are made in float64 on the CPU, so the same data gives the same centres in any dtype.
    """
    from sklearn.cluster import kmeans_plusplus  # optional: scikit-learn costs ~1 s to import

    _, indices = kmeans_plusplus(x.detach().cpu().double().numpy(), num_components, random_state=seed)
    return x[torch.as_tensor(indices, device=x.device)]


def kmeans_init(x, num_components, seed=0, num_iters=20, covariance="diag", reg_covar=1e-6):
    """k-means++ then ``num_iters`` Lloyd steps, and the mixture they imply (hard responsibilities).

    x: [N, D]. Returns a dict: ``labels`` [N], ``weights`` [K], ``means`` [K, D], ``covariances``
    ([K, D] variances for "diag", [K, D, D] "full", [D, D] "tied"), each with ``reg_covar`` added
    to the diagonal (as scikit-learn's GaussianMixture does). The same dict initialises the SVI fits
    and scikit-learn's EM (``weights_init``, ``means_init``, ``precisions_init``).
    """
    check_data(x)
    num_data, data_dim = x.shape
    if num_components > num_data:
        raise ValueError(f"num_components K={num_components} exceeds the number of datapoints N={num_data}")
    centers = kmeans_pp_centers(x, num_components, seed)
    for _ in range(num_iters):
        labels = torch.cdist(x, centers).argmin(-1)
        counts = torch.bincount(labels, minlength=num_components)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        # an empty cluster keeps its old centre
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
        if torch.equal(new, centers):
            break
        centers = new
    labels = torch.cdist(x, centers).argmin(-1)
    resp = F.one_hot(labels, num_components).to(x.dtype)
    counts = resp.sum(0) + 10 * torch.finfo(x.dtype).eps
    means = resp.T @ x / counts[:, None]
    diff = x.unsqueeze(1) - means                                                   # [N, K, D]
    if covariance == "diag":
        covariances = (resp.unsqueeze(-1) * diff ** 2).sum(0) / counts[:, None] + reg_covar
        empty = resp.sum(0) == 0
        covariances[empty] = x.var(0) + reg_covar
    else:
        eye = torch.eye(data_dim, dtype=x.dtype, device=x.device)
        per_k = torch.einsum("nk,nkd,nke->kde", resp, diff, diff) / counts[:, None, None]
        if covariance == "full":
            covariances = per_k + reg_covar * eye
        else:
            covariances = (per_k * counts[:, None, None]).sum(0) / num_data + reg_covar * eye
    return {"labels": labels, "weights": counts / counts.sum(), "means": means,
            "covariances": covariances}


# ---- guides ---------------------------------------------------------------------------------------
def enumeration_guide(x, idx=None, num_data=None):
    """The empty guide: with ``TraceEnum_ELBO`` the model's z is summed out exactly."""


class LocalCategoricalGuide(nn.Module):
    """q(z_i) = Cat(softmax(φ_i)), one row of logits per datapoint, trained by REINFORCE.

    Args:
        num_data: N, rows of the table (the guide reads rows ``idx``, or all N when idx is None).
        num_components: K.
        init_logits: optional [N, K] starting φ (e.g. the initial model's log responsibilities).
        init_baseline: optional [N] starting per-datapoint baseline b_i (e.g. its ELBO_i).

    The score-function gradient (ELBO_i - b_i) ∇ log q(z_i) uses a learned per-datapoint baseline
    b_i (``baseline`` [N], fitted by squared error through Pyro's ``baseline_value``; needs
    ``TraceGraph_ELBO``: ``Trace_ELBO`` takes no baselines). It works with minibatches.
    """

    def __init__(self, num_data, num_components, init_logits=None, init_baseline=None, device=None):
        super().__init__()
        logits = torch.zeros(num_data, num_components, device=device) if init_logits is None else init_logits
        baseline = torch.zeros(num_data, device=device) if init_baseline is None else init_baseline
        if logits.shape != (num_data, num_components) or baseline.shape != (num_data,):
            raise ValueError(f"init_logits must be [{num_data}, {num_components}] and init_baseline "
                             f"[{num_data}]; got {tuple(logits.shape)} and {tuple(baseline.shape)}")
        self.logits = nn.Parameter(logits.detach().clone().to(device))
        self.baseline = nn.Parameter(baseline.detach().clone().to(device))

    def forward(self, x, idx=None, num_data=None):
        pyro.module("local_guide", self)
        rows = slice(None) if idx is None else idx
        logits = self.logits[rows]
        if logits.shape[0] != x.shape[0]:
            raise ValueError(f"the guide's table has {self.logits.shape[0]} rows but x has "
                             f"{x.shape[0]}; pass idx (the rows' indices) for minibatches")
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.Categorical(logits=logits),
                        infer={"baseline": {"baseline_value": self.baseline[rows]}})

    guide = forward


class CategoricalEncoder(nn.Module):
    """φ(x): x [..., D] -> logits [..., K], an MLP on standardised inputs."""

    def __init__(self, data_dim, num_components, hidden_dim=64, data_loc=None, data_scale=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(data_dim, hidden_dim), nn.Softplus(),
                                 nn.Linear(hidden_dim, num_components))
        self.register_buffer("data_loc", torch.zeros(data_dim) if data_loc is None else data_loc.clone())
        self.register_buffer("data_scale", torch.ones(data_dim) if data_scale is None else data_scale.clone())

    def forward(self, x):
        return self.net((x - self.data_loc) / self.data_scale)


class AmortizedCategoricalGuide(nn.Module):
    """q(z | x) = Cat(softmax(φ(x))) with one encoder for all datapoints.

    ``estimator="enum"`` marks z for enumeration in the guide (with ``TraceEnum_ELBO`` the ELBO's
    expectation over q is then exact); "reinforce" samples it (score function, learned scalar
    baseline; use ``TraceGraph_ELBO``).
    """

    def __init__(self, encoder, estimator="enum"):
        super().__init__()
        if estimator not in ("enum", "reinforce"):
            raise ValueError(f"estimator must be 'enum' or 'reinforce', got {estimator!r}")
        self.encoder, self.estimator = encoder, estimator
        self.baseline = nn.Parameter(torch.zeros(()))

    def forward(self, x, idx=None, num_data=None):
        pyro.module("amortized_guide", self)
        logits = self.encoder(x)
        infer = ({"enumerate": "parallel"} if self.estimator == "enum" else
                 {"baseline": {"baseline_value": self.baseline.expand(x.shape[0])}})
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.Categorical(logits=logits), infer=infer)

    guide = forward
