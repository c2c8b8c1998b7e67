"""ppl_lvm: latent-variable models as Pyro programs, trained by SVI and measured by importance weighting."""
from ppl_lvm.estimators import (LogMarginalEstimate, estimate_log_marginal, joint_log_marginal,
                                log_marginal, log_weights)
from ppl_lvm.objectives import IWAE_ELBO
from ppl_lvm.data import binarize, load_digits, load_mnist, split_rows, train_test_split
from ppl_lvm.guides import AmortizedGuide, LocalGuide, SemiAmortizedGuide
from ppl_lvm.recipes import Gaps, amortization_gaps, infer_local
from ppl_lvm.models.missing import MaskedVAE, complete
from ppl_lvm.mixtures import fit_mixture, select_components
from ppl_lvm.models.mog import MixtureOfGaussians
from ppl_lvm.models.vae import VAE
from ppl_lvm.plate import data_plate
from ppl_lvm.train import DivergenceError, FitResult, fit

__all__ = ["AmortizedGuide", "LocalGuide", "SemiAmortizedGuide", "amortization_gaps", "infer_local",
           "VAE", "DivergenceError", "FitResult", "IWAE_ELBO", "LogMarginalEstimate", "binarize",
           "data_plate", "estimate_log_marginal", "fit", "load_digits", "load_mnist",
           "log_marginal", "log_weights", "joint_log_marginal", "split_rows", "train_test_split", "MixtureOfGaussians", "fit_mixture",
           "select_components"]
__all__ += ["MaskedVAE", "complete"]
from ppl_lvm.ais import ais_log_marginal, bdmc  # noqa: E402
from ppl_lvm.psis import pareto_khat  # noqa: E402
__all__ += ["ais_log_marginal", "bdmc", "pareto_khat"]
# old import paths: these lived in ppl_lvm.guides before ppl_lvm.recipes took what trains a guide;
# guides cannot import recipes (recipes stands on guides), so the package, which imports both,
# sets them on the old module here: a downward re-export, no module __getattr__
from ppl_lvm import guides as _guides, recipes as _recipes  # noqa: E402

for _name in ("infer_local", "amortization_gaps", "Gaps"):
    setattr(_guides, _name, getattr(_recipes, _name))
try:  # the one version, pyproject.toml's, as installed
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("ppl-lvm")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
