"""ppl_lvm: latent-variable models as Pyro programs, trained by SVI and measured by importance weighting."""
from ppl_lvm.estimators import IWAE_ELBO, LogMarginalEstimate, estimate_log_marginal, log_marginal
from ppl_lvm.data import binarize, load_digits, load_mnist, train_test_split
from ppl_lvm.models.vae import VAE
from ppl_lvm.plate import data_plate
from ppl_lvm.train import DivergenceError, FitResult, fit

__all__ = ["VAE", "DivergenceError", "FitResult", "IWAE_ELBO", "LogMarginalEstimate", "binarize",
           "data_plate", "estimate_log_marginal", "fit", "load_digits", "load_mnist",
           "log_marginal", "train_test_split"]
__version__ = "0.1.0"
