"""diffusers' format both ways (ddpmlab/diffusers_format.py): a UNet2DModel read into ddpmlab computes what it
computes in diffusers; a ddpmlab model exported and run by DDPMPipeline / DDIMPipeline draws what ddpmlab's own
samplers draw from the same noise; ddpmlab -> diffusers -> ddpmlab is bit-exact. Random weights, nothing
downloaded. Each test prints its largest difference (pytest -s shows them)."""

import json
import logging
import pickle
import warnings

import pytest
import torch
from omegaconf import OmegaConf

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

import ddpmlab  # noqa: E402
from conftest import TINY, compose_cfg, run_cli  # noqa: E402
from ddpmlab.api import build_denoiser  # noqa: E402
from ddpmlab.cli.export import export  # noqa: E402
from ddpmlab.diffusers_format import (  # noqa: E402
    from_diffusers_state,
    read_folder,
    scheduler_config,
    to_diffusers_state,
    unet_config,
    unet_from_config,
    write_folder,
)
from ddpmlab.errors import CheckpointError, ConfigError  # noqa: E402
from ddpmlab.pretrained import UnsafeWeightsFile  # noqa: E402
from ddpmlab.samplers import Sampler  # noqa: E402

# DDPM's CIFAR-10 network as diffusers holds it (google/ddpm-cifar10-32's config.json): the TensorFlow code's
# conventions (frequencies over half - 1, sin first, "SAME" padding, GroupNorm eps 1e-6), one head at 16x16.
DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, act_fn="silu",
    center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional",
)  # fmt: skip
SCALED = {**DDPM_CIFAR10, "sample_size": 16, "block_out_channels": (32, 64, 64), "norm_num_groups": 8,
          "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")}  # fmt: skip
VARIANTS = {
    "ddpm_cifar10_scaled": {},
    "adagn_multihead": dict(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8, attention_head_dim=16),
    "diffusers_defaults": dict(
        freq_shift=0, flip_sin_to_cos=True, norm_eps=1e-5, downsample_padding=1, attention_head_dim=8, dropout=0.1
    ),
    "learned_variance_nonsquare": dict(out_channels=6, sample_size=(16, 8)),
}


def unet(config: dict, seed: int = 0) -> UNet2DModel:
    """A UNet2DModel with random weights, its GroupNorms' scales and shifts made random too."""
    torch.manual_seed(seed)
    net = UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def save_pipeline(folder, net: UNet2DModel, scheduler) -> None:
    DDPMPipeline(unet=net, scheduler=scheduler).save_pretrained(folder)


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_unet2dmodel_read_from_its_folder_computes_what_it_computes_in_diffusers(variant, tmp_path):
    config = {**SCALED, **VARIANTS[variant]}
    net = unet(config)
    learned = config["out_channels"] == 2 * config["in_channels"]
    scheduler = DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range" if learned else "fixed_large")
    save_pipeline(tmp_path, net, scheduler)
    denoiser, cfg = ddpmlab.load(tmp_path)
    size = config["sample_size"]
    assert cfg.model.learn_sigma == learned and denoiser.sample_shape == (
        3,
        *(size if isinstance(size, tuple) else (size, size)),
    )
    x, t = torch.randn(4, 3, *denoiser.sample_shape[1:]), torch.tensor([0, 1, 500, 999])
    with torch.no_grad():
        theirs, ours = net(x, t).sample, denoiser.net(x, t)
    print(f"{variant}: largest |diffusers - ddpmlab| = {max_diff(theirs, ours):.2e} (outputs up to "
          f"{theirs.abs().max():.2f})")  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and back: the same tensors under the same names, bit for bit
    back = to_diffusers_state(denoiser.net.state_dict(), OmegaConf.to_container(cfg.model))
    assert back.keys() == net.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())
    written = unet_config(cfg.model)
    for key, value in net.config.items():
        if not key.startswith("_") and key != "attn_norm_num_groups":  # written explicitly: the same groups
            assert written[key] == (list(value) if isinstance(value, tuple) else value), key


