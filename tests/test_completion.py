"""ppl_lvm.completion: draws of x_miss from p(x_miss | x_obs), imputation baselines and scores.
Their behaviour is tested in tests/models/test_missing.py, where they lived; here the paths kept."""
import ppl_lvm
from ppl_lvm import completion
from ppl_lvm.models import missing


def test_old_import_paths_are_the_completion_module():
    # the names moved out of ppl_lvm.models.missing: every path a user wrote gives the same object
    from ppl_lvm.models.missing import (complete, imputation_scores, knn_imputation,
                                        log_marginal_observed, mean_imputation,
                                        mixture_completion, mixture_conditional)

    assert complete is completion.complete is ppl_lvm.complete is missing.complete
    for new, old in [(completion.imputation_scores, imputation_scores),
                     (completion.knn_imputation, knn_imputation),
                     (completion.log_marginal_observed, log_marginal_observed),
                     (completion.mean_imputation, mean_imputation),
                     (completion.mixture_completion, mixture_completion),
                     (completion.mixture_conditional, mixture_conditional)]:
        assert new is old
    assert missing.COMPLETION_METHODS == completion.COMPLETION_METHODS == ("auto", "sir", "mwg")
