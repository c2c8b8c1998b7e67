"""One word per idea across the public API, and the rule for the old words.

``num_samples``: K importance samples (or AIS chains) for an estimate of log p(x).
``num_particles``: K samples inside a training loss (IWAE_ELBO, Pyro's ELBOs, refine).
``num_completions``: S completions drawn by ``complete`` (and the exact mixture conditional).
``num_steps``: optimiser steps. ``num_temperatures``: T, AIS's temperatures (one HMC transition
each). ``num_sweeps``: Metropolis-within-Gibbs sweeps of ``complete``. ``epochs``: passes over the
data. ``seed``: randomness.

A keyword renamed to this vocabulary keeps its old name as an alias: either may be given, not
both (``renamed``). This module imports nothing of the package.
"""


def renamed(name, value, old_name, old_value, default=None):
    """The value of a keyword known by its name and an old one: ``value`` if given (not None),
    else ``old_value`` if given, else ``default``. Both given is refused, in one line naming both
    (even when equal: the call says the same thing twice and one of them is a slip)."""
    if value is not None and old_value is not None:
        raise TypeError(f"got both {name}= and {old_name}= ({old_name} is the old name of "
                        f"{name}); give one")
    if value is not None:
        return value
    return default if old_value is None else old_value
