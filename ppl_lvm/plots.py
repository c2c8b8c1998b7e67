"""Pictures a person would rather look at than read: image grids and training curves."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ppl_lvm import atomic


def image_side(data_dim: int) -> int:
    """The side of a square image with ``data_dim`` pixels (784 -> 28, 64 -> 8)."""
    side = math.isqrt(data_dim)
    if side * side != data_dim:
        raise ValueError(f"cannot show {data_dim} values as a square image")
    return side


MISSING_COLOR = (0.85, 0.33, 0.10)  # every figure draws a missing pixel in this one colour
MISSING_NAME = "orange"


def image_grid(rows: Sequence[torch.Tensor] | torch.Tensor, path: str | Path | None = None,
               row_labels: Sequence[str] | None = None, title: str | None = None,
               cmap: str = "gray", missing: Sequence[torch.Tensor | None] | None = None
               ) -> Figure:
    """Draw a grid of square images and optionally save it as a PNG.

    Args:
        rows: a list of [M, D] tensors (one row of M images each) or one [R, M, D] tensor.
        path: where to write the PNG (None: only return the figure).
        row_labels: optional names written left of each row.
        missing: optional list, one entry per row: None, or an [M, D] bool mask (True =
            observed) whose missing pixels are drawn in ``MISSING_COLOR``.
    Returns:
        the matplotlib Figure.
    """
    rows = [torch.as_tensor(r).detach().float().cpu() for r in rows]
    num_rows, num_cols = len(rows), max(r.shape[0] for r in rows)
    side = image_side(rows[0].shape[-1])
    fig, axes = plt.subplots(num_rows, num_cols, figsize=(num_cols * 0.9, num_rows * 0.9 + 0.3),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j in range(num_cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < row.shape[0]:
                mask = None if missing is None or missing[i] is None else missing[i][j]
                ax.imshow(_pixels(row[j], side, cmap, mask), cmap=cmap, vmin=0, vmax=1)
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        atomic.save_figure(fig, path, dpi=100)
        plt.close(fig)
    return fig


def completion_grid(x: torch.Tensor, mask: torch.Tensor, completions: Sequence[torch.Tensor],
                    path: str | Path | None = None, labels: Sequence[str] | None = None,
                    title: str | None = None) -> Figure:
    """Every completion figure: the originals, the observed pixels with the missing ones in
    ``MISSING_COLOR`` (one colour in every figure), then one row per completion.

    Args:
        x: [M, D] originals; mask: [M, D] bool, True = observed.
        completions: rows of [M, D] values in [0, 1] (samples, posterior means, E[x | z_s]).
        labels: one name per completion row ("original" and "observed" come first).
        title: the figure's title; every completion figure names the missing colour after it.
    Returns:
        the matplotlib Figure (saved as a PNG at ``path`` when given).
    """
    completions = list(completions)
    names = ["original", "observed"] + list(labels or [f"completion {i + 1}"
                                                        for i in range(len(completions))])
    legend = f"missing pixels in {MISSING_NAME}"
    return image_grid([x, x, *completions], path, row_labels=names,
                      title=f"{title}; {legend}" if title else legend,
                      missing=[None, mask] + [None] * len(completions))


def _pixels(image, side, cmap, mask=None):
    """[side, side] values, or with a mask [side, side, 3] colours, missing ones MISSING_COLOR."""
    values = image.reshape(side, side).clamp(0, 1).numpy()
    if mask is None:
        return values
    colours = plt.get_cmap(cmap)(values)[..., :3]
    colours[~torch.as_tensor(mask).cpu().reshape(side, side).numpy()] = MISSING_COLOR
    return colours


def compare_curves(curves: dict[str, list[dict]], path: str | Path | None = None) -> Figure:
    """``compare``'s figure: per run, the held-out ELBO by epoch and the training ELBO (minus the
    minibatch loss) by epoch in separate panels (different data and estimators: not comparable),
    and the held-out ELBO by training time.

    curves: {run name: [metrics.jsonl entries]}.
    """
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [(axes[0], "epoch", "heldout_elbo", "held-out ELBO (10 samples per row)"),
              (axes[1], "epoch", "loss", "training ELBO (mean over the epoch's minibatches)"),
              (axes[2], "wall_time_s", "heldout_elbo", "held-out ELBO by training time")]
    for axis, x_key, y_key, title in panels:
        for number, (run, entries) in enumerate(curves.items()):
            points = [(e[x_key], -e[y_key] if y_key == "loss" else e[y_key]) for e in entries
                      if y_key in e]
            if not points:  # a per-datapoint guide has no φ for held-out rows while it trains
                axis.plot([], [], color=f"C{number}", label=f"{run}: none (per-datapoint guide)")
                continue
            axis.plot(*zip(*points), "-", marker=".", color=f"C{number}", label=run)
        axis.set(title=title, xlabel="epoch" if x_key == "epoch" else "training time (s)",
                 ylabel="ELBO (nats per row)")
        axis.title.set_fontsize(9)
        if x_key == "epoch":
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        atomic.save_figure(fig, path, dpi=100)
        plt.close(fig)
    return fig


def training_curve(result, path: str | Path | None = None, title: str = "training") -> Figure:
    """Plot the loss per datapoint by epoch and the held-out -ELBO (nats) from a FitResult."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = range(1, len(result.epoch_losses) + 1)
    ax.plot(epochs, result.epoch_losses, label="train -ELBO (minibatch mean)")
    if result.eval_epochs:
        ax.plot(result.eval_epochs, [-e for e in result.eval_elbos], "o-", label="held-out -ELBO")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("nats per datapoint")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        atomic.save_figure(fig, path, dpi=100)
        plt.close(fig)
    return fig
