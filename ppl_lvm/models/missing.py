"""Missing pixels as latent variables: masks and the models that learn from partly observed data.

The lecture's example: when some pixels x_miss are unobserved, they are latent variables like z, the
likelihood of a datapoint is p(x_obs) = Σ/∫ p(x_obs, x_miss) over the completions. A mask [N, D] is
True where a pixel is observed. Training counts observed pixels only (the Bernoulli / Gaussian factors
of missing pixels are masked out of log p(x | z)); the amortized encoder sees the zero-filled image
and the mask (MIWAE, Mattei & Frellsen 2019). Completion (draws of x_miss from p(x_miss | x_obs)),
the imputation baselines and their scores are in ``ppl_lvm.completion``.
"""
from __future__ import annotations

import math
from typing import Any

import pyro
import pyro.distributions as dist
import torch

from ppl_lvm.models.vae import VAE, Encoder
from ppl_lvm.plate import data_plate

MASKS = ("top_half", "bottom_half", "left_half", "right_half", "mcar", "blocks")


# ----------------------------------------------------------------------------------------------
# masks: [N, D] bool, True = observed. Each name says which part is MISSING.


def image_shape_of(data_dim, image_shape=None):
    """(H, W) of a flattened image of ``data_dim`` pixels: given, or the square one (784 -> 28 × 28)."""
    if image_shape is None:
        side = math.isqrt(int(data_dim))
        if side * side != data_dim:
            raise ValueError(f"data_dim={data_dim} is not a square image; pass image_shape=(H, W)")
        return side, side
    height, width = (int(s) for s in image_shape)
    if height * width != data_dim:
        raise ValueError(f"image_shape {tuple(image_shape)} has {height * width} pixels, "
                         f"not data_dim={data_dim}")
    return height, width


def _region_mask(num_rows, data_dim, image_shape, device, missing):
    height, width = image_shape_of(data_dim, image_shape)
    rows = torch.arange(height, device=device)[:, None].expand(height, width)
    cols = torch.arange(width, device=device)[None, :].expand(height, width)
    observed = ~missing(rows, cols, height, width)
    return observed.reshape(1, -1).expand(num_rows, -1).clone()


