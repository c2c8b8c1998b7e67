"""Models from Pyro's own test suite (tests/infer/test_enum.py, pyro-ppl/pyro commit
ff6ae1c9572591791aae8842bcd702fcf0b46fd6): test_elbo_enumerate_plates_4's and _5's ``auto_model``,
copied unchanged except that the data is an argument (plates_5 used a closure), plates_5's
``probs_c`` is called ``probs_c5`` (both live in one param store) and the
``poutine.scale(scale=scale)`` decorator of the parametrised test is left out (scale=1).
A global enumerated ``a``, a per-row enumerated ``b`` in the "outer" plate (the rows), and
observations in a nested "inner" plate; the parameters are those the tests set.

    #      +--------------------+
    #      |       +----------+ |
    #  a ----> b ----> c      | |
    #      |       |      N=2 | |
    #      | M=2   +----------+ |
    #      +--------------------+
"""
import torch
from torch.distributions import constraints

import pyro
import pyro.distributions as dist
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex


def set_params():
    pyro.param("probs_a", torch.tensor([0.45, 0.55]), constraint=constraints.simplex)
    pyro.param("probs_b", torch.tensor([[0.6, 0.4], [0.4, 0.6]]), constraint=constraints.simplex)
    pyro.param("probs_c", torch.tensor([[0.4, 0.6], [0.3, 0.7]]), constraint=constraints.simplex)
    pyro.param("probs_c5", torch.tensor([[[0.4, 0.6], [0.3, 0.7]], [[0.2, 0.8], [0.1, 0.9]]]),
               constraint=constraints.simplex)


@config_enumerate
def plates_4(data):
    probs_a = pyro.param("probs_a")
    probs_b = pyro.param("probs_b")
    probs_c = pyro.param("probs_c")
    a = pyro.sample("a", dist.Categorical(probs_a))
    with pyro.plate("outer", 2):
        b = pyro.sample("b", dist.Categorical(probs_b[a]))
        with pyro.plate("inner", 2):
            pyro.sample("c", dist.Categorical(probs_c[b]), obs=data)


@config_enumerate
def plates_5(data):
    probs_a = pyro.param("probs_a")
    probs_b = pyro.param("probs_b")
    probs_c = pyro.param("probs_c5")
    a = pyro.sample("a", dist.Categorical(probs_a))
    with pyro.plate("outer", 2):
        b = pyro.sample("b", dist.Categorical(probs_b[a]))
        with pyro.plate("inner", 2):
            pyro.sample("c", dist.Categorical(Vindex(probs_c)[a, b]), obs=data)
