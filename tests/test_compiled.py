"""The compiled SVI step (ppl_lvm.compiled): a recorded graph gives eager Pyro's loss and gradients
from the same RNG state, fit(compile=True) follows the eager run step for step, and a program the
graph cannot follow runs eagerly, said in one line."""
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceEnum_ELBO

from ppl_lvm.compiled import CompiledELBO, compile_loss
from ppl_lvm.guides import LocalGuide
from ppl_lvm.models.mog import MixtureOfGaussians, enumeration_guide
from ppl_lvm.models.vae import VAE
from ppl_lvm.objectives import IWAE_ELBO
from ppl_lvm.plate import data_plate
from ppl_lvm.train import bind_rows, fit, load_params  # noqa: F401


def binary_data(num_data=60, data_dim=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(num_data, data_dim, generator=gen) < torch.linspace(0.1, 0.9, data_dim)).float()


def vae_pair(seed=1):
    torch.manual_seed(seed)
    vae = VAE(10, z_dim=2, hidden_dim=8)
    return vae.model, vae.guide


def step_grads(loss, model, guide, x, idx, num_data, seed):
    """(loss, {name: dense grad}) of one loss_and_grads call from RNG seed ``seed``."""
    pyro.set_rng_seed(seed)
    with pyro.poutine.trace(param_only=True) as params:
        value = loss.loss_and_grads(bind_rows(model, idx, num_data), bind_rows(guide, idx, num_data),
                                    x[idx])
    grads = {}
    for name, site in params.trace.nodes.items():
        leaf = site["value"].unconstrained()
        grads[name] = leaf.grad.to_dense().clone()
        leaf.grad = None
    return value, grads


@pytest.mark.parametrize("make, elbo", [
    (vae_pair, Trace_ELBO()),
    (vae_pair, IWAE_ELBO(4, dreg=True)),
    (lambda: (vae_pair()[0], LocalGuide(60, {"z": 2}, init_scale=0.5)), Trace_ELBO()),
], ids=["vae", "iwae-dreg", "local-guide"])
def test_graph_step_equals_eager_step(make, elbo):
    x = binary_data()
    model, guide = make()
    pyro.clear_param_store()
    compiled = CompiledELBO(elbo)
    with pyro.validation_enabled(False):
        step_grads(compiled, model, guide, x, torch.arange(10), 60, seed=0)  # records, checks
        assert compiled.steps == {"graph": 0, "eager": 1} and len(compiled.graphs) == 1
        rows = torch.tensor([3, 59, 7, 21, 40, 0, 11, 12, 13, 50])  # other rows, same shape
        expected = step_grads(elbo, model, guide, x, rows, 60, seed=5)
        actual = step_grads(compiled, model, guide, x, rows, 60, seed=5)
    assert compiled.steps["graph"] == 1
    assert actual[0] == pytest.approx(expected[0], rel=1e-5)
    assert expected[1].keys() == actual[1].keys()
    for name, grad in expected[1].items():
        assert torch.allclose(actual[1][name], grad, rtol=1e-4, atol=1e-6), name
    if isinstance(guide, LocalGuide):  # only the batch's φ rows get a gradient
        table_grad = actual[1][guide.param_name]
        assert set(table_grad.abs().sum(-1).nonzero().flatten().tolist()) == set(rows.tolist())


@pytest.mark.parametrize("loss, guide_kind", [
    (None, "amortized"), (IWAE_ELBO(3), "amortized"), (None, "local")])
def test_fit_compiled_follows_eager(loss, guide_kind):
    x = binary_data()
    results, tables = {}, {}
    for compile in (False, True):
        model, guide = vae_pair()
        if guide_kind == "local":
            guide = LocalGuide(60, {"z": 2})
        results[compile] = fit(model, guide, x, epochs=3, batch_size=16, lr=1e-2, progress=False,
                               seed=2, loss=loss, compile=compile)
        tables[compile] = {n: pyro.param(n).detach().clone() for n in pyro.get_param_store()}
    eager, graph = results[False], results[True]
    # epoch 1 runs eagerly (Pyro's validation), then 2 graphs (B = 16 and the last B = 12)
    assert "2 graph(s)" in graph.compiled and "6 steps on the graph, 6 eager" in graph.compiled
    assert graph.losses == pytest.approx(eager.losses, rel=1e-5)
    for name, value in tables[False].items():
        assert torch.allclose(tables[True][name], value, rtol=1e-4, atol=1e-5), name


