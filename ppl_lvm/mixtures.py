"""Fitting a mixture of Gaussians (``ppl_lvm.models.mog``): EM (the lecture's two-step procedure
with the exact posterior as q, the default), SVI with the assignment enumerated, REINFORCE with a
per-datapoint guide, or an amortized encoder; and choosing K by held-out log-likelihood.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.optim
import torch
from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO
from torch.nn import functional as F

from ppl_lvm.models.mog import (
    COVARIANCES, METHODS, AmortizedCategoricalGuide, CategoricalEncoder, LocalCategoricalGuide,
    MixtureOfGaussians, _tril, check_data, enumeration_guide, kmeans_init)
from ppl_lvm.train import fit


# ---- EM: the two-step procedure with q(z_i) = p(z_i | x_i) -----------------------------------------
def precision_cholesky(mixture):
    """Factors W of the precisions, Σ_k⁻¹ = W_k W_kᵀ (scikit-learn's ``precisions_cholesky_``):
    [K, D] 1 / σ_k for "diag", [K, D, D] W_k = L_k⁻ᵀ for "full", [D, D] for "tied"."""
    if mixture.covariance == "diag":
        return (-mixture.log_scale).exp()
    tril = _tril(mixture.raw_scale_tril)
    eye = torch.eye(mixture.data_dim, dtype=tril.dtype, device=tril.device).expand_as(tril)
    return torch.linalg.solve_triangular(tril, eye, upper=False).transpose(-1, -2)


def gaussian_log_prob(x, means, precision_chol, covariance):
    """log N(x_i | μ_k, Σ_k) [N, K] from the precisions' factors W (``precision_cholesky``), as
    scikit-learn evaluates it: ‖(x_i - μ_k) W_k‖² by matrix products, no [N, K, D] tensor.

    x: [N, D]; means: [K, D]. log det Σ_k^(-1/2) = Σ_d log W_k,dd.
    """
    num_data, data_dim = x.shape
    if covariance == "diag":
        precisions = precision_chol * precision_chol                       # [K, D]
        log_det = precision_chol.log().sum(-1)
        mahalanobis = ((means * means * precisions).sum(-1) - 2 * x @ (means * precisions).T
                       + (x * x) @ precisions.T)                            # [N, K]
    else:
        chols = precision_chol.expand(len(means), data_dim, data_dim)
        log_det = chols.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        mahalanobis = x.new_empty(num_data, len(means))
        for k, (mean, chol) in enumerate(zip(means, chols)):  # one [N, D] x [D, D] product per k
            y = x @ chol - mean @ chol
            mahalanobis[:, k] = (y * y).sum(-1)
    return -0.5 * (data_dim * math.log(2 * math.pi) + mahalanobis) + log_det


def e_step(mixture, x):
    """E-step: q(z_i) = p(z_i | x_i), the model's own enumeration of z (Bayes' rule, no guide).

    x: [N, D]. Returns ``(log_likelihood, log_resp)``: exact log p(x_i) [N] and the log
    responsibilities log p(z_i = k | x_i) [N, K]. At this q the ELBO equals log p(x): KL(q ‖ p(z | x)) = 0.
    The densities are ``joint_log_prob``'s, evaluated from the precisions' factors as matrix
    products (``gaussian_log_prob``).
    """
    joint = F.log_softmax(mixture.logits, -1) + gaussian_log_prob(
        x, mixture.loc, precision_cholesky(mixture), mixture.covariance)    # [N, K]
    log_likelihood = joint.logsumexp(-1)
    return log_likelihood, joint - log_likelihood.unsqueeze(-1)


def m_step(x, resp, covariance="diag", reg_covar=1e-6):
    """M-step: θ = argmax Σ_i E_q(z_i)[log p(x_i, z_i; θ)] in closed form for Gaussian components.

    x: [N, D]; resp: [N, K], q(z_i = k) (rows sum to 1). Returns a dict like ``kmeans_init``'s:
    ``weights`` π [K], ``means`` μ [K, D] and ``covariances`` ([K, D] variances for "diag", [K, D, D]
    "full", [D, D] "tied"), with ``reg_covar`` added to the diagonal. Same formulas as scikit-learn's
    ``_estimate_gaussian_parameters`` (N_k = Σ_i q(z_i = k) + 10 eps keeps empty components finite).
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    counts = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps                # N_k [K]
    means = resp.T @ x / counts.unsqueeze(-1)                                # [K, D]
    if covariance == "diag":
        covariances = resp.T @ (x * x) / counts.unsqueeze(-1) - means ** 2 + reg_covar
    else:
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        if covariance == "full":
            covariances = x.new_empty(len(means), x.shape[1], x.shape[1])
            for k, mean in enumerate(means):  # one [D, N] x [N, D] product per component
                diff = x - mean
                covariances[k] = (resp[:, k, None] * diff).T @ diff
            covariances = covariances / counts[:, None, None] + reg_covar * eye
        else:
            covariances = (x.T @ x - (counts.unsqueeze(-1) * means).T @ means) / counts.sum()
            covariances = covariances + reg_covar * eye
    return {"weights": counts / counts.sum(), "means": means, "covariances": covariances}


