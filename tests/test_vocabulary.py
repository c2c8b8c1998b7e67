"""One vocabulary (ppl_lvm.vocabulary): the new keyword names give the same answer as the old ones
they replace, and a call with both is refused in one line naming both."""
import warnings

import pytest
import torch

from ppl_lvm.ais import ais_log_marginal, bdmc
from ppl_lvm.completion import complete, mixture_completion, mixture_conditional
from ppl_lvm.estimators import estimate_log_marginal
from ppl_lvm.models.missing import top_half
from ppl_lvm.models.mog import MixtureOfGaussians
from ppl_lvm.models.ppca import PPCA
from ppl_lvm.recipes import infer_local
from ppl_lvm.vocabulary import renamed


def test_renamed_takes_either_name_and_refuses_both():
    assert renamed("num_sweeps", 5, "num_steps", None, 200) == 5
    assert renamed("num_sweeps", None, "num_steps", 7, 200) == 7
    assert renamed("num_sweeps", None, "num_steps", None, 200) == 200
    assert renamed("num_sweeps", 0, "num_steps", None, 200) == 0  # 0 is given, not missing
    with pytest.raises(TypeError, match=r"^got both num_sweeps= and num_steps= .*give one$"):
        renamed("num_sweeps", 5, "num_steps", 5, 200)


def ppca():
    generator = torch.Generator().manual_seed(0)
    model = PPCA(torch.randn(4, 2, generator=generator), torch.zeros(4), 0.5)
    x = torch.randn(3, 4, generator=generator)
    return model, x


def test_ais_temperatures_by_either_name():
    model, x = ppca()
    old = ais_log_marginal(model.model, None, x, num_steps=4, num_samples=2, seed=0)
    new = ais_log_marginal(model.model, None, x, num_temperatures=4, num_samples=2, seed=0)
    assert new.num_steps == old.num_steps == 4
    torch.testing.assert_close(new.log_px, old.log_px, rtol=0, atol=0)
    front = estimate_log_marginal(model.model, None, x, method="ais", num_temperatures=4,
                                  num_samples=2, seed=0)
    torch.testing.assert_close(front.log_px, old.log_px, rtol=0, atol=0)
    for call in (lambda: ais_log_marginal(model.model, None, x, num_steps=4, num_temperatures=4),
                 lambda: bdmc(model.model, num_data=2, data_shape=(4,), num_steps=4,
                              num_temperatures=4),
                 lambda: estimate_log_marginal(model.model, None, x, method="ais", num_steps=4,
                                               num_temperatures=4)):
        with pytest.raises(TypeError, match="num_temperatures= and num_steps="):
            call()


def test_completions_and_sweeps_by_either_name():
    model, x = ppca()
    mask = top_half(3, 4, image_shape=(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a poor proposal's health check
        old = complete(model.model, model.guide, x, mask, 3, method="mwg", num_steps=4, seed=0)
        new = complete(model.model, model.guide, x, mask, num_completions=3, method="mwg",
                       num_sweeps=4, seed=0)
    assert new.samples.shape == (3, 3, 4)
    torch.testing.assert_close(new.samples, old.samples, rtol=0, atol=0)
    with pytest.raises(TypeError, match="num_completions= and num_samples="):
        complete(model.model, model.guide, x, mask, 3, num_completions=3)
    with pytest.raises(TypeError, match="num_sweeps= and num_steps="):
        complete(model.model, model.guide, x, mask, num_steps=4, num_sweeps=4)


def test_infer_local_steps_by_either_name_not_both():
    model, x = ppca()
    with pytest.raises(TypeError, match="num_steps= and steps="):
        infer_local(model.model, x, steps=5, num_steps=5)


def test_the_exact_mixture_conditionals_completions_by_either_name():
    mixture = MixtureOfGaussians(2, 3)
    x, mask = torch.randn(4, 3), torch.tensor([[True, False, True]] * 4)
    old = mixture_completion(mixture, x, mask, 5, torch.Generator().manual_seed(0))
    new = mixture_completion(mixture, x, mask, num_completions=5,
                             generator=torch.Generator().manual_seed(0))
    assert new.samples.shape == (5, 4, 3)
    torch.testing.assert_close(new.samples, old.samples, rtol=0, atol=0)
    assert mixture_completion(mixture, x, mask).samples is None  # the default: no draws
    with pytest.raises(TypeError, match="num_completions= and num_samples="):
        mixture_conditional(mixture.weights, mixture.loc, mixture.log_scale.exp() ** 2, x, mask,
                            num_samples=2, num_completions=2)