def test_the_full_ddpm_cifar10_network_converts_exactly_with_its_deprecated_attention_names(tmp_path):
    """DDPM CIFAR-10's configuration in full (35.7M parameters), its weights saved under the attention names of
    diffusers < 0.14 (query / key / value / proj_attn), as the checkpoints converted then hold them, in a .bin
    pickle beside the configs at the folder's root (the early layout): read as tensors only."""
    net = unet(DDPM_CIFAR10)
    renamed = {
        k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
        .replace(".to_out.0.", ".proj_attn."): v
        for k, v in net.state_dict().items()
    }  # fmt: skip
    net.save_config(tmp_path)
    torch.save(renamed, tmp_path / "diffusion_pytorch_model.bin")
    DDPMScheduler(variance_type="fixed_large").save_config(tmp_path)
    denoiser, cfg = ddpmlab.load(tmp_path)
    assert sum(p.numel() for p in denoiser.net.parameters()) == sum(p.numel() for p in net.parameters()) == 35746307
    assert cfg.model.attn_resolutions == [16] and cfg.model.downsample_padding == 0 and cfg.model.freq_shift == 1
    assert cfg.sampler.variance == "large" and cfg.schedule.beta_end == 0.02
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        theirs, ours = net(x, t).sample, denoiser.net(x, t)
    print(f"DDPM CIFAR-10: largest |diffusers - ddpmlab| = {max_diff(theirs, ours):.2e}")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_bin_pickle_that_asks_for_more_than_tensors_is_refused_unrun(tmp_path):
    net = unet(SCALED)
    net.save_config(tmp_path)
    DDPMScheduler().save_config(tmp_path)

    class Boom:
        def __reduce__(self):
            return (print, ("this line must never run",))

    with open(tmp_path / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"conv_in.weight": Boom()}, f, protocol=2)
    with pytest.raises(UnsafeWeightsFile, match="tensors only"):
        ddpmlab.load(tmp_path)


def tiny_cfg(*overrides: str):
    """A resolved ddpmlab training config (as a checkpoint stores it) of a tiny digits model."""
    cfg = compose_cfg("train", TINY + list(overrides))
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    return OmegaConf.create(plain)


def export_random(folder, *overrides: str, seed: int = 0):
    """A ddpmlab denoiser of ``overrides`` with random weights, written in diffusers' format to ``folder``."""
    cfg = tiny_cfg(*overrides)
    torch.manual_seed(seed)
    denoiser = build_denoiser(cfg).eval()
    with torch.no_grad():
        for p in denoiser.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder.mkdir()
    write_folder(folder, cfg, denoiser.net.state_dict(), "card\n")
    return denoiser, cfg


def as_pipeline_images(x: torch.Tensor):
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # what the pipelines return as "np"


def loaded_without_warnings(cls, folder, caplog):
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="diffusers"):
        warnings.simplefilter("always")
        pipe = cls.from_pretrained(folder)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # about the environment, not the folder: diffusers loads more slowly where accelerate is not installed
    said = [m for m in said if "`accelerate` was not found" not in m]
    assert not said, said
    pipe.set_progress_bar_config(disable=True)
    return pipe