def em_step(mixture, x, reg_covar=1e-6):
    """One EM step in place: E-step at the current θ, then the M-step. x: [N, D].

    Returns the exact mean log p(x_i) at the θ the step started from (nats; never lower after it).
    """
    with torch.no_grad():
        log_likelihood, log_resp = e_step(mixture, x)
        params = m_step(x.to(log_resp.dtype), log_resp.exp(), mixture.covariance, reg_covar)
        covariances = params["covariances"]
        error = ValueError(f"the M-step gave a covariance that is not positive definite; increase "
                           f"reg_covar (now {reg_covar})")
        if not torch.isfinite(covariances).all() or (mixture.covariance == "diag" and (covariances <= 0).any()):
            raise error
        try:
            mixture.set_parameters(params["weights"], params["means"], covariances)
        except torch.linalg.LinAlgError as cause:
            raise error from cause
    return log_likelihood.mean().item()


def _fit_em(mixture, x, tol, max_iter, reg_covar):
    """EM to scikit-learn's rule: stop once the mean log p(x_i) changes by less than ``tol`` between
    iterations. Returns (mean log-likelihoods before each M-step, as sklearn's ``lower_bounds_``, converged)."""
    log_likelihoods, previous = [], -math.inf
    for _ in range(max_iter):
        log_likelihoods.append(em_step(mixture, x, reg_covar))
        if abs(log_likelihoods[-1] - previous) < tol:
            return log_likelihoods, True
        previous = log_likelihoods[-1]
    return log_likelihoods, False




@dataclasses.dataclass
class MixtureFit:
    """What ``fit_mixture`` returns.

    mixture: the fitted ``MixtureOfGaussians``; guide: the guide it was trained with (for "em" the
    empty ``enumeration_guide``: with ``TraceEnum_ELBO`` it is q = p(z | x), EM's E-step).
    losses: training loss per epoch (-ELBO per datapoint, nats; exact -log p(x) / N for "enum" and "em").
    log_likelihoods: exact mean log p(x_i) of the training data after each epoch (if tracked); for
    "em", per iteration at the θ its M-step starts from (scikit-learn's ``lower_bounds_``).
    epochs: epochs run (EM iterations for "em"); converged: whether the stopping rule stopped it
    before ``max_epochs`` (``max_iter`` for "em"). method: the ``fit_mixture`` method.
    """

    mixture: MixtureOfGaussians
    guide: object
    losses: list
    log_likelihoods: list
    epochs: int
    converged: bool
    wall_time: float
    init_labels: torch.Tensor | None = None
    method: str | None = None


def relative_tolerance(rtol: float, window: int) -> Callable[[int, Any], bool]:
    """A ``fit`` callback: stop when the mean loss of the last ``window`` epochs improves on the
    previous window's by at most ``rtol`` times its magnitude (windows average out SGD noise)."""

    def stop(epoch, result):
        losses = result.epoch_losses
        if len(losses) < 2 * window:
            return False
        last = sum(losses[-window:]) / window
        previous = sum(losses[-2 * window:-window]) / window
        return previous - last <= rtol * abs(last)

    return stop


