"""Pictures a person would rather look at than read: image grids and training curves."""
import math

import matplotlib.pyplot as plt
import torch

from ppl_lvm import atomic


def image_side(data_dim):
    """The side of a square image with ``data_dim`` pixels (784 -> 28, 64 -> 8)."""
    side = math.isqrt(data_dim)
    if side * side != data_dim:
        raise ValueError(f"cannot show {data_dim} values as a square image")
    return side


def image_grid(rows, path=None, row_labels=None, title=None, cmap="gray"):
    """Draw a grid of square images and optionally save it as a PNG.

    Args:
        rows: a list of [M, D] tensors (one row of M images each) or one [R, M, D] tensor.
        path: where to write the PNG (None: only return the figure).
        row_labels: optional names written left of each row.
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
                ax.imshow(row[j].reshape(side, side).numpy(), cmap=cmap, vmin=0, vmax=1)
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        atomic.save_figure(fig, path, dpi=100)
        plt.close(fig)
    return fig


def training_curve(result, path=None, title="training"):
    """Plot the loss per datapoint by epoch and the held-out -ELBO (nats) from a FitResult."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = range(1, len(result.epoch_losses) + 1)
    ax.plot(epochs, result.epoch_losses, label="train -ELBO (minibatch mean)")
    if result.eval_epochs:
        ax.plot(result.eval_epochs, [-e for e in result.eval_elbos], "o-", label="held-out -ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per datapoint")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        atomic.save_figure(fig, path, dpi=100)
        plt.close(fig)
    return fig
