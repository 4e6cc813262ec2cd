"""The latent-diffusion first stage (ddpmlab.networks.autoencoder) and the latent denoiser: shapes, the KL term,
vector quantisation, the scale factor. Pure torch, tiny networks."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from conftest import compose_cfg
from ddpmlab.diffusion import GaussianDiffusion
from ddpmlab.diffusion.latent import LatentDenoiser
from ddpmlab.diffusion.schedules import linear_betas
from ddpmlab.networks import UNet
from ddpmlab.networks.autoencoder import Autoencoder, DiagonalGaussian, PatchDiscriminator, VectorQuantizer


def tiny_ae(regularizer="kl", channel_mult=(1, 2), image_size=16, **kw):
    return Autoencoder(
        in_channels=1,
        image_size=image_size,
        base_channels=8,
        channel_mult=channel_mult,
        num_res_blocks=1,
        latent_channels=3,
        regularizer=regularizer,
        num_codes=16,
        num_groups=4,
        **kw,
    )


@pytest.mark.parametrize("regularizer", ["kl", "vq"])
@pytest.mark.parametrize("channel_mult,f", [((1, 2), 2), ((1, 2, 2), 4), ((1, 2, 2, 4), 8)])
def test_encode_decode_shapes_for_each_factor(regularizer, channel_mult, f):
    ae = tiny_ae(regularizer, channel_mult, image_size=32).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    z = ae.encode(x)
    assert ae.factor == f and z.shape == (2, 3, 32 // f, 32 // f) == (2, *ae.latent_shape)
    assert ae.decode(z).shape == x.shape
    x_hat, reg = ae(x)
    assert x_hat.shape == x.shape and reg.shape == (2,)


@pytest.mark.parametrize("name,f", [("kl_f2", 2), ("kl_f4", 4), ("kl_f8", 8), ("vq_f4", 4), ("vq_f8", 8)])
def test_every_first_stage_config_builds_its_factor(name, f):
    from hydra.utils import instantiate

    cfg = compose_cfg("train", [f"first_stage={name}", "data.image_size=32"])
    ae = instantiate(cfg.first_stage.net)
    assert ae.factor == f and ae.regularizer == name[:2]
    assert ae.encode(torch.zeros(1, 1, 32, 32)).shape == (1, 4, 32 // f, 32 // f)


def test_kl_term_matches_the_closed_form_of_torch_distributions():
    moments = torch.randn(3, 8, 4, 4)
    q = DiagonalGaussian(moments)
    expected = kl_divergence(Normal(q.mean, q.std), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(q.kl(), expected)
    zero = DiagonalGaussian(torch.zeros(1, 8, 2, 2))  # N(0, I) itself
    assert zero.kl().abs().max() < 1e-6


def test_reparameterised_sample_has_the_posterior_moments():
    moments = torch.cat([torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 2 * torch.log(torch.tensor(0.5)))], 1)
    q = DiagonalGaussian(moments.expand(20000, 2, 1, 1))
    z = q.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean() - 2.0) < 0.02 and abs(z.std() - 0.5) < 0.02


def codebook_quantizer(ema_decay=None):
    vq = VectorQuantizer(num_codes=3, dim=2, beta=0.25, ema_decay=ema_decay)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.5]]))
        if ema_decay is not None:
            vq.ema_sum.copy_(vq.codebook.weight)
    return vq


def test_vq_assigns_the_nearest_code_and_the_straight_through_gradient():
    vq = codebook_quantizer()
    z_e = torch.tensor([[0.9, 1.2], [-1.5, 0.4], [0.1, -0.2], [0.6, 0.6]]).t().reshape(1, 2, 2, 2)
    brute = torch.cdist(z_e.permute(0, 2, 3, 1).reshape(-1, 2), vq.codebook.weight).argmin(1)
    assert vq.nearest(z_e).flatten().tolist() == brute.tolist() == [1, 2, 0, 1]
    z_e.requires_grad_(True)
    out = vq(z_e)
    torch.testing.assert_close(out.z_q, vq.lookup(out.indices))  # forward: the codes
    out.z_q.sum().backward()
    torch.testing.assert_close(z_e.grad, torch.ones_like(z_e))  # backward: identity to z_e


def test_vq_loss_is_codebook_plus_beta_commitment_and_pulls_codes_towards_the_encoder():
    vq = codebook_quantizer()
    z_e = torch.tensor([[0.5, 1.5]]).reshape(1, 2, 1, 1).requires_grad_(True)  # nearest: code 1 (1, 1)
    out = vq(z_e)
    e = torch.tensor([1.0, 1.0]).reshape(1, 2, 1, 1)
    mse = F.mse_loss(z_e.detach(), e)
    torch.testing.assert_close(out.loss, (1 + 0.25) * mse)  # VQ-VAE eq. (3): ||sg[z_e]-e||^2 + beta ||z_e-sg[e]||^2
    out.loss.backward()
    # commitment gradient on z_e only: beta * d/dz mean((z - e)^2)
    torch.testing.assert_close(z_e.grad, 0.25 * 2 * (z_e.detach() - e) / 2)
    grad = vq.codebook.weight.grad
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0  # only the assigned code moves
    torch.testing.assert_close(grad[1], (2 * (e - z_e.detach()) / 2).flatten())  # towards z_e


def test_vq_ema_codebook_update_follows_the_moving_averages():
    d = 0.9
    vq = codebook_quantizer(ema_decay=d).train()
    z_e = torch.tensor([[0.8, 1.2], [1.4, 0.8], [-1.8, 0.4]]).t().reshape(1, 2, 1, 3)  # codes 1, 1, 2
    e_before = vq.lookup(vq.nearest(z_e))
    out = vq(z_e)
    torch.testing.assert_close(out.loss, 0.25 * F.mse_loss(z_e, e_before))  # commitment only, at the old codes
    assert out.indices.flatten().tolist() == [1, 1, 2]
    count = torch.tensor([d, d + (1 - d) * 2, d + (1 - d) * 1])  # N_k <- d N_k + (1 - d) n_k, from N = 1
    sums = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.5]]) * d
    sums[1] += (1 - d) * torch.tensor([0.8 + 1.4, 1.2 + 0.8])
    sums[2] += (1 - d) * torch.tensor([-1.8, 0.4])
    torch.testing.assert_close(vq.ema_count, count)
    torch.testing.assert_close(vq.ema_sum, sums)
    n, eps = count.sum(), vq.eps
    smoothed = (count + eps) / (n + 3 * eps) * n
    torch.testing.assert_close(vq.codebook.weight, sums / smoothed[:, None])
    assert not vq.codebook.weight.requires_grad
    before = vq.codebook.weight.clone()
    vq.eval()(z_e)  # no update outside training
    torch.testing.assert_close(vq.codebook.weight, before)


def test_vq_latent_of_the_second_stage_is_z_e_and_decode_quantises():
    ae = tiny_ae("vq").eval()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    z_e = ae.encode(x)
    torch.testing.assert_close(z_e, ae.quant_conv(ae.encoder(x)))
    q = ae.quantizer(z_e).z_q
    torch.testing.assert_close(ae.decode(z_e), ae.decoder(ae.post_quant_conv(q)))
    mean, std = ae.moments(x)
    assert torch.equal(std, torch.zeros_like(std))


def test_patch_discriminator_gives_a_map_of_logits():
    d = PatchDiscriminator(1, 8, num_layers=2, num_groups=4)
    assert d(torch.zeros(2, 1, 32, 32)).shape[:2] == (2, 1)


def latent_denoiser(first_stage):
    net = UNet(
        in_channels=3,
        image_size=8,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        dropout=0.0,
        num_heads=1,
        num_groups=4,
    )
    return LatentDenoiser(net, GaussianDiffusion(linear_betas(50)), first_stage)


def test_scale_factor_is_one_over_std_and_encode_decode_apply_it():
    ae = tiny_ae("kl").eval()
    den = latent_denoiser(ae)
    assert torch.isnan(den.scale_factor)  # nothing is assumed before it is fitted
    latents = 3.0 * torch.randn(4096, 3, 8, 8)
    s = den.fit_scale_factor(latents)
    assert abs(s - 1 / 3) < 0.01
    assert abs((s * latents).std() - 1.0) < 0.01
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    mean, _ = ae.moments(x)
    z = den.scaled_sample(mean, torch.zeros_like(mean))
    torch.testing.assert_close(z, s * mean)
    torch.testing.assert_close(den.decode(z), ae.decode(mean))
    assert "scale_factor" in den.state_dict()  # travels in every checkpoint


def test_latent_denoiser_keeps_its_first_stage_frozen_and_in_eval_mode():
    den = latent_denoiser(tiny_ae("vq"))
    den.train()
    assert den.net.training and not den.first_stage.training
    assert not any(p.requires_grad for p in den.first_stage.parameters())
    assert {id(p) for p in den.trainable_parameters()} == {id(p) for p in den.net.parameters()}
    assert den.x0_range is None  # samplers do not clip latents to [-1, 1]


@pytest.mark.parametrize("experiment", ["autoencoder_mnist", "classifier_digits"])
def test_a_resumed_first_stage_or_classifier_overwrites_last_ckpt(tmp_path, experiment):
    """Every kind of run overwrites last.ckpt when it resumes, also in a run directory that was moved (Lightning then
    forgets which file it wrote last); none writes last-v1.ckpt beside it, which the next resume would pass over."""
    import shutil

    from ddpmlab.training import train
    from test_latent import AE

    args = [o for o in AE if not o.startswith(("trainer.max_steps", "trainer.val_check", "callbacks."))]
    if experiment != "autoencoder_mnist":  # the same tiny sizes, for the noisy classifier
        args = [f"experiment={experiment}", "data.batch_size=32", "model.base_channels=8", "logger=csv"]
        args += ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    args += ["trainer.val_check_interval=2"]
    train(compose_cfg("train", [*args, "trainer.max_steps=2"], tmp_path / "run"))
    moved = shutil.copytree(tmp_path / "run", tmp_path / "moved")
    train(compose_cfg("train", [*args, "trainer.max_steps=4", "ckpt_path=last"], moved))
    assert sorted(p.name for p in (moved / "checkpoints").glob("last*")) == ["last.ckpt"]
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
