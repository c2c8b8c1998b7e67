"""ppl_lvm: latent-variable models as Pyro programs, trained by SVI and measured by importance weighting."""
from ppl_lvm.models.vae import VAE
from ppl_lvm.plate import data_plate
from ppl_lvm.train import DivergenceError, FitResult, fit

__all__ = ["VAE", "DivergenceError", "FitResult", "data_plate", "fit"]
__version__ = "0.1.0"
