"""The data plate: the one convention every ppl_lvm model and guide follows.

A model or guide takes the rows ``x`` [B, D] it sees plus two optional keywords that ``fit`` passes
when it trains on minibatches: ``idx`` [B] (the rows' indices in the full data set, so a
per-datapoint guide can read its own φ_i) and ``num_data`` (N, the full data set's size, so the
ELBO of a minibatch is scaled by N / B). All local sites live inside ``pyro.plate("data")``.
"""
from __future__ import annotations

import pyro
import torch


def data_plate(x: torch.Tensor, idx: torch.Tensor | None = None, num_data: int | None = None,
               name: str = "data", dim: int | None = None) -> pyro.plate:
    """The plate over datapoints, subsampled and scaled when ``fit`` trains on minibatches.

    Args:
        x: [B, ...] the rows of this call; B is the plate's batch size.
        idx: optional [B] long, the rows' indices in the full data set.
        num_data: optional int N, the full data set's size (defaults to B: no scaling).
        name: the plate's name; dim: its batch dim (default: Pyro's next free one, -1 at the top).

    Returns:
        ``pyro.plate(name, N, subsample=idx)`` (dim -1): log-probs inside it are scaled by N / B.
    """
    batch_size = x.shape[0]
    size = batch_size if num_data is None else int(num_data)
    if idx is None:
        if size != batch_size:
            # a subsample of unknown rows: indices only serve the scaling N / B
            idx = torch.arange(batch_size, device=x.device)
        return pyro.plate(name, size, subsample=idx, device=x.device, dim=dim)
    if idx.shape != (batch_size,):
        raise ValueError(f"idx must have shape [{batch_size}] to match x, got {tuple(idx.shape)}")
    return pyro.plate(name, size, subsample=idx.to(x.device), device=x.device, dim=dim)