def top_half(num_rows, data_dim=784, image_shape=None, device=None):
    """The top half of every image missing (the lecture's example): [N, D] bool, True = observed."""
    return _region_mask(num_rows, data_dim, image_shape, device, lambda r, c, h, w: r < h // 2)


def bottom_half(num_rows, data_dim=784, image_shape=None, device=None):
    """The bottom half missing: [N, D] bool, True = observed."""
    return _region_mask(num_rows, data_dim, image_shape, device, lambda r, c, h, w: r >= h // 2)


def left_half(num_rows, data_dim=784, image_shape=None, device=None):
    """The left half missing: [N, D] bool, True = observed."""
    return _region_mask(num_rows, data_dim, image_shape, device, lambda r, c, h, w: c < w // 2)


def right_half(num_rows, data_dim=784, image_shape=None, device=None):
    """The right half missing: [N, D] bool, True = observed."""
    return _region_mask(num_rows, data_dim, image_shape, device, lambda r, c, h, w: c >= w // 2)


def mcar(num_rows, data_dim=784, rate=0.5, seed=0, device=None):
    """Pixels missing completely at random: exactly round(rate · D) missing pixels per row.

    Each row's missing set is uniform over the sets of that size, drawn from ``seed``. A rate that
    would leave a row with no observed pixel is an error. Returns [N, D] bool, True = observed.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1) (a row needs an observed pixel), got {rate}")
    num_missing = int(round(rate * data_dim))
    if num_missing >= data_dim:
        raise ValueError(f"rate={rate} leaves no observed pixel in a row of D={data_dim}")
    generator = torch.Generator().manual_seed(int(seed))
    ranks = torch.rand(num_rows, data_dim, generator=generator).argsort(-1).argsort(-1)
    return (ranks >= num_missing).to(device)


def random_blocks(num_rows, data_dim=784, block_size=14, num_blocks=1, image_shape=None, seed=0,
                  device=None):
    """``num_blocks`` square blocks of side ``block_size`` missing per image, at uniform positions.

    Returns [N, D] bool, True = observed.
    """
    height, width = image_shape_of(data_dim, image_shape)
    if not (1 <= block_size <= min(height, width)) or num_blocks < 1:
        raise ValueError(f"need 1 <= block_size <= {min(height, width)} and num_blocks >= 1, got "
                         f"{block_size} and {num_blocks}")
    if block_size == height and block_size == width:
        raise ValueError(f"a block of side {block_size} hides the whole {height}×{width} image")
    generator = torch.Generator().manual_seed(int(seed))
    tops = torch.randint(height - block_size + 1, (num_rows, num_blocks, 1, 1), generator=generator)
    lefts = torch.randint(width - block_size + 1, (num_rows, num_blocks, 1, 1), generator=generator)
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    inside = ((rows >= tops) & (rows < tops + block_size) & (cols >= lefts)
              & (cols < lefts + block_size))  # [N, blocks, H, W]
    return (~inside.any(1)).reshape(num_rows, -1).to(device)


def make_mask(name, num_rows, data_dim=784, *, rate=0.5, block_size=14, num_blocks=1,
              image_shape=None, seed=0, device=None):
    """A mask by name (one of ``MASKS``): [N, D] bool, True = observed (the CLI's ``--mask``)."""
    if name in ("top_half", "bottom_half", "left_half", "right_half"):
        return globals()[name](num_rows, data_dim, image_shape=image_shape, device=device)
    if name == "mcar":
        return mcar(num_rows, data_dim, rate=rate, seed=seed, device=device)
    if name == "blocks":
        return random_blocks(num_rows, data_dim, block_size, num_blocks, image_shape, seed, device)
    raise ValueError(f"unknown mask {name!r}; choose one of {MASKS}")


def check_missing(x, mask):
    """Validate a batch with missing values; raise a clear ValueError on anything wrong.

    x: [N, D] float (NaN allowed where mask is False); mask: [N, D] bool, True = observed. Every row
    must have an observed pixel and the observed pixels must be finite.
    """
    if not torch.is_tensor(x) or not torch.is_tensor(mask):
        raise ValueError(f"x and mask must be tensors, got {type(x).__name__} and "
                         f"{type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = observed), got dtype {mask.dtype}; "
                         "use mask.bool() if 1 means observed")
    if mask.shape != x.shape or x.dim() != 2:
        raise ValueError(f"mask must have the shape of x, [N, D]; got x {tuple(x.shape)} and mask "
                         f"{tuple(mask.shape)}")
    empty = ~mask.any(-1)
    if empty.any():
        rows = empty.nonzero()[:5, 0].tolist()
        raise ValueError(f"{int(empty.sum())} rows have no observed pixel (first: {rows}); "
                         "p(x_obs) of an empty observation is 1 and carries nothing to learn: drop them")
    bad = mask & ~torch.isfinite(x)
    if bad.any():
        rows = bad.any(-1).nonzero()[:5, 0].tolist()
        raise ValueError(f"x has NaN or inf in observed pixels (first bad rows: {rows}); set "
                         "mask=False where a value is missing")


def fill_missing(x, mask, value=0.0):
    """x with missing entries (mask False) replaced by ``value``: NaN there never reaches a loss.

    ``torch.where`` rather than ``x * mask``: 0 · NaN is NaN.
    """
    return torch.where(mask, x, torch.as_tensor(value, dtype=x.dtype, device=x.device))


# ----------------------------------------------------------------------------------------------
# the VAE with missing pixels


class MaskedVAE(VAE):
    """A VAE whose datapoints are partly observed: ``model(x, mask)`` and ``guide(x, mask)``.

    p_θ(x_obs, z) = p(z) Π_{d observed} p_θ(x_d | z): missing pixels are latent and integrated out,
    which for a factorised decoder means their factors are simply left out (masked). The guide
    q_φ(z | x_obs) is the encoder fed cat([x filled with 0, mask]) (input_dim = 2D, as in MIWAE);
    with ``encoder_sees_mask=False`` it is a plain VAE's encoder fed the zero-filled image, so a
    VAE trained on complete data (same parameter names) can complete images too.

    Args: as ``VAE``, plus ``encoder_sees_mask``.
    Sites: "z" [B, Z] and "x" [B, D] (event dim 1, masked per pixel), in plate "data".
    """

    def __init__(self, data_dim: int, z_dim: int = 20, hidden_dim: int | tuple[int, ...] = 400,
                 likelihood: str = "bernoulli", encoder_sees_mask: bool = True) -> None:
        super().__init__(data_dim, z_dim, hidden_dim, likelihood)
        self.encoder_sees_mask = encoder_sees_mask
        if encoder_sees_mask:
            self.encoder = Encoder(data_dim, z_dim, hidden_dim, input_dim=2 * data_dim)

    def config(self) -> dict[str, Any]:
        return dict(super().config(), encoder_sees_mask=self.encoder_sees_mask)

    def encoder_input(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, D] or [B, 2D]: the zero-filled image (and the mask as a second channel)."""
        x = fill_missing(x, mask)
        return torch.cat([x, mask.to(x.dtype)], -1) if self.encoder_sees_mask else x

    def model(self, x: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor | None = None,
              num_data: int | None = None) -> None:
        """p_θ(x_obs, z).  x: [B, D] (anything, even NaN, where mask is False); mask: [B, D] bool."""
        check_missing(x, mask)
        pyro.module("decoder", self.decoder)
        x = fill_missing(x, mask)
        with data_plate(x, idx, num_data):
            z_loc = x.new_zeros(x.shape[0], self.z_dim)
            z = pyro.sample("z", dist.Normal(z_loc, 1.0).to_event(1))
            # .mask before .to_event: a per-pixel mask, and log p(x | z) stays one number per row
            pyro.sample("x", self.decoder(z).mask(mask).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor | None = None,
              num_data: int | None = None) -> None:
        """q_φ(z | x_obs) = N(μ_φ(x̃, m), diag σ²_φ(x̃, m)), x̃ the zero-filled image, m the mask."""
        check_missing(x, mask)
        pyro.module("encoder", self.encoder)
        with data_plate(x, idx, num_data):
            loc, scale = self.encoder(self.encoder_input(x, mask))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """E[x | z = μ_φ(x_obs)]: x [B, D] -> [B, D] (mask defaults to all observed)."""
        mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
        loc, _ = self.encoder(self.encoder_input(x, mask))
        return self.decoder(loc).mean


# ----------------------------------------------------------------------------------------------
# the mixture of Gaussians with missing pixels


def masked_mixture_model(mixture):
    """The model p(x_obs, z) of a diagonal ``MixtureOfGaussians``, for learning with missing pixels.

    Returns ``model(x, mask, idx=None, num_data=None)``: z ~ Cat(π), x_d | z ~ N(μ_{z,d}, σ²_{z,d}) for
    the observed d only. z is marked for enumeration: ``fit(model, guide, (x, mask),
    loss=TraceEnum_ELBO())`` with an empty guide ascends the exact log p(x_obs), and
    ``log_marginal(model, None, x, method="exact", mask=mask)`` computes it. Diagonal covariances
    only: with full ones the observed marginal is not a per-pixel mask of the joint.
    """
    if mixture.covariance != "diag":
        raise ValueError(f"masked_mixture_model needs covariance='diag', got "
                         f"{mixture.covariance!r}; use mixture_completion for full covariances")

    def model(x, mask, idx=None, num_data=None):
        check_missing(x, mask)
        pyro.module("mog", mixture)
        x = fill_missing(x, mask)
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Categorical(logits=mixture.logits),
                            infer={"enumerate": "parallel"})
            component = dist.Normal(mixture.loc[z], mixture.log_scale.exp()[z])
            pyro.sample("x", component.mask(mask).to_event(1), obs=x)

    return model