EXPORTS = {  # overrides of the tiny digits model, and the variance its ancestral sampler uses
    "cosine_eps": ((), "small"),
    "linear_large_attention_adagn": (
        ("schedule=linear", "sampler.variance=large", "model.attn_resolutions=[4]", "model.use_scale_shift_norm=true"),
        "large",
    ),
    "learned_variance": (("model.learn_sigma=true", "objective=hybrid"), "auto"),
    "v_prediction_zero_snr": (
        ("prediction=v", "schedule.zero_terminal_snr=true", "model.num_head_channels=16"),
        "small",
    ),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_an_exported_model_draws_in_diffusers_pipelines_what_ddpmlab_draws(name, tmp_path, caplog):
    overrides, variance = EXPORTS[name]
    folder = tmp_path / "export"
    denoiser, cfg = export_random(folder, *overrides)
    shape = (3, *denoiser.sample_shape)
    T = denoiser.diffusion.T
    pipe = loaded_without_warnings(DDPMPipeline, folder, caplog)
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=T, output_type="np")
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=g)  # the pipeline's first draw, then its noise step by step: the same stream
    ours = as_pipeline_images(Sampler("ddpm", variance=variance)(denoiser, x_T, generator=g))
    print(
        f"{name}: DDPMPipeline vs ddpmlab ancestral, {T} steps: largest difference {max_diff(theirs.images, ours):.2e}"
    )
    torch.testing.assert_close(torch.as_tensor(theirs.images), torch.as_tensor(ours), rtol=0, atol=2e-4)
    if cfg.model.learn_sigma:
        return  # DDIMScheduler reads no variance channels (the model card says to use DDPMPipeline)
    pipe = loaded_without_warnings(DDIMPipeline, folder, caplog)
    spacing = cfg.sampler.spacing if cfg.sampler.get("spacing") in ("leading", "trailing") else "leading"
    assert pipe.scheduler.config.timestep_spacing == spacing
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(1), num_inference_steps=10, eta=0.0,
                  use_clipped_model_output=True, output_type="np")  # fmt: skip
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours = as_pipeline_images(Sampler("ddim", num_steps=10, spacing=spacing)(denoiser, x_T))
    print(f"{name}: DDIMPipeline vs ddpmlab DDIM, 10 steps: largest difference {max_diff(theirs.images, ours):.2e}")
    torch.testing.assert_close(torch.as_tensor(theirs.images), torch.as_tensor(ours), rtol=0, atol=2e-4)


@pytest.mark.parametrize("name", EXPORTS)
def test_ddpmlab_to_diffusers_to_ddpmlab_is_bit_exact(name, tmp_path):
    folder = tmp_path / "export"
    denoiser, cfg = export_random(folder, *EXPORTS[name][0])
    back, back_cfg = ddpmlab.load(folder)
    assert back_cfg.schedule == cfg.schedule and back_cfg.prediction == cfg.prediction
    assert back_cfg.data == cfg.data and back_cfg.sampler == cfg.sampler  # from ddpmlab_config.yaml
    ours, theirs = denoiser.net.state_dict(), back.net.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(denoiser.diffusion.beta64, back.diffusion.beta64)
    x_T = torch.randn(4, *denoiser.sample_shape, generator=torch.Generator().manual_seed(2))
    for sampler in (Sampler("ddpm", num_steps=10), Sampler("dpm_solver", num_steps=8)):
        a = sampler(denoiser, x_T, generator=torch.Generator().manual_seed(3))
        b = sampler(back, x_T, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b), sampler


def test_export_cli_writes_the_folder_and_every_sampler_runs_on_what_it_reads(tiny_ckpt, tmp_path, caplog):
    out = tmp_path / "hub"
    proc = run_cli("export.py", f"ckpt_path={tiny_ckpt}", "format=diffusers", f"out_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["README.md", "ddpmlab_config.yaml", "model_index.json", "scheduler/scheduler_config.json",
                     "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]  # fmt: skip
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and "DDPMPipeline.from_pretrained" in card
    loaded_without_warnings(DDPMPipeline, out, caplog)
    from_ckpt, _ = ddpmlab.load(tiny_ckpt)
    denoiser, _ = ddpmlab.load(out)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 49])
    with torch.no_grad():
        assert torch.equal(denoiser(x, t).eps_hat, from_ckpt(x, t).eps_hat)  # the EMA weights, exactly
    x_T = torch.randn(2, 1, 8, 8)
    for algorithm, steps in (("ddpm", 5), ("ddim", 5), ("dpm_solver", 5), ("unipc", 5), ("euler", 5), ("heun", 3)):
        assert torch.isfinite(Sampler(algorithm, num_steps=steps)(denoiser, x_T)).all(), algorithm


