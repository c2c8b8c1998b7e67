import math

import pytest

from ppl_lvm.optim import lr_factor


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
