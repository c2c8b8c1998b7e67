"""Issue 19: a seeded answer depends on (seed, rows, K) only, not on the device. On a device other
than the CPU every seeded draw comes from the CPU's generator and is moved there
(``particles.noise_from_cpu``; AIS's per-block CPU generators): the route a GPU takes is forced on
the CPU here ("meta" as the device) and must give bit-identical answers, through every routed
sampler; the CUDA comparisons run where there is a GPU."""
import collections
import contextlib
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_lvm.particles as particles
from ppl_lvm.ais import SEED_BLOCK_ROWS, _block_seed, _Noise, ais_log_marginal, bdmc
from ppl_lvm.completion import complete, mixture_completion
from ppl_lvm.estimators import estimate_log_marginal
from ppl_lvm.models.mog import MixtureOfGaussians
from ppl_lvm.models.ppca import PPCA
from ppl_lvm.particles import noise_from_cpu
from ppl_lvm.plate import data_plate
from ppl_lvm.recipes import amortization_gaps, infer_local
from tests import closed_form

MEANS = (0.0, 1.0, 2.0)  # x | z, c ~ N(2 z + MEANS[c], 1)


pytestmark = pytest.mark.usefixtures("fresh_param_store")


@pytest.fixture
def routed(monkeypatch):
    """The samplers' names, one per draw that took the CPU route (and the Normal ε's shapes)."""
    calls = collections.Counter()
    draw_on_cpu, standard_normal = particles._draw_on_cpu, particles._standard_normal_from_cpu

    def counting_draw(sampler, args, kwargs):
        if kwargs.get("generator") is None:
            calls[sampler.__name__] += 1
        return draw_on_cpu(sampler, args, kwargs)

    def counting_normal(shape, dtype, device):
        calls["_standard_normal"] += 1
        return standard_normal(shape, dtype, device)

    monkeypatch.setattr(particles, "_draw_on_cpu", counting_draw)
    monkeypatch.setattr(particles, "_standard_normal_from_cpu", counting_normal)
    return calls


# ----------------------------------------------------------------------------------------------
# programs that run on any device (their constants follow x)


def discrete_model(x):
    """z ~ Bernoulli(0.3), c ~ OneHotCategorical(0.2, 0.5, 0.3), x ~ N(2 z + MEANS·c, 1): x [N]."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(x.new_full(x.shape, 0.3)))
        c = pyro.sample("c", dist.OneHotCategorical(x.new_tensor([0.2, 0.5, 0.3]).expand(
            x.shape[0], 3)))
        pyro.sample("x", dist.Normal(2 * z + c @ x.new_tensor(MEANS), 1.0), obs=x)


def discrete_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(logits=(x - 1) / 2))
        pyro.sample("c", dist.OneHotCategorical(logits=torch.stack([-x, 0 * x, x], -1) / 2))


def discrete_log_px(x):
    """Exact log p(x_n) [N]: the six (z, c) enumerated."""
    terms = [math.log(pz) + math.log(pc) + torch.distributions.Normal(2 * z + m, 1.0).log_prob(x)
             for z, pz in ((0, 0.7), (1, 0.3)) for m, pc in zip(MEANS, (0.2, 0.5, 0.3))]
    return torch.stack(terms).logsumexp(0)


def discrete_data(num_rows=45):
    return 3 * torch.rand(num_rows, generator=torch.Generator().manual_seed(6), dtype=torch.float64)


def linear_model(x, idx=None, num_data=None):
    """closed_form.model with its constants on x's device and dtype."""
    weight, bias = closed_form.WEIGHT.to(x), closed_form.BIAS.to(x)
    with data_plate(x, idx, num_data):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ weight.T + bias, closed_form.NOISE).to_event(1), obs=x)


def linear_encoder(x):
    """closed_form.encoder on x's device and dtype: 0.8 × the posterior mean, 1.3 × q*'s scales."""
    weight, bias = closed_form.WEIGHT.to(x), closed_form.BIAS.to(x)
    precision = torch.eye(2, dtype=x.dtype, device=x.device) + weight.T @ weight / closed_form.NOISE ** 2
    mean = torch.linalg.solve(precision, weight.T @ (x - bias).T / closed_form.NOISE ** 2).T
    return 0.8 * mean, (1.3 * precision.diagonal().rsqrt()).expand(x.shape[0], 2)


