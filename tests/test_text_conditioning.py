"""Text conditioning's core: the word-level tokenizer, the learned encoder (sequence and pooled), LDM's
SpatialTransformer cross-attention in the U-Net, and the caption bank training draws from."""

from __future__ import annotations

import pytest
import torch

from ddpmlab.conditioning import CaptionBank, placeholder, text_cond
from ddpmlab.diffusion import Denoiser, GaussianDiffusion, linear_betas
from ddpmlab.errors import ConfigError
from ddpmlab.networks import TransformerTextEncoder, UNet
from ddpmlab.networks.layers import SpatialTransformer
from ddpmlab.samplers import GuidedDenoiser, Sampler, generate
from ddpmlab.text import WordTokenizer

CAPTIONS = ["a 3 left of a 7", "seven to the right of three", "3 then 7", "a 7 left of a 3"]


def encoder(pooled: bool = False, seed: int = 0) -> TransformerTextEncoder:
    torch.manual_seed(seed)
    return TransformerTextEncoder(WordTokenizer.build_vocab(CAPTIONS), max_length=8, dim=32, depth=2, heads=4,
                                  pooled=pooled)  # fmt: skip


def text_unet(pooled: bool = False, seed: int = 0) -> UNet:
    enc = encoder(pooled, seed)
    return UNet(in_channels=1, image_size=[8, 16], base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(), dropout=0.0, num_groups=8, num_heads=2, text_encoder=enc,
                context_resolutions=[8, 4]).eval()  # fmt: skip


def test_word_tokenizer_pads_masks_and_names_what_it_refuses():
    tok = WordTokenizer(WordTokenizer.build_vocab(CAPTIONS), max_length=6)
    tokens, mask = tok(["A 3, left of a 7!", ""])
    assert tokens.shape == (2, 6) and mask.tolist()[0] == [True] * 6 and not mask[1].any()
    assert tok.decode(tokens, mask) == ["a 3 left of a 7", ""]
    with pytest.raises(ConfigError, match=r"never saw in training: '4', 'nine'"):
        tok(["a 4 left of nine"])
    with pytest.raises(ConfigError, match=r"7 words, more than the text encoder's context length of 6"):
        tok(["a 3 left of a 7 then"])
    with pytest.raises(ConfigError, match="distinct lowercase words"):
        WordTokenizer(["a", "a"], 4)


def test_encoder_start_vector_keeps_the_empty_caption_attendable_and_padding_changes_nothing():
    enc = encoder().eval()
    tokens, mask = enc.tokenizer(["3 then 7", ""])
    context, cmask = enc(tokens, mask)
    assert context.shape == (2, 9, 32) and cmask[:, 0].all() and cmask.sum(1).tolist() == [4, 1]
    assert context.isfinite().all()
    # The real tokens' outputs do not depend on what the padding holds
    garbage = tokens.clone()
    garbage[~mask] = 5
    again, _ = enc(garbage, mask)
    assert torch.allclose(again[cmask], context[cmask], atol=1e-5)
    # Order matters to the sequence: "3 then 7" and "7 then 3" give different contexts
    swapped, _ = enc(*enc.tokenizer(["7 then 3"]))
    assert (swapped[0, 1:4] - context[0, 1:4]).abs().max() > 1e-3


def test_pooled_encoder_gives_one_vector_and_the_unet_has_no_cross_attention():
    net = text_unet(pooled=True)
    assert not any(isinstance(m, SpatialTransformer) for m in net.modules()) and net.pooled_proj is not None
    context, cmask = net.text_encoder(*net.text_encoder.tokenizer(["3 then 7", ""]))
    assert context.shape == (2, 1, 32) and cmask.all()
    d = Denoiser(net, GaussianDiffusion(linear_betas(50)))
    x, t = torch.randn(1, 1, 8, 16).expand(2, -1, -1, -1), torch.tensor([7, 7])
    out = net(x, t, text_cond(d, ["3 then 7", "7 then 3"]))  # positions tell the orders apart, even pooled
    assert out.shape == (2, 1, 8, 16) and (out[0] - out[1]).abs().max() > 1e-4


def test_spatial_transformer_starts_as_identity_and_never_reads_masked_context():
    torch.manual_seed(0)
    st = SpatialTransformer(16, context_dim=12, num_heads=2, num_groups=4)
    x, context = torch.randn(3, 16, 4, 8), torch.randn(3, 5, 12)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(st(x, context, mask), x)  # zero-initialised projection out: the identity at init
    torch.nn.init.normal_(st.proj_out.weight)
    out = st(x, context, mask)
    assert not torch.allclose(out, x)
    changed = context.clone()
    changed[~mask] = 100.0  # what the mask hides may hold anything
    assert torch.allclose(st(x, changed, mask), out, atol=1e-5)
    changed[0, 1] += 1.0  # a visible token changes the output of its own sample only
    diff = (st(x, changed, mask) - out).flatten(1).abs().amax(1)
    assert diff[0] > 1e-4 and diff[1:].max() < 1e-6


