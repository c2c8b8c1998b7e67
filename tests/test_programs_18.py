"""Issue 18's failure classes 4-8 that lie outside the density kernel, each on a real program
(tests/programs/ or Pyro's examples) with its right answer stated: per-row parameter tables in a
guide (4), authors who subsample their own plate (5), train mode during evaluation (6), crashes
turned into answers or one clear line (7), completion's health check (8)."""
import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from ppl_lvm import estimate_log_marginal, program
from ppl_lvm import cli
from tests.programs.prodlda import ProdLDA


@pytest.fixture(autouse=True)
def fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# ---------------------------------------------------------------------------------------------
# class 6: train mode during evaluation (Pyro's ProdLDA tutorial: BatchNorm1d and Dropout)


def _prodlda():
    """ProdLDA as the tutorial writes it, after a few SVI steps in train mode (BatchNorm's running
    statistics have moved), with 30 documents of 20 words over 12 words."""
    torch.manual_seed(0)
    docs = torch.distributions.Multinomial(20, torch.softmax(torch.randn(12), 0)).sample((30,))
    lda = ProdLDA(vocab_size=12, num_topics=3, hidden=16, dropout=0.2)
    svi = SVI(lda.model, lda.guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(5):
        svi.step(docs)
    return lda, docs


def _modes(module):
    return [m.training for m in module.modules()]


def _running_stats(module):
    return [b.clone() for name, b in module.named_buffers() if "running" in name]


def test_estimators_score_batchnorm_and_dropout_in_eval_mode_and_restore_the_mode():  # class 6
    """The right answer is the estimate with the network put in eval mode by hand (running
    statistics, no dropout). Before: train mode, -21.54 against -21.34 (and BatchNorm's running
    statistics moved by the evaluation). The mode each module had is restored, mixed modes too."""
    lda, docs = _prodlda()
    lda.encoder.bnmu.eval()  # a module the user left in eval mode stays there
    modes, stats = _modes(lda), _running_stats(lda)
    estimate = estimate_log_marginal(lda.model, lda.guide, docs, num_samples=20, seed=0)
    assert _modes(lda) == modes and lda.training and not lda.encoder.bnmu.training
    assert all(torch.equal(a, b) for a, b in zip(stats, _running_stats(lda)))
    lda.eval()
    expected = estimate_log_marginal(lda.model, lda.guide, docs, num_samples=20, seed=0)
    assert torch.allclose(estimate.log_px, expected.log_px, atol=1e-5)


def test_evaluation_mode_restores_modes_after_an_exception_and_sees_modules_however_held():
    """A module reached through a closure (not an argument, not an attribute of the program) is
    in eval mode while the program runs; an exception inside leaves every mode as it was."""
    lda, docs = _prodlda()
    seen = []

    def model(x):
        lda.decoder(torch.softmax(torch.zeros(len(x), 3), -1))
        seen.append(_modes(lda.decoder))
        raise RuntimeError("the author's own error")

    with pytest.raises(RuntimeError, match="author's own"):
        with program.evaluation_mode():
            model(docs)
    assert seen == [[False] * len(seen[0])] and all(_modes(lda))
    assert hasattr(cli.evaluate, "__wrapped__")  # ppl-lvm evaluate runs under evaluation_mode