def test_data_dependent_program_runs_eagerly_with_one_line():
    def model(x):
        loc = pyro.param("loc", torch.zeros(x.shape[1]))
        with pyro.plate("data", len(x)):
            if loc.sum() > 0:  # a branch on a tensor's value: no static graph can hold it
                loc = loc * 2
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    x = torch.randn(40, 3) + 1.0
    fitted = {}
    for compile in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fit(model, guide, x, epochs=2, batch_size=10, lr=0.1, progress=False,
                         validate=False, compile=compile)
        fitted[compile] = pyro.param("loc").detach().clone()
    lines = [str(w.message) for w in caught if "compile" in str(w.message)]
    assert len(lines) == 1 and "data-dependent control flow" in lines[0]
    assert "test_compiled.py" in lines[0] and "\n" not in lines[0]
    assert "0 graph(s)" in result.compiled and "8 eager" in result.compiled
    assert torch.equal(fitted[True], fitted[False])  # the eager run, step for step


def test_enumerated_mixture_falls_back_to_eager():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(30, 2) - 3, torch.randn(30, 2) + 3])
    losses = {}
    for compile in (False, True):
        torch.manual_seed(0)
        mixture = MixtureOfGaussians(2, 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fit(mixture.model, enumeration_guide, x, epochs=2, batch_size=20, lr=0.05,
                         loss=TraceEnum_ELBO(max_plate_nesting=1), progress=False,
                         validate=False, compile=compile)
        losses[compile] = result.losses
    assert [str(w.message) for w in caught if "compile" in str(w.message)] == [
        "compile: running eagerly: data-dependent control flow: the program reads a tensor as a "
        "Python number (.item(), int(), bool(), `if tensor:`)"]
    assert losses[True] == losses[False]


def test_validation_on_keeps_steps_eager_and_auto_skips_short_runs():
    x = binary_data(num_data=20)
    model, guide = vae_pair()
    result = fit(model, guide, x, epochs=2, batch_size=10, progress=False, validate=True,
                 compile=True)
    if pyro.infer.util.is_validation_enabled():
        assert "0 graph(s)" in result.compiled and "4 eager" in result.compiled
    assert compile_loss(Trace_ELBO(), "auto", total_steps=10).__class__ is Trace_ELBO
    assert isinstance(compile_loss(Trace_ELBO(), "auto", total_steps=10_000), CompiledELBO)
    with pytest.raises(ValueError, match="compile must be"):
        compile_loss(Trace_ELBO(), "yes")


def test_compiled_resume_is_exact(tmp_path):
    x = binary_data()
    runs = {}
    for name, epochs in (("straight", 3), ("first", 2), ("resumed", 3)):
        model, guide = vae_pair()
        runs[name] = fit(model, guide, x, epochs=epochs, batch_size=16, lr=1e-2, progress=False,
                         seed=4, compile=True, resume=name == "resumed",
                         checkpoint_dir=None if name == "straight" else tmp_path)
    assert runs["resumed"].losses == pytest.approx(runs["straight"].losses, rel=1e-6)


def test_jit_trace_elbo_refused_for_per_datapoint_guide():
    x = binary_data()
    model, _ = vae_pair()
    with pytest.raises(ValueError, match="freezes the first minibatch's row indices"):
        fit(model, LocalGuide(60, {"z": 2}), x, epochs=1, batch_size=16, progress=False,
            loss=JitTrace_ELBO())


@pytest.fixture
def made(monkeypatch):
    """The compiled programs that the estimators build during the test, in order."""
    from ppl_lvm import compiled

    built = []
    original = compiled.compile_weights
    monkeypatch.setattr(compiled, "compile_weights",
                        lambda *a: built.append(original(*a)) or built[-1])
    return built


def test_compiled_log_weights_equal_eager_chunk_by_chunk(made):
    from ppl_lvm.estimators import estimate_log_marginal, log_weights


    x = binary_data(num_data=70)
    model, guide = vae_pair()
    pyro.clear_param_store()
    local = LocalGuide(70, {"z": 2}, init_scale=0.5)
    for guide_ in (guide, local):
        # seeded: rows in blocks of 32 (70 = 32 + 32 + 6: two chunk shapes), K = 7
        eager = estimate_log_marginal(model, guide_, x, num_samples=7, seed=3)
        graph = estimate_log_marginal(model, guide_, x, num_samples=7, seed=3, compile=True)
        assert torch.allclose(graph.log_px, eager.log_px, rtol=1e-6, atol=1e-5)
        assert torch.allclose(graph.ess, eager.ess, rtol=1e-5)
        steps = made[-1].steps  # 2 chunk shapes recorded (eagerly), the middle chunk replayed
        assert steps == {"graph": 1, "eager": 2} and len(made[-1].graphs) == 2
    weights = log_weights(model, local, x, num_samples=4, seed=1, compile=True)
    assert torch.allclose(weights, log_weights(model, local, x, num_samples=4, seed=1), atol=1e-5)
    assert weights.shape == (4, 70)


@pytest.mark.slow
def test_inductor_log_weights_equal_eager_chunk_by_chunk(made):
    """log_marginal(compile="inductor"): the recorded graph through torch.compile, checked against
    eager on its first chunk; the seeded answer is eager's up to float rounding (same draws)."""
    from ppl_lvm.estimators import estimate_log_marginal

    x = binary_data(num_data=70)
    model, guide = vae_pair()
    eager = estimate_log_marginal(model, guide, x, num_samples=7, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = estimate_log_marginal(model, guide, x, num_samples=7, seed=3, compile="inductor")
    assert not [w for w in caught if "compile:" in str(w.message)]  # no fallback to eager
    assert made[-1].inductor and made[-1].reason is None
    assert made[-1].steps == {"graph": 1, "eager": 2}
    assert torch.allclose(graph.log_px, eager.log_px, rtol=1e-6, atol=1e-5)


def test_compile_modes_of_the_estimators_pick_their_backend():
    from ppl_lvm import compiled
    from ppl_lvm.estimators import _Program

    x = binary_data(num_data=10)
    model, guide = vae_pair()
    prog = _Program(model, guide, x, "iwae", None, torch.arange(10), {})
    assert compiled.compile_weights(prog, False, 1000) is prog
    assert compiled.compile_weights(prog, "auto", 1000) is prog  # eager on the CPU
    assert not compiled.compile_weights(prog, True, 10).inductor
    assert compiled.compile_weights(prog, "inductor", 10).inductor
    with pytest.raises(ValueError, match="compile must be one of"):
        compiled.compile_weights(prog, "fast", 10)


def test_compiled_log_weights_are_reused_across_calls_and_checked_on_each(monkeypatch):
    """A later call takes the graph an earlier call recorded (no recording), after checking it on
    its first chunk; a tensor the program closes over that changed between calls fails that check
    and the graph is recorded afresh. The right answer at each step: z ~ N(0, 1),
    x | z ~ N(z + shift, 1) and the exact posterior as guide give log N(x; shift, 2) for any K."""
    from ppl_lvm import compiled
    from ppl_lvm.estimators import estimate_log_marginal

    shift = {"value": torch.tensor(0.0)}

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z + shift["value"], 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal((x - shift["value"]) / 2, 0.5 ** 0.5))

    recorded = []
    original = compiled.CompiledWeights._record
    monkeypatch.setattr(compiled.CompiledWeights, "_record",
                        lambda self, *a: recorded.append(a[1]) or original(self, *a))
    x = torch.linspace(-2.0, 3.0, 70)
    for value, records in ((0.0, 2), (0.0, 0), (1.5, 2)):
        shift["value"] = torch.tensor(value)
        truth = dist.Normal(value, 2.0 ** 0.5).log_prob(x)
        recorded.clear()
        estimate = estimate_log_marginal(model, guide, x, num_samples=5, seed=1, compile=True)
        assert len(recorded) == records  # 70 rows = 32 + 32 + 6: two chunk shapes
        assert f"{records} graph(s) recorded" in estimate.compiled
        assert f"{2 - records} taken from an earlier call" in estimate.compiled
        assert torch.allclose(estimate.log_px, truth, atol=1e-5)


def test_compiled_log_weights_still_check_the_data_support():
    from ppl_lvm.estimators import log_marginal

    x = binary_data(num_data=70)
    model, guide = vae_pair()
    x[50, 3] = 0.5  # in the second chunk: it replays the first chunk's graph
    with pytest.raises(ValueError, match="outside the support"):
        log_marginal(model, guide, x, num_samples=3, seed=0, compile=True)


def test_divergence_on_the_graph_is_still_caught():
    from ppl_lvm.train import DivergenceError

    x = binary_data()
    model, guide = vae_pair()
    # lr 1e3 blows the parameters up within a few steps, taken on the graph from step 2 on
    with pytest.raises(DivergenceError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(model, guide, x, epochs=30, batch_size=16, lr=1e3, progress=False, compile=True,
            validate=False)


@pytest.mark.slow
def test_inductor_step_draws_as_eager_does():
    x = binary_data()
    results = {}
    for compile in (False, "inductor"):
        model, guide = vae_pair()
        results[compile] = fit(model, guide, x, epochs=3, batch_size=16, lr=1e-2, progress=False,
                               seed=2, compile=compile)
    assert "2 graph(s)" in results["inductor"].compiled
    assert results["inductor"].losses == pytest.approx(results[False].losses, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# AIS: the annealed log-density and its gradient recorded once, replayed at every leapfrog step


def test_compiled_ais_equals_eager_on_a_tiny_vae_chunk_by_chunk():
    from ppl_lvm.ais import ais_log_marginal

    x = binary_data(num_data=50)
    model, guide = vae_pair()
    # from q(z | x) in chunks of 20 rows (20 + 20 + 10: two chunk shapes, each with a split and a
    # joint graph), and from the prior in one chunk
    for guide_, chunk_size, expected in ((guide, 20, "4 graph(s)"), (None, 50, "2 graph(s)")):
        common = dict(num_temperatures=4, num_samples=3, leapfrog_steps=2, chunk_size=chunk_size,
                      seed=5)
        eager = ais_log_marginal(model, guide_, x, **common)
        graph = ais_log_marginal(model, guide_, x, compile=True, **common)
        assert torch.allclose(graph.log_px, eager.log_px, rtol=1e-5, atol=1e-5)
        assert torch.allclose(graph.acceptance, eager.acceptance, atol=1e-5)
        assert eager.compiled is None and expected in graph.compiled
    # per chunk 1 + 3 transitions × 2 leapfrog gradients = 7 evaluations; the first of each
    # (chunk shape, split) pair runs eagerly and records its graph
    assert "5 evaluations on the graph, 2 eager" in graph.compiled


def test_compiled_ais_on_a_linear_gaussian_matches_eager_and_the_closed_form():
    from tests import closed_form
    from ppl_lvm.estimators import estimate_log_marginal

    x = closed_form.make_data(30)
    common = dict(method="ais", num_temperatures=30, num_samples=4, seed=0)
    eager = estimate_log_marginal(closed_form.model, closed_form.amortized_guide, x, **common)
    graph = estimate_log_marginal(closed_form.model, closed_form.amortized_guide, x,
                                  compile=True, **common)
    assert torch.allclose(graph.log_px, eager.log_px, atol=1e-5)
    assert "graph(s)" in graph.compiled and "0 eager" not in graph.compiled
    error = graph.log_px - closed_form.log_px(x)
    # AIS is a stochastic lower bound that tightens with T: within Monte Carlo error of the truth
    assert error.abs().mean() < 0.25 and abs(error.mean()) < 4 * error.std() / 30 ** 0.5


def test_compiled_ais_of_a_data_dependent_program_runs_eagerly_with_one_line():
    from ppl_lvm.ais import ais_log_marginal

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0))
            if z.abs().max() > 100:  # a branch on a tensor's value
                z = z.clamp(-100, 100)
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    x = torch.randn(12)
    eager = ais_log_marginal(model, None, x, num_temperatures=3, num_samples=2, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = ais_log_marginal(model, None, x, num_temperatures=3, num_samples=2, seed=1,
                                 compile=True)
    lines = [str(w.message) for w in caught if "compile" in str(w.message)]
    assert len(lines) == 1 and "data-dependent control flow" in lines[0] and "\n" not in lines[0]
    assert torch.equal(graph.log_px, eager.log_px) and "0 graph(s)" in graph.compiled


# ----------------------------------------------------------------------------------------------
# programs we did not write (tests/programs), on the compiled estimators


def test_compiled_log_weights_on_real_pyro_programs_follow_eager_or_say_why_not():
    """Pyro programs as their authors wrote them, through log_marginal(compile=True). Where the
    graph can follow the program the seeded answer is eager's (and, for the linear-Gaussian model
    scored by its exact posterior, the closed form log p(x)); ProdLDA reads
    int(docs.sum(-1).max()), a tensor as a Python number, which no graph can hold: it runs
    eagerly, and says why, with eager's answer."""
    from ppl_lvm import load_digits
    from ppl_lvm.estimators import estimate_log_marginal
    from tests.programs import linear_gaussian
    from tests.programs.prodlda import ProdLDA
    from tests.programs.vae_example import VAE as ExampleVAE

    pyro.clear_param_store()
    x = linear_gaussian.make_data()  # data plate at dim -2, its own site names
    graph = estimate_log_marginal(linear_gaussian.model, linear_gaussian.exact_guide, x,
                                  num_samples=5, seed=0, compile=True)
    assert "graph(s) recorded" in graph.compiled and "ran eagerly" not in graph.compiled
    assert torch.allclose(graph.log_px, linear_gaussian.log_px(x), atol=1e-4)

    torch.manual_seed(0)  # Pyro's VAE example: grey levels under Bernoulli(validate_args=False)
    vae = ExampleVAE(z_dim=2, hidden_dim=8)
    grey = load_digits()[0][:72].repeat(1, 13)[:, :784]  # seed blocks of 32 + 32 + 8 rows
    eager = estimate_log_marginal(vae.model, vae.guide, grey, num_samples=9, seed=1)
    graph = estimate_log_marginal(vae.model, vae.guide, grey, num_samples=9, seed=1, compile=True)
    assert "ran eagerly" not in graph.compiled and "1 chunk(s) on a graph" in graph.compiled
    assert torch.allclose(graph.log_px, eager.log_px, rtol=1e-5, atol=1e-4)

    torch.manual_seed(0)  # ProdLDA (BatchNorm and Dropout, scored in eval mode)
    docs = torch.distributions.Multinomial(20, torch.softmax(torch.randn(12), 0)).sample((30,))
    lda = ProdLDA(vocab_size=12, num_topics=3, hidden=16, dropout=0.2)
    eager = estimate_log_marginal(lda.model, lda.guide, docs, num_samples=20, seed=0)
    with pytest.warns(UserWarning, match="compile: log weights run eagerly: the model/guide "
                                         "could not be vectorised"):
        graph = estimate_log_marginal(lda.model, lda.guide, docs, num_samples=20, seed=0,
                                      compile=True)
    assert graph.compiled.startswith("compiled log weights (fx): ran eagerly: the model/guide "
                                     "could not be vectorised")
    assert torch.equal(graph.log_px, eager.log_px)


def test_compiled_fit_of_pyro_examples_vae_follows_eager():
    """Pyro's VAE example (its own site names, a relaxed Bernoulli on grey levels, its own plate)
    trained by fit(compile=True): the same losses and weights as the eager fit, step for step."""
    from ppl_lvm import load_digits
    from tests.programs.vae_example import VAE as ExampleVAE

    grey = load_digits()[0][:60].repeat(1, 13)[:, :784]
    results, tables = {}, {}
    for compile in (False, True):
        pyro.clear_param_store()
        torch.manual_seed(0)
        vae = ExampleVAE(z_dim=2, hidden_dim=8)
        results[compile] = fit(vae.model, vae.guide, grey, epochs=3, batch_size=16, lr=1e-2,
                               progress=False, seed=2, compile=compile)
        tables[compile] = {n: pyro.param(n).detach().clone() for n in pyro.get_param_store()}
    graph = results[True]
    assert "2 graph(s)" in graph.compiled and "6 steps on the graph" in graph.compiled
    assert graph.losses == pytest.approx(results[False].losses, rel=1e-5)
    for name, value in tables[False].items():
        assert torch.allclose(tables[True][name], value, rtol=1e-4, atol=1e-5), name


@pytest.mark.cuda
def test_compiled_paths_on_cuda_follow_eager_without_falling_back():
    """On a GPU a graph's random ops draw from the CUDA generator: the first-step / first-chunk
    check must start the graph and eager from the same CUDA state (it restored the CPU's only, so
    every check would fail and run eagerly). fit and log_marginal, seeded and not."""
    x = binary_data().cuda()
    results = {}
    for compile in (False, True):
        model, guide = vae_pair()
        results[compile] = fit(model, guide, x, epochs=3, batch_size=16, lr=1e-2, progress=False,
                               seed=2, device="cuda", compile=compile)
    assert "2 graph(s)" in results[True].compiled and "eagerly" not in results[True].compiled
    assert results[True].losses == pytest.approx(results[False].losses, rel=1e-4)

    from ppl_lvm.estimators import estimate_log_marginal

    model, guide = vae_pair()
    for seed in (3, None):
        torch.manual_seed(0)
        eager = estimate_log_marginal(model, guide, x, num_samples=7, seed=seed, chunk_size=16)
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = estimate_log_marginal(model, guide, x, num_samples=7, seed=seed, compile=True,
                                          chunk_size=16)
        assert not [w for w in caught if "compile:" in str(w.message)]
        assert graph.log_px.is_cuda and "ran eagerly" not in graph.compiled
        assert torch.allclose(graph.log_px, eager.log_px, rtol=1e-5, atol=1e-4)
