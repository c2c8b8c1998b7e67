"""ppl_lvm: latent-variable models as Pyro programs, trained by SVI and measured by importance weighting."""
from ppl_lvm.ais import ais_log_marginal, bdmc
from ppl_lvm.completion import complete
from ppl_lvm.data import binarize, load_digits, load_mnist, split_rows, train_test_split
from ppl_lvm.estimators import (LogMarginalEstimate, estimate_log_marginal, joint_log_marginal,
                                log_marginal, log_weights)
from ppl_lvm.guides import AmortizedGuide, LocalGuide, SemiAmortizedGuide
from ppl_lvm.mixtures import fit_mixture, select_components
from ppl_lvm.models.missing import MaskedVAE
from ppl_lvm.models.mog import MixtureOfGaussians
from ppl_lvm.models.vae import VAE
from ppl_lvm.objectives import IWAE_ELBO
from ppl_lvm.plate import data_plate
from ppl_lvm.psis import pareto_khat
from ppl_lvm.recipes import amortization_gaps, infer_local
from ppl_lvm.train import (Checkpointing, DivergenceError, Evaluation, FitResult, Schedule,
                           fit)

__all__ = [
    # models and guides
    "VAE", "MaskedVAE", "MixtureOfGaussians", "AmortizedGuide", "LocalGuide",
    "SemiAmortizedGuide", "data_plate",
    # training (fit's grouped options: Schedule, Checkpointing, Evaluation) and recipes
    "fit", "FitResult", "DivergenceError", "Schedule", "Checkpointing", "Evaluation",
    "IWAE_ELBO", "infer_local", "amortization_gaps", "fit_mixture", "select_components",
    # estimates
    "log_marginal", "estimate_log_marginal", "log_weights", "joint_log_marginal",
    "LogMarginalEstimate", "ais_log_marginal", "bdmc", "pareto_khat", "complete",
    # data
    "load_digits", "load_mnist", "binarize", "split_rows", "train_test_split",
]

# old import paths: what trains a guide lived in ppl_lvm.guides before ppl_lvm.recipes, completion
# in ppl_lvm.models.missing before ppl_lvm.completion, EM in ppl_lvm.models.mog before
# ppl_lvm.mixtures; the old modules cannot import the new ones
# (which stand on them), so the package, which imports both, sets the names on the old module
# here: a downward re-export, no module __getattr__
from ppl_lvm import completion as _completion, guides as _guides, mixtures as _mixtures  # noqa: E402
from ppl_lvm import recipes as _recipes  # noqa: E402
from ppl_lvm.models import missing as _missing, mog as _mog  # noqa: E402

_MOVED = {_guides: (_recipes, ("infer_local", "amortization_gaps", "Gaps")),
          _missing: (_completion, ("COMPLETION_METHODS", "KHAT_TRUSTED", "KHAT_GOOD",
                                   "ACCEPTANCE_TRUSTED", "ROWS_PER_CALL", "log_marginal_observed",
                                   "Completion", "MaskObserved", "complete", "MixtureConditional",
                                   "mixture_conditional", "mixture_completion",
                                   "imputation_scores", "mean_imputation", "knn_imputation")),
          _mog: (_mixtures, ("precision_cholesky", "gaussian_log_prob", "e_step", "m_step",
                             "em_step"))}
for _old, (_new, _names) in _MOVED.items():
    for _name in _names:
        setattr(_old, _name, getattr(_new, _name))
try:  # the one version, pyproject.toml's, as installed
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("ppl-lvm")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