def test_evaluate_and_sample_read_a_diffusers_folder_and_need_data_only_where_it_says_none(tiny_ckpt, tmp_path):
    from ddpmlab.evaluation import evaluate

    out = export(tiny_ckpt, tmp_path / "hub", format="diffusers")
    base = ["metrics=[bpd]", "bpd.num_images=16", "bpd.stride=5"]
    ours = evaluate(compose_cfg("evaluate", [f"ckpt_path={tiny_ckpt}", *base], tmp_path / "a"), tmp_path / "a")
    got = evaluate(compose_cfg("evaluate", [f"ckpt_path={out}", *base], tmp_path / "b"), tmp_path / "b")
    assert got["bpd"]["value"] == ours["bpd"]["value"] and got["bpd"]["protocol"]["dataset"] == "digits"
    (out / "ddpmlab_config.yaml").unlink()  # as a folder from elsewhere: it does not say its data
    cfg = compose_cfg("evaluate", [f"ckpt_path={out}", *base], tmp_path / "c")
    with pytest.raises(ConfigError, match=r"does not say what data it was trained on.*data=cifar10"):
        evaluate(cfg, tmp_path / "c")
    cfg = compose_cfg("evaluate", [f"ckpt_path={out}", *base, "data=mnist"], tmp_path / "d")
    with pytest.raises(ConfigError, match=r"data=mnist holds 1x28x28 images, but .* draws 1x8x8"):
        evaluate(cfg, tmp_path / "d")
    from ddpmlab.cli.sample import sample

    cfg = compose_cfg("sample", [f"ckpt_path={out}", "num_samples=2", "inpaint.index=0"], tmp_path / "r")
    with pytest.raises(
        ConfigError, match=r"does not say what it was trained on: give the image instead, inpaint\.image"
    ):
        sample(cfg, tmp_path / "r")
    got = evaluate(compose_cfg("evaluate", [f"ckpt_path={out}", *base, "data=digits"], tmp_path / "e"), tmp_path / "e")
    assert got["bpd"]["protocol"]["dataset"] == "digits"
    assert abs(got["bpd"]["value"] - ours["bpd"]["value"]) < 1e-9  # the same model under the same protocol
    overrides = [f"ckpt_path={out}", "num_samples=4", "sampler=ddim", "sampler.num_steps=5"]
    sample(compose_cfg("sample", overrides, tmp_path / "s"), tmp_path / "s")
    assert (tmp_path / "s" / "grid.png").is_file() and (tmp_path / "s" / "samples.npz").is_file()


def test_a_class_conditional_export_keeps_its_null_label_and_guides_after_the_round_trip(tmp_path):
    folder = tmp_path / "export"
    denoiser, cfg = export_random(folder, "experiment=cond_digits", *TINY)
    config = read_folder(folder)[0]
    assert config.model.num_classes == 10
    unet_json = UNet2DModel.from_pretrained(folder / "unet")
    assert unet_json.config.num_class_embeds == 11  # the ten classes and the null label
    back, _ = ddpmlab.load(folder)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 20, 40]), torch.tensor([0, 9, -1])
    with torch.no_grad():
        assert torch.equal(back(x, t, y).eps_hat, denoiser(x, t, y).eps_hat)
        labels = torch.where(y < 0, 10, y)
        torch.testing.assert_close(
            unet_json(x, t, class_labels=labels).sample, denoiser.net(x, t, y), atol=1e-5, rtol=1e-5
        )
    (folder / "ddpmlab_config.yaml").unlink()  # a class-conditional UNet2DModel from elsewhere has no null label
    with pytest.raises(ConfigError, match="num_class_embeds=11 .*null label"):
        ddpmlab.load(folder)


def test_what_has_no_diffusers_equivalent_is_refused_with_the_reason(tmp_path):
    def refused(*overrides):
        with pytest.raises(ConfigError) as e:
            unet_config(tiny_cfg(*overrides).model)
        return str(e.value)

    assert "concatenated with x_t" in refused("experiment=sr_digits", *TINY)
    assert "UNet2DConditionModel" in refused("experiment=text_digits", *TINY, "data.num_pairs=20")
    assert "attention_head_dim is one size" in refused("model.num_heads=2", "model.attn_resolutions=[8]")
    assert scheduler_config(tiny_cfg("schedule=sigmoid", "+schedule.steepness=4"))["trained_betas"] is not None


