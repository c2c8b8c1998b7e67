import pyro
import pyro.poutine as poutine
import pytest
import torch

from ppl_lvm.models.vae import VAE, Encoder


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_model_and_guide_shapes(likelihood):
    torch.manual_seed(0)
    vae = VAE(30, z_dim=3, hidden_dim=(16, 8), likelihood=likelihood)
    x = torch.rand(7, 30).round()
    pyro.clear_param_store()
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    assert model_trace.nodes["z"]["value"].shape == (7, 3)
    assert model_trace.nodes["x"]["log_prob"].shape == (7,)  # one number per datapoint
    assert guide_trace.nodes["z"]["log_prob"].shape == (7,)
    assert model_trace.nodes["x"]["fn"].event_shape == (30,)
    frames = [f.name for f in model_trace.nodes["z"]["cond_indep_stack"]]
    assert frames == ["data"]
    assert vae.reconstruct(x).shape == (7, 30) and vae.sample(5).shape == (5, 30)


def test_bernoulli_log_likelihood_matches_hand_computation():
    torch.manual_seed(0)
    vae = VAE(10, z_dim=2, hidden_dim=8)
    x = torch.rand(4, 10).round()
    z = torch.randn(4, 2)
    logits = vae.decoder.net(z)
    expected = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    assert torch.allclose(vae.decoder(z).to_event(1).log_prob(x), expected, atol=1e-5)


def test_gaussian_decoder_has_neural_mean_and_scale():
    torch.manual_seed(0)
    vae = VAE(6, z_dim=2, hidden_dim=8, likelihood="gaussian")
    z = torch.randn(5, 2)
    px = vae.decoder(z)
    assert px.loc.shape == px.scale.shape == (5, 6)
    assert (px.scale >= vae.decoder.min_scale).all()
    assert px.scale.std(0).sum() > 0  # the scale depends on z


def test_particle_dims_broadcast():
    # estimators wrap model and guide in a particle plate at dim -2: shapes must broadcast
    vae = VAE(12, z_dim=2, hidden_dim=8)
    x = torch.rand(5, 12).round()
    with pyro.plate("particles", 3, dim=-2):
        trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace)).get_trace(x)
    model_trace.compute_log_prob()
    assert model_trace.nodes["x"]["log_prob"].shape == (3, 5)


def test_encoder_scale_is_positive_and_bad_config_errors():
    loc, scale = Encoder(5, 2, 4)(torch.randn(3, 5) * 100)
    assert (scale > 0).all() and loc.shape == (3, 2)
    with pytest.raises(ValueError, match="unknown likelihood"):
        VAE(5, likelihood="poisson")
    with pytest.raises(ValueError, match=">= 1"):
        VAE(0)


@pytest.mark.cuda
def test_vae_on_cuda():
    vae = VAE(12, z_dim=2, hidden_dim=8).cuda()
    x = torch.rand(5, 12, device="cuda").round()
    trace = poutine.trace(vae.model).get_trace(x)
    assert trace.nodes["z"]["value"].is_cuda
    assert vae.sample(3).is_cuda
