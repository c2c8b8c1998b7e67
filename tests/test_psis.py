"""pareto_khat follows arviz's rule (``arviz.stats.stats._psislw`` / ``_gpdfit``, r_eff = 1): the
tail is the weights strictly above the (M + 1)-th largest, and 4 or fewer of them give k̂ = inf.
The expected values below are arviz's own on these inputs (its code run in float64)."""
import math

import pytest
import torch

from ppl_lvm.psis import pareto_khat

TIED = {  # log weights with ties, as a discrete latent under "prior" / "uniform" gives
    # K = 200, M = 40: the cutoff (41st largest) is -2.5, the tail the 20 weights at -1
    "twenty_tied_above_the_cutoff": ([-1.0] * 20 + [-2.5] * 40 + [-4.0] * 60 + [-7.0] * 80,
                                     -3.8334417984651634),
    # only 3 weights above the cutoff: no fit (this package said 0.155 before)
    "three_above_the_cutoff": ([-1.0] * 3 + [-2.5] * 40 + [-4.0] * 157, math.inf),
    # every weight equal (an exact posterior proposal): no tail at all (this package said -inf)
    "constant": ([0.0] * 100, math.inf),
}


@pytest.mark.parametrize("case", sorted(TIED))
def test_khat_of_tied_weights_is_arviz(case):
    values, arviz = TIED[case]
    log_weights = torch.tensor(values, dtype=torch.float64)
    khat = pareto_khat(log_weights[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))])
    if math.isinf(arviz):
        assert khat.item() == arviz
    else:
        assert khat.item() == pytest.approx(arviz, abs=1e-12)


def test_khat_of_a_tied_body_and_a_continuous_tail_is_arviz():
    body = [-3.0] * 150
    tail = torch.linspace(-2.9, 2.0, 50, dtype=torch.float64)
    cases = [(torch.tensor(body + tail.tolist(), dtype=torch.float64), 0.44565518194780507),
             (torch.tensor(body + (tail ** 3).tolist(), dtype=torch.float64), 1.5792152213866923)]
    # several datapoints at once, each with its own tail length, as one [K, N] call
    log_weights = torch.stack([c for c, _ in cases] + [torch.tensor(TIED["three_above_the_cutoff"][0], dtype=torch.float64)], 1)
    khat = pareto_khat(log_weights)
    assert khat[:2].tolist() == pytest.approx([a for _, a in cases], abs=1e-12)
    assert khat[2].item() == math.inf
    # float32 log weights agree to float32 rounding
    assert pareto_khat(log_weights.float())[:2].tolist() == pytest.approx([a for _, a in cases], abs=1e-6)
