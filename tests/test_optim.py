import math

import pyro
import pytest
import torch

from ppl_lvm.optim import LazyAdam, lr_factor


def test_cosine_schedule_is_half_a_cosine_from_one_to_a_hundredth():
    assert lr_factor("cosine", 0, 100) == 1.0
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor("cosine", 25, 100) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.sqrt(0.5)))
    assert lr_factor("cosine", 100, 100) == pytest.approx(0.01)
    assert lr_factor("cosine", 500, 100) == pytest.approx(0.01)  # past the end it stays there


def test_exponential_and_constant_schedules():
    assert lr_factor("exponential", 50, 100) == pytest.approx(0.1)
    assert lr_factor(None, 7, 10) == lr_factor("constant", 7, 10) == 1.0
    assert lr_factor(lambda step, total: step / total, 3, 4) == 0.75


def test_lazy_adam_dense_step_is_torch_adam_fused_and_resumes_from_a_saved_state():
    pyro.clear_param_store()
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5, 3, generator=gen)
    grads = [torch.randn(5, 3, generator=gen) for _ in range(4)]
    reference = start.clone().requires_grad_()
    torch_adam = torch.optim.Adam([reference], lr=0.1, foreach=False)  # Adam as torch writes it
    param = pyro.param("w", start.clone()).unconstrained()
    optim = LazyAdam(lr=0.1)
    for grad in grads[:2]:
        reference.grad, param.grad = grad.clone(), grad.clone()
        torch_adam.step()
        optim([param])
    assert optim._dense[0.1].defaults["fused"]  # one fused pass per step on the CPU
    assert torch.allclose(param, reference, atol=1e-6)
    # a checkpoint's state (its step count a CPU tensor) picks up where it stopped
    resumed = LazyAdam(lr=0.1)
    resumed.set_state(optim.get_state())
    for grad in grads[2:]:
        reference.grad, param.grad = grad.clone(), grad.clone()
        torch_adam.step()
        resumed([param])
    assert torch.allclose(param, reference, atol=1e-6)
    pyro.clear_param_store()