def linear_guide(x, idx=None, num_data=None):
    loc, scale = linear_encoder(x)
    with data_plate(x, idx, num_data):
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def gamma_model(x):
    """s ~ Gamma(2, 1.5), x | s ~ N(0, 1 / s): a constrained latent (AIS anneals log s)."""
    with pyro.plate("data", x.shape[0]):
        s = pyro.sample("s", dist.Gamma(x.new_full(x.shape, 2.0), 1.5))
        pyro.sample("x", dist.Normal(0.0, s.rsqrt()), obs=x)


def ppca(device="cpu", dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    model = PPCA(torch.randn(5, 2, generator=generator), torch.randn(5, generator=generator), 0.5)
    with torch.no_grad():
        x = (torch.randn(40, 2, generator=generator) @ model.weight.T + model.bias
             + 0.5 * torch.randn(40, 5, generator=generator))
    return model.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# the route, forced on the CPU: the same numbers, through the CPU route


def test_samplers_on_another_device_draw_the_cpus_numbers_and_are_restored_on_exit():
    """rand, randn, randint, randperm, rand_like, randn_like and Uniform's rsample on the "meta" device advance the CPU's
    generator exactly as the same draws on the CPU do; Bernoulli, OneHotCategorical, Gamma,
    Dirichlet and Normal.sample through the route give the CPU's numbers; torch's samplers are
    torch's own again after the block (and never patched for the CPU)."""
    def shape_only(device):
        zeros = torch.zeros(4, 3, device=device)
        return (torch.rand(5, 2, device=device), torch.randn(3, device=device),
                torch.randint(7, (6,), device=device), torch.randperm(9, device=device),
                torch.rand_like(zeros), torch.randn_like(zeros, dtype=torch.float64),
                dist.Uniform(zeros - 1, zeros + 2, validate_args=False).rsample())

    def valued():
        probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
        return (dist.Bernoulli(probs).sample((4,)), dist.OneHotCategorical(probs).sample((5,)),
                dist.Gamma(probs + 1, 2.0).rsample((3,)), dist.Beta(probs + 1, 2.0).sample(),
                dist.Normal(probs, 1.0).sample((2,)), dist.Poisson(probs * 4).sample())

    torch.manual_seed(0)
    on_cpu = shape_only("cpu")
    expected = torch.get_rng_state()
    torch.manual_seed(0)
    with noise_from_cpu("meta"):
        with noise_from_cpu("meta"):  # re-entrant
            on_meta = shape_only("meta")
    assert torch.equal(torch.get_rng_state(), expected)
    assert all(value.device.type == "meta" and value.shape == cpu.shape and
               value.dtype == cpu.dtype for value, cpu in zip(on_meta, on_cpu))
    torch.manual_seed(1)
    plain = valued()
    torch.manual_seed(1)
    with noise_from_cpu("meta"):
        assert torch.bernoulli is not particles._TORCH_SAMPLERS["bernoulli"]
        through_route = valued()
    assert all(torch.equal(a, b) for a, b in zip(plain, through_route))
    assert all(getattr(torch, name) is sampler for name, sampler in particles._TORCH_SAMPLERS.items())
    with noise_from_cpu("cpu"):
        assert all(getattr(torch, name) is sampler
                   for name, sampler in particles._TORCH_SAMPLERS.items())


def test_discrete_latents_take_the_cpu_route_and_give_the_cpus_estimate(routed):
    """IWAE with a Bernoulli and a OneHotCategorical guide, the uniform proposal (torch.randint)
    and the prior: through the forced route bit-identical to the CPU run, every draw routed, and
    near the enumerated log p(x)."""
    x = discrete_data()
    for method, guide, num_samples in (("iwae", discrete_guide, 300), ("uniform", None, 60),
                                       ("prior", None, 300)):
        plain = estimate_log_marginal(discrete_model, guide, x, method=method,
                                      num_samples=num_samples, seed=0)
        routed.clear()
        with noise_from_cpu("meta"):
            through_route = estimate_log_marginal(discrete_model, guide, x, method=method,
                                                  num_samples=num_samples, seed=0)
        assert torch.equal(through_route.log_px, plain.log_px), method
        blocks = 2 * math.ceil(num_samples / particles.SEED_BLOCK_PARTICLES)  # 45 rows: 2 blocks
        draws = {"iwae": {"bernoulli": blocks, "multinomial": blocks},
                 "uniform": {"randint": 2 * blocks}, "prior": {"bernoulli": blocks,
                                                                "multinomial": blocks}}[method]
        assert {name: routed[name] for name in draws} == draws, (method, routed)
        error = plain.log_px - discrete_log_px(x)
        assert (error.abs() < 4 * plain.mc_stderr).all(), method
        assert abs(error.mean().item()) < 3 * plain.mean_mc_stderr, method


def test_ais_and_bdmc_draw_from_cpu_generators_per_block(routed):
    """AIS's per-block streams are CPU generators whatever the device (draws moved there), its f_0
    draws take the CPU route (a Normal prior, a Gamma prior), and BDMC's simulation too: every
    answer bit-identical to the CPU run."""
    seed, rows = 3, slice(5, 40)
    shape = (4, rows.stop - rows.start, 2)
    on_meta = _Noise(seed, rows, torch.device("meta")).draw("normal", shape, -2, torch.float32)
    on_cpu = _Noise(seed, rows, torch.device("cpu")).draw("normal", shape, -2, torch.float32)
    assert on_meta.device.type == "meta" and on_meta.shape == on_cpu.shape
    first = torch.randn((4, SEED_BLOCK_ROWS, 2),
                        generator=torch.Generator().manual_seed(_block_seed(seed, 0)))
    assert torch.equal(on_cpu[:, :SEED_BLOCK_ROWS - 5], first[:, 5:])

    model, x = ppca(dtype=torch.float32)
    s = 2 * torch.rand(35, generator=torch.Generator().manual_seed(5)) - 1
    options = dict(num_samples=4, num_temperatures=8, leapfrog_steps=2)
    runs = (lambda: ais_log_marginal(model.model, None, x, seed=3, **options).log_px,
            lambda: ais_log_marginal(model.model, model.guide, x, seed=3, **options).log_px,
            lambda: ais_log_marginal(gamma_model, None, s, seed=1, **options).log_px,
            lambda: sandwich(bdmc(model.model, num_data=35, data_shape=(5,), seed=2,
                                  **options)))
    routes = ("_standard_normal", "_standard_normal", "_standard_gamma", "_standard_normal")
    for run, route in zip(runs, routes):
        plain = run()
        routed.clear()
        with noise_from_cpu("meta"):
            through_route = run()
        assert torch.equal(through_route, plain)
        assert routed[route] > 0, routed


def sandwich(result):
    """BDMC's simulated x [N, D], lower and upper bounds, in one [N, D + 2] tensor."""
    return torch.cat([result.x, result.lower[:, None], result.upper[:, None]], 1)


def test_amortization_gaps_and_infer_local_draw_through_the_cpu_route(routed):
    """amortization_gaps (q*'s solver, the two ELBOs, the pooled proposal's Normal.sample) and
    infer_local's Adam (the ELBO's ε, the rows' order): bit-identical through the forced route,
    the pooled draws routed; and the gaps near their closed forms."""
    x = closed_form.make_data(20)
    options = dict(encoder=closed_form.encoder, num_samples=256, elbo_samples=64, seed=0)
    plain = amortization_gaps(closed_form.model, closed_form.amortized_guide, x, **options)
    routed.clear()
    with noise_from_cpu("meta"):
        through_route = amortization_gaps(closed_form.model, closed_form.amortized_guide, x,
                                          **options)
    for name in ("log_px", "elbo_optimal", "elbo_amortized", "log_px_stderr"):
        assert torch.equal(getattr(through_route, name), getattr(plain, name)), name
    assert routed["normal"] > 0 and routed["_standard_normal"] > 0, routed
    approximation, amortization = closed_form.gaps(x)
    assert plain.approximation_gap == pytest.approx(approximation, abs=0.05)
    assert plain.amortization_gap == pytest.approx(amortization, abs=0.05)

    pyro.clear_param_store()
    with pytest.warns(RuntimeWarning, match="did not converge"):
        table = infer_local(closed_form.model, x, method="adam", steps=5, seed=0).table(x.device)
    table = table.detach().clone()
    pyro.clear_param_store()
    routed.clear()
    with noise_from_cpu("meta"), pytest.warns(RuntimeWarning, match="did not converge"):
        again = infer_local(closed_form.model, x, method="adam", steps=5, seed=0).table(x.device)
    assert torch.equal(again.detach(), table)
    assert routed["_standard_normal"] >= 5, routed  # the ELBO's ε, at each of the 5 steps


def test_completions_draw_through_the_cpu_route(routed):
    """complete (SIR and Metropolis-within-Gibbs, its accept draws by torch.rand_like): the same
    completions through the forced route, every kind of draw routed."""
    model, x = ppca(dtype=torch.float32)
    mask = torch.tensor([True, False, True, True, False]).expand(x.shape)
    for method, route in (("sir", "multinomial"), ("mwg", "rand_like")):
        plain = completions(model, x, mask, method)
        routed.clear()
        with noise_from_cpu("meta"):
            through_route = completions(model, x, mask, method)
        assert torch.equal(through_route, plain), method
        assert routed[route] > 0 and routed["_standard_normal"] > 0, (method, routed)
        assert torch.equal(plain[:, mask], x.expand_as(plain)[:, mask])  # observed cells kept


def completions(model, x, mask, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the health check of a short run
        return complete(model.model, model.guide, x, mask, num_completions=3, method=method,
                        num_sweeps=4, num_particles=16, seed=0).samples


# ----------------------------------------------------------------------------------------------
# CPU against CUDA (skipped without a GPU)


@contextlib.contextmanager
def float64():
    """float64 as torch's default dtype within (CPU and GPU rounding then cannot flip an HMC
    accept or a solver's step between the devices)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def discrete_estimate(device):
    pyro.clear_param_store()  # each device's run on its own parameters
    x = discrete_data().to(device)
    return estimate_log_marginal(discrete_model, discrete_guide, x, num_samples=300,
                                 seed=0).log_px.cpu()


def ais_estimates(device):
    pyro.clear_param_store()  # each device's run on its own parameters
    model, x = ppca(device)
    options = dict(num_samples=8, num_temperatures=30, leapfrog_steps=3)
    forward = ais_log_marginal(model.model, None, x, seed=3, **options).log_px
    with float64():  # BDMC simulates on a template of the default dtype
        sandwich = bdmc(model.model, num_data=35, data_shape=(5,), device=device, seed=2,
                        **options)
    return forward.cpu(), sandwich.lower.cpu(), sandwich.upper.cpu(), sandwich.x.cpu()


def gaps_estimates(device):
    pyro.clear_param_store()  # each device's run on its own parameters
    x = closed_form.make_data(20).double().to(device)
    with float64():  # q*'s table
        gaps = amortization_gaps(linear_model, linear_guide, x, encoder=linear_encoder,
                                 num_samples=256, elbo_samples=64, seed=0)
    return torch.stack([gaps.log_px, gaps.elbo_optimal, gaps.elbo_amortized]).cpu()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_seeded_discrete_latent_estimate_is_the_same_on_cpu_and_cuda():
    """IWAE with a Bernoulli and a OneHotCategorical guide (float64): the same per-row log p(x)
    on the CPU and CUDA up to float error."""
    assert torch.allclose(discrete_estimate("cuda"), discrete_estimate("cpu"), rtol=1e-4, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_ais_and_bdmc_are_the_same_on_cpu_and_cuda():
    """AIS (its HMC momenta and accept draws, its prior draws) and BDMC (its simulated data, both
    directions) on PPCA in float64: the same on the CPU and CUDA up to float error."""
    for on_cuda, on_cpu in zip(ais_estimates("cuda"), ais_estimates("cpu")):
        assert torch.allclose(on_cuda, on_cpu, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_amortization_gaps_are_the_same_on_cpu_and_cuda():
    """amortization_gaps on the linear-Gaussian program in float64: log p(x), ELBO(q*) and
    ELBO(q amortized) per row the same on the CPU and CUDA up to float error."""
    assert torch.allclose(gaps_estimates("cuda"), gaps_estimates("cpu"), rtol=1e-4, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_completions_are_the_same_on_cpu_and_cuda():
    """complete (SIR and MwG) on PPCA in float64, and a mixture's exact conditional drawn with a
    CPU generator: the same completions on the CPU and CUDA up to float error."""
    mask = torch.tensor([True, False, True, True, False])
    for method in ("sir", "mwg"):
        on_device = {}
        for device in ("cuda", "cpu"):
            pyro.clear_param_store()
            model, x = ppca(device)
            on_device[device] = completions(model, x, mask.to(device).expand(x.shape),
                                            method).cpu()
        assert torch.allclose(on_device["cuda"], on_device["cpu"], rtol=1e-4, atol=1e-6), method
    mixture = MixtureOfGaussians(2, 3)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[True, False, True]] * 4)
    on_cpu = mixture_completion(mixture, x, mask, num_completions=5,
                                generator=torch.Generator().manual_seed(0)).samples
    on_cuda = mixture_completion(mixture.cuda(), x.cuda(), mask.cuda(), num_completions=5,
                                 generator=torch.Generator().manual_seed(0)).samples
    assert torch.allclose(on_cuda.cpu(), on_cpu, rtol=1e-4, atol=1e-6)