def test_context_positions_let_identical_tokens_tell_their_places_apart():
    torch.manual_seed(0)
    x, context = torch.ones(2, 16, 4, 8) * torch.randn(2, 16, 1, 1), torch.randn(2, 3, 12)  # every position alike
    for positions in (None, (4, 8)):
        st = SpatialTransformer(16, context_dim=12, num_heads=2, num_groups=4, positions=positions)
        torch.nn.init.normal_(st.proj_out.weight)
        out = st(x, context)
        spread = (out - out.mean((2, 3), keepdim=True)).abs().max()
        assert (spread > 1e-3) == (positions is not None)  # LDM's tokens: alike in, alike out
    with pytest.raises(ValueError, match=r"positions learned for \(4, 8\), got a 2x4 feature map"):
        st(torch.randn(1, 16, 2, 4), context[:1])
    net = UNet(in_channels=1, image_size=[8, 16], base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(), num_groups=8, num_heads=2, text_encoder=encoder(), context_resolutions=[4],
               context_positions=True)  # fmt: skip
    shapes = sorted(tuple(m.pos_embed.shape) for m in net.modules() if isinstance(m, SpatialTransformer))
    assert shapes == [(1, 32, 32)] * 4  # 4x8 tokens of 32 channels: one block down, the middle, two up
    assert net(torch.randn(2, 1, 8, 16), torch.tensor([1, 2])).shape == (2, 1, 8, 16)


def test_unet_takes_non_square_images_and_the_caption_changes_the_output():
    net = text_unet()
    for m in net.modules():  # leave the zero initialisation so the caption reaches the output
        if isinstance(m, SpatialTransformer):
            torch.nn.init.normal_(m.proj_out.weight, std=0.2)
    d = Denoiser(net, GaussianDiffusion(linear_betas(50)))
    assert d.sample_shape == (1, 8, 16) and d.tokenizer is net.text_encoder.tokenizer
    x, t = torch.randn(2, 1, 8, 16), torch.tensor([5, 30])
    a = net(x, t, text_cond(d, ["a 3 left of a 7", "a 3 left of a 7"]))
    b = net(x, t, text_cond(d, ["a 7 left of a 3", "a 7 left of a 3"]))
    null = net(x, t, text_cond(d, ["a 3 left of a 7"] * 2).null())
    assert (a - b).abs().max() > 1e-4 and (a - null).abs().max() > 1e-4
    assert torch.allclose(null, net(x, t, text_cond(d, ["", ""])), atol=1e-6)  # null = the empty caption
    assert torch.allclose(null, net(x, t, placeholder(d, 2)), atol=1e-6)
    with pytest.raises(ConfigError, match="each side must be a multiple of 2"):
        UNet(image_size=[8, 9], channel_mult=(1, 2))


def test_guided_sampling_of_a_text_model_with_every_sampler():
    d = Denoiser(text_unet(), GaussianDiffusion(linear_betas(50)))
    cond = text_cond(d, ["3 then 7", "seven to the right of three"])
    for sampler in (Sampler("ddpm", 5), Sampler("ddim", 5), Sampler("dpm_solver", 4)):
        x0 = generate(GuidedDenoiser(d, 2.0), sampler, 2, seed=0, cond=cond)
        assert x0.shape == (2, 1, 8, 16) and x0.isfinite().all()


def test_text_cond_on_a_model_without_text_is_refused():
    d = Denoiser(UNet(in_channels=1, image_size=8, base_channels=16, channel_mult=(1, 2), num_groups=8),
                 GaussianDiffusion(linear_betas(50)))  # fmt: skip
    with pytest.raises(ConfigError, match="prompt= needs a text-conditioned model"):
        text_cond(d, ["a 3 left of a 7"])


def test_caption_bank_draws_each_items_own_captions_uniformly():
    tok = WordTokenizer(WordTokenizer.build_vocab(CAPTIONS), 8)
    bank = CaptionBank([CAPTIONS[:3], CAPTIONS[3:]], tok)
    keys = torch.tensor([0] * 3000 + [1] * 10)
    cond = bank.draw(keys, torch.Generator().manual_seed(0))
    said = tok.decode(cond.tokens, cond.token_mask)
    assert set(said[3000:]) == {CAPTIONS[3]}
    counts = [said[:3000].count(c) for c in CAPTIONS[:3]]
    assert min(counts) > 900, counts  # about 1000 each
    with pytest.raises(ConfigError, match="at least one caption"):
        CaptionBank([CAPTIONS, []], tok)


# ------------------------------------------------------------------ on a GPU: cross-attention through the fast paths
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_a_text_model_trains_bf16_compiled_and_samples_through_cuda_graphs_like_eager(tmp_path):
    import copy

    from conftest import TINY, compose_cfg
    from ddpmlab.api import load_denoiser
    from ddpmlab.training import train

    overrides = TINY + ["experiment=text_digits", "model=unet_tiny", "trainer=gpu_fast", "trainer.accelerator=gpu"]
    overrides += ["trainer.devices=1", "trainer.max_steps=20", "perf.compile=true", "perf.channels_last=true"]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    train(cfg)  # bf16-mixed, torch.compile (CUDA graphs), the caption bank gathered on the device
    eager, _ = load_denoiser(tmp_path / "run" / "checkpoints" / "last.ckpt")
    eager = eager.cuda().eval()
    cond = text_cond(eager, ["a 4 left of a 9", "seven to the right of three"] * 8, device="cuda")
    sampler = Sampler("ddim", num_steps=10)
    expected = generate(GuidedDenoiser(eager, 3.0), sampler, 16, seed=0, cond=cond)
    fast = copy.deepcopy(eager)
    perf = {"compile": True, "channels_last": True, "tf32": False, "precision": "fp32"}
    for _ in range(2):  # the second call replays the captured graphs
        got = generate(GuidedDenoiser(fast, 3.0), sampler, 16, seed=0, cond=cond, perf=perf)
    assert fast.net._compiled_call_impl is not None
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    bf16 = generate(GuidedDenoiser(copy.deepcopy(eager), 3.0), sampler, 16, seed=0, cond=cond,
                    perf={**perf, "precision": "bf16"})  # fmt: skip
    assert torch.isfinite(bf16).all() and (bf16 - expected).abs().mean() < 0.05
