"""The conditioning contract (ddpmlab.conditioning.Cond) and image conditioning by concatenation."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_denoiser
from ddpmlab.conditioning import NULL_LABEL, Cond, Inpainting, SuperResolution, make_task, placeholder
from ddpmlab.errors import ConfigError
from ddpmlab.images import to_uint8
from ddpmlab.lit.module import DiffusionModule, check_task
from ddpmlab.metrics.fid import generate_chunks
from ddpmlab.objectives import SimpleLoss
from ddpmlab.samplers import GuidedDenoiser, Sampler, generate


def _cond(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Cond(labels=torch.arange(n), image=torch.randn(n, 1, 4, 4, generator=g))


# ------------------------------------------------------------------ the container
def test_cond_slices_moves_repeats_and_concatenates_every_field_together():
    c = _cond(4)
    assert len(c) == 4 and Cond.of(c) is c and Cond.of(None) is None
    assert torch.equal(Cond.of(torch.tensor([3, 1])).labels, torch.tensor([3, 1]))  # a label tensor: the old contract
    part = c[1:3]
    assert part.labels.tolist() == [1, 2] and torch.equal(part.image, c.image[1:3])
    r = c.repeat_interleave(3)
    assert r.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and torch.equal(r.image[3], c.image[1])
    both = Cond.cat([c, c.null()])
    assert len(both) == 8 and both.image_null.tolist() == [False] * 4 + [True] * 4
    assert both.labels[4:].tolist() == [NULL_LABEL] * 4 and torch.equal(both.image[:4], c.image)
    with pytest.raises(ValueError, match="batch size"):
        len(Cond(labels=torch.arange(3), image=torch.zeros(2, 1, 4, 4)))
    with pytest.raises(TypeError, match="Cond"):
        Cond.of([1, 2])


def test_dropout_nulls_each_kind_only_where_asked():
    c = Cond(labels=torch.arange(3), image=torch.ones(3, 1, 2, 2), tokens=torch.ones(3, 5).long(),
             token_mask=torch.ones(3, 5, dtype=torch.bool))  # fmt: skip
    d = c.drop(torch.tensor([True, False, True]))
    assert d.labels.tolist() == [NULL_LABEL, 1, NULL_LABEL]
    assert d.image_null.tolist() == [True, False, True] and torch.equal(d.image, c.image)  # the net zeroes it
    assert d.token_mask.sum(1).tolist() == [0, 5, 0]  # the empty sequence
    assert d.drop(torch.tensor([False, True, False])).image_null.tolist() == [True, True, True]  # flags accumulate


# ------------------------------------------------------------------ the network
def test_the_unet_concatenates_the_image_resized_bicubic_and_needs_it():
    den = tiny_denoiser(cond_channels=1)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 10)
    low = torch.randn(4, 1, 4, 4)
    up = F.interpolate(low, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        a = den(x, t, Cond(image=low)).eps_hat
        b = den(x, t, Cond(image=up)).eps_hat
        c = den(x, t, Cond(image=-low)).eps_hat
    assert torch.allclose(a, b, atol=1e-6)  # a low-resolution input is the bicubic upsampling of it
    assert (a - c).abs().max() > 1e-4  # the output depends on the image
    for bad in (None, Cond(labels=torch.zeros(4).long())):
        with pytest.raises(ConfigError, match="conditioned on an image"):
            den(x, t, bad)
    with pytest.raises(ConfigError, match=r"\[B,1,h,w\]"):
        den(x, t, Cond(image=torch.zeros(4, 3, 8, 8)))


def test_a_null_image_is_zeroed_and_flagged_so_its_content_does_not_matter():
    den = tiny_denoiser(cond_channels=1)
    with torch.no_grad():
        den.net.image_null_embed.normal_()  # trained, the flag's embedding is not zero
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 20)
    null = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        a = den(x, t, Cond(image=torch.randn(2, 1, 8, 8), image_null=null)).eps_hat
        b = den(x, t, Cond(image=torch.randn(2, 1, 8, 8), image_null=null)).eps_hat
        zero = den(x, t, Cond(image=torch.zeros(2, 1, 8, 8))).eps_hat
    assert torch.equal(a, b)
    assert (a - zero).abs().max() > 1e-4  # "no image" is not the same as a black image: the flag tells them apart


def test_labels_keep_their_meaning_the_null_label_is_the_models_own():
    den = tiny_denoiser(num_classes=10)
    with torch.no_grad():
        den.net.label_embed.weight.normal_()
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 5)
    with torch.no_grad():
        as_tensor = den(x, t, torch.tensor([1, 2, 3])).eps_hat
        as_cond = den(x, t, Cond(labels=torch.tensor([1, 2, 3]))).eps_hat
        null = den(x, t, Cond(labels=torch.full((3,), NULL_LABEL))).eps_hat
        old_null = den(x, t, torch.full((3,), 10)).eps_hat  # the null label as the model stores it
        none = den(x, t, None).eps_hat
    assert torch.equal(as_tensor, as_cond)
    assert torch.equal(null, old_null) and torch.equal(null, none)


def test_classifier_free_guidance_on_an_image_mixes_the_conditional_and_null_predictions():
    den = tiny_denoiser(cond_channels=1)
    with torch.no_grad():
        den.net.image_null_embed.normal_()
    x, t, c = torch.randn(2, 1, 8, 8), torch.full((2,), 30), Cond(image=torch.randn(2, 1, 4, 4))
    w = 2.0
    with torch.no_grad():
        guided = GuidedDenoiser(den, w)(x, t, c).eps_hat
        e_c, e_u = den(x, t, c).eps_hat, den(x, t, c.null()).eps_hat
        plain = GuidedDenoiser(den, 0.0)(x, t, c).eps_hat
    assert torch.allclose(guided, (1 + w) * e_c - w * e_u, atol=1e-5)  # Ho & Salimans 2022, eq. 6
    assert torch.equal(plain, e_c)


@pytest.mark.parametrize("algorithm", ["ddpm", "ddim", "dpm_solver"])
def test_every_sampler_draws_for_its_condition_batch_by_batch(algorithm):
    den = tiny_denoiser(cond_channels=1)
    cond = Cond(image=torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(3)))
    sampler = Sampler(algorithm, num_steps=5)
    whole = generate(den, sampler, 5, seed=1, batch_size=5, cond=cond)
    again = generate(den, sampler, 5, seed=1, batch_size=5, cond=cond)
    in_batches = generate(den, sampler, 5, seed=1, batch_size=2, cond=cond)
    other = generate(den, sampler, 5, seed=1, batch_size=5, cond=cond.map(lambda v: -v))
    assert torch.equal(whole, again) and whole.shape == (5, 1, 8, 8)
    one = generate(den, sampler, 1, seed=1, batch_size=1, cond=cond[:1])
    if algorithm != "ddpm":  # deterministic given x_T (ancestral noise is drawn for the whole batch at each step)
        assert torch.allclose(in_batches[:1], one, atol=1e-4)  # batch 1 drew sample 0 for condition 0 (float noise)
    assert (whole - other).abs().max() > 1e-3
    with pytest.raises(ValueError, match="conditions for"):
        generate(den, sampler, 4, cond=cond)


def test_fid_chunks_cycle_the_condition_pool_the_same_however_they_are_shared():
    den = tiny_denoiser(cond_channels=1)
    pool = Cond(image=torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)))
    sampler = Sampler("ddim", num_steps=3)
    at_once = generate_chunks(den, sampler, [(0, 4), (1, 3)], 7, conds=pool, chunk_size=4)
    one = generate_chunks(den, sampler, [(1, 3)], 7, conds=pool, chunk_size=4)
    assert torch.equal(at_once[4:], one)
    # sample 4 is chunk 1's first: condition 4 % 3 = 1, drawn from seed 7 + 1
    direct = generate(den, sampler, 3, seed=8, batch_size=3, cond=pool[torch.tensor([1, 2, 0])])
    assert torch.equal(one.cpu(), direct.clamp(-1, 1))


def test_placeholder_conditions_fit_the_model():
    assert placeholder(tiny_denoiser(), 2) is None
    p = placeholder(tiny_denoiser(num_classes=3, cond_channels=2), 2)
    assert p.labels.tolist() == [0, 0] and p.image.shape == (2, 2, 8, 8)


# ------------------------------------------------------------------ the tasks
def test_super_resolution_downsamples_by_block_means():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    low = SuperResolution(2)(x)
    assert low.shape == (1, 1, 2, 2) and low[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4
    with pytest.raises(ConfigError, match="multiple of 3"):
        SuperResolution(3)(x)
    with pytest.raises(ConfigError, match="factor >= 2"):
        SuperResolution(1)


def test_inpainting_condition_is_the_masked_image_and_the_mask_from_every_kind():
    task = Inpainting(num_strokes=64)
    x = torch.rand(2000, 1, 8, 8) + 0.5  # no pixel is 0: the hole shows as 0
    c = task(x, torch.Generator().manual_seed(0))
    keep = c[:, 1:]
    assert c.shape == (2000, 2, 8, 8) and set(keep.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(c[:, :1], x * keep)
    bank = task.bank((8, 8), "cpu")
    left, centre = bank[0, 0], bank[1, 0]
    is_left = (keep[:, 0] == left).all(-1).all(-1)
    is_centre = (keep[:, 0] == centre).all(-1).all(-1)
    assert abs(is_left.float().mean() - 1 / 3) < 0.05 and abs(is_centre.float().mean() - 1 / 3) < 0.05
    strokes = keep[~(is_left | is_centre)]
    assert len({tuple(s.flatten().tolist()) for s in strokes}) > 30  # many different stroke masks
    again = task(x, torch.Generator().manual_seed(0))
    assert torch.equal(c, again)  # reproducible from the generator
    assert task.channels(3) == 4 and SuperResolution(2).channels(3) == 3


def test_task_configs_and_the_networks_input_must_agree():
    assert make_task(None) is None and make_task({"name": "sr", "factor": 4}).factor == 4
    with pytest.raises(ConfigError, match="task.name"):
        make_task({"name": "colorize"})
    with pytest.raises(ConfigError, match="task.masks"):
        make_task({"name": "inpaint", "masks": ["nowhere"]})
    with pytest.raises(ConfigError, match="model.cond_channels=2"):
        check_task(Inpainting(), 1, 1)
    with pytest.raises(ConfigError, match="model.cond_channels=0"):
        check_task(None, 1, 1)
    check_task(SuperResolution(2), 3, 3)


def test_the_module_builds_the_image_condition_from_each_batch():
    module = DiffusionModule(tiny_denoiser(cond_channels=2), SimpleLoss(), torch.optim.Adam, p_uncond=0.5,
                             task=Inpainting(num_strokes=8), data_channels=1)  # fmt: skip
    x0, y = torch.rand(64, 1, 8, 8) + 0.5, torch.zeros(64).long()
    train = module.condition((x0, y), torch.Generator().manual_seed(0), train=True)
    assert train.labels is None and train.image.shape == (64, 2, 8, 8)
    assert 10 < int(train.image_null.sum()) < 54  # condition dropout at p_uncond
    val = module.condition((x0, y), torch.Generator().manual_seed(0), train=False)
    assert val.image_null is None and torch.equal(val.image, train.image)  # the same masks, no dropout
    given = torch.zeros(64, 2, 8, 8)
    assert module.condition((x0, y, given), None, train=False).image is given  # a latent run's precomputed image
    dataset = [(x0[i], y[i]) for i in range(10)]
    cond, originals = module.fixed_conditions(dataset, 4, seed=0)
    assert len(cond) == 4 and torch.equal(originals, x0[:4])


# ------------------------------------------------------------------ on a GPU: fast paths, the concatenated input
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_an_image_conditioned_model_trains_bf16_compiled_and_samples_compiled_like_eager(tmp_path):
    import copy

    from conftest import TINY, compose_cfg
    from ddpmlab.api import build_denoiser
    from ddpmlab.training import train

    overrides = TINY + ["experiment=sr_digits", "model=unet_tiny", "trainer=gpu_fast", "trainer.accelerator=gpu"]
    overrides += ["trainer.devices=1", "trainer.max_steps=20", "perf.compile=true", "perf.channels_last=true"]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    train(cfg)  # bf16-mixed, torch.compile, channels_last, with [x_t, upsampled low-res] as the input
    eager = build_denoiser(cfg).cuda().eval()
    cond = Cond(image=torch.rand(16, 1, 4, 4, device="cuda") * 2 - 1)
    sampler = Sampler("ddim", num_steps=10)
    expected = generate(eager, sampler, 16, seed=0, cond=cond)
    fast = copy.deepcopy(eager)
    perf = {"compile": True, "channels_last": True, "tf32": False, "precision": "fp32"}
    for _ in range(2):  # the second call replays the captured graphs
        got = generate(fast, sampler, 16, seed=0, cond=cond, perf=perf)
    assert fast.net._compiled_call_impl is not None
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    bf16 = generate(copy.deepcopy(eager), sampler, 16, seed=0, cond=cond, perf={**perf, "precision": "bf16"})
    assert torch.isfinite(bf16).all() and (bf16 - expected).abs().mean() < 0.05


def test_bits_per_dim_of_an_image_conditioned_model_is_given_each_images_own_condition():
    from ddpmlab.metrics.fid import generate_on_devices
    from ddpmlab.metrics.nll import bits_per_dim, evaluate_bpd

    den = tiny_denoiser(cond_channels=1)
    x0 = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batches = [(x0[:4], torch.zeros(4).long()), (x0[4:], torch.zeros(2).long())]
    task = SuperResolution(2)
    result = evaluate_bpd(den, batches, task=task, stride=5)
    manual = torch.cat([
        bits_per_dim(den, x, stride=5, cond=Cond(image=task(x)), generator=g).total
        for g in [torch.Generator().manual_seed(0)] for x, _ in batches
    ])  # fmt: skip
    assert result["value"] == pytest.approx(float(manual.double().mean()), rel=1e-5)
    assert result["protocol"]["image_condition"] == "sr"
    with pytest.raises(ConfigError, match="conditioned on an image"):
        evaluate_bpd(den, batches, stride=5)  # without its condition
    # evaluate.py's FID draws image-conditioned samples from the same pool the training callback does
    pool = Cond(image=task(x0))
    sampler = Sampler("ddim", num_steps=3)
    fake = generate_on_devices(den, sampler, 5, 2, 0, ["cpu"], conds=pool)
    chunks = generate_chunks(den, sampler, [(0, 2), (1, 2), (2, 1)], 0, conds=pool, chunk_size=2)
    assert torch.equal(fake, to_uint8(chunks))