def test_a_latent_or_classifier_checkpoint_is_not_exported_to_diffusers(tmp_path):
    from conftest import TINY_CLASSIFIER
    from ddpmlab.training import train

    train(compose_cfg("train", TINY_CLASSIFIER, tmp_path / "clf"))
    with pytest.raises(ConfigError, match="not a diffusion model"):
        export(tmp_path / "clf" / "checkpoints" / "last.ckpt", tmp_path / "out", format="diffusers")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"_class_name": "UNet2DConditionModel"}, "text encoder's tokens"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
        ({"center_input_sample": True}, "center_input_sample=True"),
        ({"upsample_type": "resnet"}, "upsample_type='resnet'"),
        ({"resnet_time_scale_shift": "scale_shift"}, "attn_norm_num_groups=None .*without a GroupNorm"),
        ({"up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"]}, "attends on the way up"),
        ({"mystery_key": 3}, "mystery_key=3 .*does not know"),
        ({"out_channels": 4}, "out_channels=4"),
    ],
)
def test_a_unet2dmodel_ddpmlab_cannot_express_is_refused_naming_the_keys(change, message):
    config = {**dict(UNet2DModel(**SCALED).config), **change}
    with pytest.raises(ConfigError, match=message):
        unet_from_config(config, "unet/config.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"thresholding": True}, "dynamic thresholding"),
        ({"variance_type": "learned"}, "variance_type='learned'"),
        ({"clip_sample_range": 2.0}, "clip_sample_range=2.0"),
        ({"beta_schedule": "exp"}, "beta_schedule='exp'"),
        ({"variance_type": "learned_range"}, "learned_range"),  # a U-Net without the variance's channels
    ],
)
def test_a_scheduler_ddpmlab_cannot_reproduce_is_refused(change, message, tmp_path):
    save_pipeline(tmp_path, unet(SCALED), DDPMScheduler())
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ConfigError, match=message):
        ddpmlab.load(tmp_path)


def test_foreign_schedules_map_to_the_same_betas_and_a_ddim_scheduler_to_ddim(tmp_path):
    for scheduler in (
        DDPMScheduler(num_train_timesteps=200, beta_schedule="scaled_linear"),
        DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
        DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False),
        DDPMScheduler(trained_betas=torch.linspace(1e-3, 0.05, 30).tolist()),
    ):
        folder = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        save_pipeline(folder, unet(SCALED), scheduler)
        denoiser, cfg = ddpmlab.load(folder)
        theirs = scheduler.alphas_cumprod.double()
        assert max_diff(denoiser.diffusion.alpha_bar64, theirs) < 1e-6  # diffusers keeps float32 tables
        assert denoiser.prediction == {"epsilon": "eps", "v_prediction": "v"}[scheduler.config.prediction_type]
        assert cfg.sampler.algorithm == ("ddim" if isinstance(scheduler, DDIMScheduler) else "ddpm")
        assert cfg.sampler.clip_x0 == scheduler.config.clip_sample


def test_weights_that_do_not_fit_their_config_are_refused(tmp_path):
    net = unet(SCALED)
    save_pipeline(tmp_path, net, DDPMScheduler())
    cfg, theirs = read_folder(tmp_path)
    target = build_denoiser(cfg).net.state_dict()
    extra = {**theirs, "down_blocks.9.resnets.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="no place for: down_blocks.9"):
        from_diffusers_state(extra, target, OmegaConf.to_container(cfg.model), "here")
    missing = {k: v for k, v in theirs.items() if "mid_block.attentions" not in k}
    with pytest.raises(CheckpointError, match="have no mid_block.attentions.0"):
        from_diffusers_state(missing, target, OmegaConf.to_container(cfg.model), "here")
