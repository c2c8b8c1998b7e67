"""ppl_lvm: latent-variable models as Pyro programs, trained by SVI and measured by importance weighting."""
from ppl_lvm.plate import data_plate

__all__ = ["data_plate"]
__version__ = "0.1.0"