def fit_mixture(x: torch.Tensor, num_components: int, method: str = "em",
                covariance: str = "diag", *, tol: float = 1e-3, max_iter: int = 100,
                reg_covar: float = 1e-6, dtype: torch.dtype | None = None, rtol: float = 1e-6,
                window: int | None = None, max_epochs: int = 3000, lr: float = 0.05,
                lr_decay: float | None = None, batch_size: int | None = None, seed: int = 0,
                device: str | torch.device = "cpu",
                init_params: dict[str, torch.Tensor] | None = None, estimator: str = "enum",
                hidden_dim: int = 64, guide_lr: float | None = None,
                track_log_likelihood: bool = False, progress: bool = False) -> MixtureFit:
    """Fit a K-component mixture of Gaussians to x [N, D] by EM or SVI, from a seeded k-means++ start.

    Args:
        method: "em" (the default: E-step q(z_i) = p(z_i | x_i) from the model's enumeration,
            closed-form M-step; ``e_step``, ``m_step``), "enum" (``TraceEnum_ELBO``, empty guide:
            gradient ascent on the same exact log p(x), 20-130x slower than "em" on average in
            benchmarks/bench_mog.py), "reinforce" (``LocalCategoricalGuide`` trained by
            score-function gradients with a per-datapoint baseline, ``TraceGraph_ELBO``) or
            "amortized" (``AmortizedCategoricalGuide``; ``estimator`` "enum" sums z over q(z | x)
            exactly, "reinforce" samples it).
        covariance: "diag", "full" or "tied".
        tol, max_iter: "em" only: stop once the mean log p(x_i) changes by less than ``tol`` between
            iterations (scikit-learn's rule and defaults), or after ``max_iter`` iterations.
        reg_covar: added to the covariances' diagonal by the k-means start and every M-step.
        dtype: "em" only: the dtype of the fitted mixture and of the computation (default float64,
            which agreement with scikit-learn's EM to 1e-5 needs).
        rtol, window: SVI only: stop when the mean loss over the last ``window`` epochs improves on the
            previous window's by less than ``rtol`` (relative); window defaults to 10 epochs for
            the exact losses ("enum", "amortized" with estimator "enum") and 50 for the noisy
            score-function ones.
        max_epochs, lr, lr_decay, batch_size, estimator, hidden_dim, guide_lr, track_log_likelihood,
            progress: SVI only ("em" ignores them).
        max_epochs: upper bound on epochs; lr: Adam's step (for the means, in units of the data's
            standard deviation); lr_decay: per-step multiplicative decay (default: lr shrinks
            100-fold over ``max_epochs`` steps).
        guide_lr: Adam's step for the per-datapoint logits φ_i of "reinforce" (default 3 lr).
        batch_size: rows per step (default N: full batch, the EM-grade setting).
        init_params: a ``kmeans_init`` dict to start from (default: computed with ``seed``); guides
            start at the initial model's posterior (the E-step of the k-means fit).
        track_log_likelihood: record the exact training log-likelihood per epoch ("em" always does).
        device: where the mixture and the computation live (x is moved there).

    Returns:
        MixtureFit.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    if method == "em" and not (tol >= 0 and int(max_iter) == max_iter >= 1 and reg_covar >= 0):
        raise ValueError(f"need tol >= 0, an integer max_iter >= 1 and reg_covar >= 0; got tol={tol}, "
                         f"max_iter={max_iter}, reg_covar={reg_covar}")
    device = torch.device(device)
    check_data(x)
    num_data, data_dim = x.shape
    if not 1 <= num_components <= num_data:
        raise ValueError(f"need 1 <= num_components <= N={num_data}, got num_components={num_components}")
    start = time.perf_counter()
    if method == "em":
        x = x.to(device, torch.float64 if dtype is None else dtype)
    else:
        x = x.to(device)
    pyro.set_rng_seed(seed)
    mixture = MixtureOfGaussians(num_components, data_dim, covariance, device=device)
    if method == "em":
        mixture = mixture.to(x.dtype)
    if init_params is None:
        init_params = kmeans_init(x, num_components, seed=seed, covariance=covariance, reg_covar=reg_covar)
    try:
        mixture.set_parameters(init_params["weights"], init_params["means"], init_params["covariances"])
    except torch.linalg.LinAlgError as cause:
        raise ValueError(f"the k-means start has a covariance that is not positive definite; increase "
                         f"reg_covar (now {reg_covar})") from cause
    if method == "em":
        log_likelihoods, converged = _fit_em(mixture, x, tol, int(max_iter), reg_covar)
        return MixtureFit(mixture=mixture, guide=enumeration_guide, losses=[-v for v in log_likelihoods],
                          log_likelihoods=log_likelihoods, epochs=len(log_likelihoods), converged=converged,
                          wall_time=time.perf_counter() - start, init_labels=init_params["labels"],
                          method="em")

    with torch.no_grad():
        init_log_resp = F.log_softmax(mixture.joint_log_prob(x), -1)
        init_elbo = mixture.log_prob(x)  # = ELBO_i when q is the exact posterior
    if method == "enum":
        guide, loss = enumeration_guide, TraceEnum_ELBO(max_plate_nesting=1)
    elif method == "reinforce":
        guide = LocalCategoricalGuide(num_data, num_components, init_log_resp, init_elbo, device=device)
        loss = TraceGraph_ELBO()
    else:
        encoder = CategoricalEncoder(data_dim, num_components, hidden_dim, x.mean(0), x.std(0) + 1e-6)
        guide = AmortizedCategoricalGuide(encoder, estimator).to(device)
        guide.baseline.data.fill_(init_elbo.mean().item())
        _pretrain_encoder(encoder, x, init_log_resp, seed)
        loss = TraceEnum_ELBO(max_plate_nesting=1) if estimator == "enum" else TraceGraph_ELBO()

    loss_is_exact = isinstance(loss, TraceEnum_ELBO)
    data_scale = x.std(0).mean().item()
    lr_decay = lr_decay if lr_decay is not None else 0.01 ** (1 / max(max_epochs, 1))

    def optim_args(module_name, param_name):
        # pyro.optim passes the module's name and the parameter's name within it
        step = lr
        if module_name == "mog" and param_name == "loc":
            step = lr * data_scale
        elif module_name == "local_guide" and param_name == "logits":
            # noisy per-datapoint gradients: a larger step lets q(z_i) keep up with the model
            step = 3 * lr if guide_lr is None else guide_lr
        elif param_name == "baseline":
            step = lr * max(1.0, init_elbo.abs().mean().item()) * 0.1
        return {"lr": step, "lrd": lr_decay, "clip_norm": 1e8}

    log_likelihoods = []
    stop = relative_tolerance(rtol, window or (10 if loss_is_exact else 50))

    def callback(epoch, result):
        if track_log_likelihood:
            with torch.no_grad():
                log_likelihoods.append(mixture.log_prob(x).mean().item())
        return stop(epoch, result)

    result = fit(mixture.model, guide, x, epochs=max_epochs, batch_size=batch_size or num_data,
                 optim=pyro.optim.ClippedAdam(optim_args), loss=loss, device=device, seed=seed,
                 progress=progress, callback=callback)
    epochs = len(result.epoch_losses)
    return MixtureFit(mixture=mixture, guide=guide, losses=result.epoch_losses,
                      log_likelihoods=log_likelihoods, epochs=epochs, converged=epochs < max_epochs,
                      wall_time=time.perf_counter() - start, init_labels=init_params["labels"],
                      method=method)


def _pretrain_encoder(encoder, x, log_resp, seed, steps=200, lr=1e-2):
    """Fit φ(x) to the initial model's responsibilities (cross-entropy), so q starts at the E-step."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    target = log_resp.exp()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -(target * F.log_softmax(encoder(x), -1)).sum(-1).mean()
        loss.backward()
        optimizer.step()


def select_components(x_train: torch.Tensor, x_test: torch.Tensor, ks: Sequence[int],
                      covariance: str = "diag", method: str = "em", seed: int = 0,
                      **fit_kwargs: Any) -> list[dict[str, float]]:
    """Model selection over K: one fit per K, its held-out log-likelihood per point and BIC.

    x_train [N, D], x_test [M, D]; ks: the K values to try. Returns a list of dicts with keys
    ``k``, ``train_ll`` and ``test_ll`` (mean log p(x_i), nats), ``bic`` (on x_train), ``epochs``.
    """
    check_data(x_train)
    check_data(x_test, x_train.shape[1], name="x_test")
    rows = []
    for k in ks:
        result = fit_mixture(x_train, k, method, covariance, seed=seed, **fit_kwargs)
        mixture = result.mixture
        with torch.no_grad():
            device = mixture.loc.device
            rows.append({"k": k, "train_ll": mixture.log_prob(x_train.to(device)).mean().item(),
                         "test_ll": mixture.log_prob(x_test.to(device)).mean().item(),
                         "bic": mixture.bic(x_train.to(device)), "epochs": result.epochs})
    return rows
