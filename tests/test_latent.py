"""Latent diffusion end to end on the 8x8 digits: a tiny first stage trained through train(cfg), the second stage
on its latents, sampling decoded to pixels, resume of each stage, the diffusers-format loader and the errors."""

import csv
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_cfg, run_cli
from ddpmlab.api import load, load_checkpoint
from ddpmlab.checkpoint import build_first_stage
from ddpmlab.cli.export import export
from ddpmlab.data import DiffusionDataModule
from ddpmlab.data.latent import LatentDataModule
from ddpmlab.errors import CheckpointError, ConfigError
from ddpmlab.perf import set_cpu_threads
from ddpmlab.samplers import Sampler, generate
from ddpmlab.stages import load_first_stage
from ddpmlab.training import train

AE = [
    "experiment=autoencoder_mnist",
    "data=digits",
    "data.image_size=8",
    "data.batch_size=32",
    "first_stage.net.base_channels=8",
    "first_stage.net.channel_mult=[1,2]",  # f = 2: 8x8 digits -> 4x4x2 latents (the experiment's c = 2)
    "first_stage.net.num_groups=4",
    "optimizer.lr=3e-3",
    "trainer.max_steps=150",
    "trainer.val_check_interval=150",
    "trainer.log_every_n_steps=10",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.reconstruction_grid.num_images=8",
    "logger=csv",
]


def ldm_overrides(ae_ckpt, *extra):
    return [
        "experiment=ldm_mnist",
        "data=digits",
        "data.image_size=8",
        "data.batch_size=32",
        f"first_stage.ckpt_path={ae_ckpt}",
        "first_stage.scale_images=256",
        "model.base_channels=8",
        "model.channel_mult=[1,2]",
        "model.attn_resolutions=[]",
        "model.num_res_blocks=1",
        "model.num_groups=4",
        "model.num_heads=1",
        "schedule.num_timesteps=50",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "callbacks.checkpoint.every_n_train_steps=3",
        "callbacks.sample_grid.every_n_steps=3",
        "callbacks.sample_grid.num_samples=4",
        "callbacks.sample_grid.num_steps=5",
        "callbacks.denoising_chain.num_steps=5",
        "callbacks.denoising_chain.num_images=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def first_stage_run(tmp_path_factory):
    """A first stage trained for 150 steps on the digits (seconds): its run directory and final metrics."""
    run = tmp_path_factory.mktemp("ae") / "run"
    metrics = train(compose_cfg("train", AE, run))
    return run, metrics


@pytest.fixture(scope="module")
def ae_ckpt(first_stage_run):
    return first_stage_run[0] / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def ldm_run(ae_ckpt, tmp_path_factory):
    run = tmp_path_factory.mktemp("ldm") / "run"
    train(compose_cfg("train", ldm_overrides(ae_ckpt), run))
    return run


def digits_val():
    dm = DiffusionDataModule("digits", image_size=8)
    dm.setup()
    return dm.val_set.images.float() / 127.5 - 1.0


def test_trained_first_stage_reconstructs_its_inputs(first_stage_run, ae_ckpt):
    run, metrics = first_stage_run
    ae, net_cfg = load_first_stage(ae_ckpt)
    x = digits_val()
    with torch.no_grad():
        x_hat = ae.decode(ae.encode(x, sample=False))
    mse = (x_hat - x).pow(2).mean()
    baseline = (x - x.mean(0)).pow(2).mean()  # the best constant image
    assert mse < 0.4 * baseline, (float(mse), float(baseline))  # untrained: about the baseline or worse
    assert net_cfg["channel_mult"] == [1, 2] and net_cfg["regularizer"] == "kl"
    # PSNR / SSIM on the validation split, in [0, 1]; the grid of originals beside reconstructions
    assert metrics["val/psnr"] > 15 and 0 < metrics["val/ssim"] <= 1
    assert abs(metrics["val/psnr"] - 10 * torch.log10(torch.tensor(1 / metrics["val/mse"]))) < 3
    assert (run / "reconstructions" / "step_0000150.png").is_file()


def test_second_stage_trains_on_latents_of_the_frozen_first_stage(ldm_run, ae_ckpt):
    ckpt = load_checkpoint(ldm_run / "checkpoints" / "last.ckpt")
    ae_state = load_checkpoint(ae_ckpt)["state_dict"]
    cfg = ckpt["ddpmlab_config"]
    assert cfg["stage"] == "latent_diffusion" and cfg["model"]["in_channels"] == 2 and cfg["model"]["image_size"] == 4
    for state in (ckpt["state_dict"], ckpt["current_model_state"]):  # EMA and raw weights
        first = {
            k[len("denoiser.first_stage.") :]: v for k, v in state.items() if k.startswith("denoiser.first_stage.")
        }
        assert first and all(torch.equal(first[k], ae_state["autoencoder." + k]) for k in first)  # unchanged
    s = float(ckpt["state_dict"]["denoiser.scale_factor"])
    ae, _ = load_first_stage(ae_ckpt)
    with torch.no_grad():
        mean, std = ae.moments(digits_val())
    assert 0.7 < s * (mean + std * torch.randn_like(std)).std() < 1.3  # about unit variance (fitted on train)
    assert (ldm_run / "grids" / "step_0000006.png").is_file() and (ldm_run / "chains" / "step_0000006.png").is_file()


def test_latent_samples_decode_to_pixels_in_the_data_range(ldm_run):
    denoiser, cfg = load(ldm_run / "checkpoints" / "last.ckpt")
    x_T = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    for sampler in (Sampler("ddim", num_steps=10), Sampler("ddpm", num_steps=10)):
        z = sampler(denoiser, x_T, generator=torch.Generator().manual_seed(1))
        x = denoiser.decode(z)
        assert z.shape == (16, 2, 4, 4) and x.shape == (16, 1, 8, 8)
        # the decoder's range, about [-1, 1] (loosely: a model trained for 6 steps draws off-distribution latents)
        assert torch.isfinite(x).all() and x.abs().quantile(0.99) < 3.0
    assert float(denoiser.scale_factor) == pytest.approx(
        float(load_checkpoint(ldm_run / "checkpoints" / "last.ckpt")["state_dict"]["denoiser.scale_factor"])
    )


def test_sample_cli_needs_only_the_second_stage_checkpoint(ae_ckpt, tmp_path):
    ae_copy = tmp_path / "ae.ckpt"
    shutil.copy(ae_ckpt, ae_copy)
    train(compose_cfg("train", ldm_overrides(ae_copy, "trainer.max_steps=3"), tmp_path / "run"))
    ae_copy.unlink()  # the first stage's file is gone: the checkpoint holds it
    out = tmp_path / "samples"
    r = run_cli(
        "sample.py",
        f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
        "sampler=ddim",
        "sampler.num_steps=5",
        "num_samples=6",
        "save_chain=true",
        "chain_samples=2",
        "chain_frames=3",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    import numpy as np

    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    assert (out / "grid.png").is_file() and (out / "chain.png").is_file()


def test_a_latent_export_samples_like_its_checkpoint_with_the_first_stage_gone(first_stage_run, ldm_run, tmp_path):
    """The export holds the U-Net, the first stage's weights and config, and the scale factor: the same samples, bit
    for bit, with the first stage's run directory moved away."""
    ckpt, sampler = ldm_run / "checkpoints" / "last.ckpt", Sampler("ddim", num_steps=10)
    from_ckpt = generate(load(ckpt)[0], sampler, 8, seed=0)
    with pytest.raises(ConfigError, match="latent diffusion: its U-Net draws latents that only its first stage"):
        export(ckpt, tmp_path / "diffusers", format="diffusers")  # diffusers' format holds pixel-space DDPMs
    assert not (tmp_path / "diffusers").exists()
    out = export(ckpt, tmp_path / "export")
    assert "scale_factor" in load_file(out / "model.safetensors")
    card = (out / "README.md").read_text()
    assert "| stage | latent diffusion |" in card and "denoiser.decode" in card
    away = tmp_path / "first_stage_moved"
    shutil.move(first_stage_run[0], away)
    try:
        denoiser, cfg = load(out)
        from_export = generate(denoiser, sampler, 8, seed=0)
    finally:
        shutil.move(away, first_stage_run[0])
    assert cfg.stage == "latent_diffusion" and from_export.shape == (8, 1, 8, 8)  # decoded to pixels
    assert torch.isfinite(from_export).all() and (from_export - from_ckpt).abs().max().item() == 0.0


def test_a_first_stage_export_reconstructs_like_its_checkpoint(first_stage_run, ae_ckpt, tmp_path):
    out = export(ae_ckpt, tmp_path / "export")
    assert "| stage | first stage (autoencoder) |" in (out / "README.md").read_text()
    from_ckpt, _ = load(ae_ckpt)
    reference, _ = load_first_stage(ae_ckpt)  # what latent diffusion trains on
    away = tmp_path / "first_stage_moved"
    shutil.move(first_stage_run[0], away)  # the run directory is gone; the export suffices
    try:
        from_export, cfg = load(out)
    finally:
        shutil.move(away, first_stage_run[0])
    x = digits_val()
    with torch.no_grad():
        rec = [m.decode(m.encode(x, sample=False)) for m in (from_ckpt, reference, from_export)]
    assert cfg.stage == "autoencoder" and rec[0].shape == x.shape
    assert torch.equal(rec[0], rec[2]) and torch.equal(rec[1], rec[2])


def read_steps(run):
    with open(run / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_first_stage_resumes(tmp_path):
    short = [o for o in AE if not o.startswith(("trainer.max_steps", "trainer.val_check"))]
    train(compose_cfg("train", short + ["trainer.max_steps=4", "trainer.val_check_interval=4"], tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    train(
        compose_cfg(
            "train",
            short + ["trainer.max_steps=8", "trainer.val_check_interval=4", f"ckpt_path={ckpt}"],
            tmp_path / "b",
        )
    )
    first, second = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True) for d in "ab")
    assert first["global_step"] == 4 and second["global_step"] == 8
    adam_steps = lambda c: int(next(iter(c["optimizer_states"][0]["state"].values()))["step"])
    assert adam_steps(first) == 4 and adam_steps(second) == 8


def test_second_stage_resumes_with_its_stored_scale_factor(ldm_run, ae_ckpt, tmp_path):
    ckpt = torch.load(ldm_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["state_dict"]["denoiser.scale_factor"].fill_(0.123)  # as if the data had changed since
    ckpt["current_model_state"]["denoiser.scale_factor"].fill_(0.123)
    path = tmp_path / "tampered.ckpt"
    torch.save(ckpt, path)
    train(compose_cfg("train", ldm_overrides(ae_ckpt, "trainer.max_steps=9", f"ckpt_path={path}"), tmp_path / "run"))
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 9
    assert float(resumed["state_dict"]["denoiser.scale_factor"]) == pytest.approx(0.123)  # stored once, kept
    assert min(read_steps(tmp_path / "run")) >= 6


@pytest.mark.parametrize("mode", ["once", "per_batch"])
def test_both_encodings_feed_unit_variance_latents(ldm_run, mode):
    denoiser, cfg = load(ldm_run / "checkpoints" / "last.ckpt")
    data = DiffusionDataModule("digits", image_size=8, batch_size=64)
    data.setup()
    latent = LatentDataModule(data, denoiser, encode=mode)
    latent.setup()
    batches = [latent.on_after_batch_transfer(b, 0) for b in latent.train_dataloader()]
    z = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert z.shape[1:] == (2, 4, 4) and len(z) == len(labels) == len(data.train_set) // 64 * 64
    assert 0.7 < float(z.std()) < 1.3
    assert latent.val_set is data.val_set  # the rest is the wrapped data module's


def test_diffusers_autoencoder_kl_folder_round_trip(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).eval()
    folder = tmp_path / "vae"
    vae.save_pretrained(folder, safe_serialization=True)
    first_stage, net_cfg = load_first_stage(folder)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        mean, std = first_stage.moments(x)
        torch.testing.assert_close(mean, dist.mean)
        torch.testing.assert_close(std, dist.std)
        torch.testing.assert_close(first_stage.decode(mean), vae.decode(dist.mean).sample)
    assert first_stage.factor == 2 and net_cfg["_target_"] == "ddpmlab.networks.autoencoder.DiffusersAutoencoderKL"
    old_name = {**net_cfg, "_target_": "ddpmlab.latent.DiffusersAutoencoderKL"}  # as checkpoints written before name it
    assert type(build_first_stage(old_name)) is type(first_stage)
    # A second stage on it; the checkpoint then samples without the folder.
    train(compose_cfg("train", ldm_overrides(folder, "trainer.max_steps=3"), tmp_path / "run"))
    shutil.rmtree(folder)
    denoiser, _ = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(denoiser.first_stage.decode(mean), vae.decode(dist.mean).sample)
        z = Sampler("ddim", num_steps=3)(denoiser, torch.randn(2, 4, 4, 4))
    assert denoiser.decode(z).shape == (2, 1, 8, 8)


def test_a_folder_that_is_not_a_diffusers_vae_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="config.json and diffusion_pytorch_model.safetensors"):
        load_first_stage(tmp_path)


def test_first_stage_errors(ae_ckpt, ldm_run, tmp_path):
    def run(*extra):
        train(compose_cfg("train", ldm_overrides(*extra), tmp_path / "run"))

    with pytest.raises(CheckpointError, match="does not exist"):
        run(tmp_path / "nothing.ckpt")
    with pytest.raises(CheckpointError, match="not an autoencoder checkpoint"):
        run(ldm_run / "checkpoints" / "last.ckpt")  # a diffusion checkpoint
    with pytest.raises(CheckpointError, match="use the data settings the autoencoder was trained with"):
        run(ae_ckpt, "data.image_size=16")
    with pytest.raises(ConfigError, match="needs a trained first stage"):
        run("null")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was written


def test_missing_first_stage_is_one_line_on_the_command_line(tmp_path):
    r = run_cli(
        "train.py",
        "experiment=ldm_mnist",
        "data=digits",
        "data.image_size=8",
        f"first_stage.ckpt_path={tmp_path / 'missing.ckpt'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpmlab: error: first_stage.ckpt_path=")
    assert "Traceback" not in r.stderr


def test_discriminator_starts_at_its_step_and_steps_count_the_autoencoder(tmp_path):
    short = [o for o in AE if not o.startswith(("trainer.max_steps", "trainer.val_check", "trainer.log_every"))]
    train(
        compose_cfg(
            "train",
            short
            + [
                "trainer.max_steps=4",
                "trainer.val_check_interval=4",
                "trainer.log_every_n_steps=1",
                "first_stage.loss.disc_start=2",
                "first_stage.loss.disc_layers=1",
            ],
            tmp_path / "run",
        )
    )
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert len(ckpt["optimizer_states"]) == 2
    d_steps = int(next(iter(ckpt["optimizer_states"][1]["state"].values()))["step"])
    assert d_steps == 2  # steps 2 and 3 of 0..3
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/d_loss") for r in rows) and any(r.get("train/g_loss") for r in rows)


def test_lpips_without_local_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cfg = compose_cfg("train", AE + ["first_stage.loss.perceptual_weight=1.0"], tmp_path / "run")
    with pytest.raises(ConfigError, match="LPIPS needs the VGG16 ImageNet weights at .*perceptual_weight=0"):
        train(cfg)


def test_inpainting_runs_in_latent_space_and_returns_pixels(ldm_run, tmp_path):
    import numpy as np

    from ddpmlab.cli.sample import sample

    cfg = compose_cfg(
        "sample",
        [
            f"ckpt_path={ldm_run / 'checkpoints' / 'last.ckpt'}",
            "inpaint.index=0",
            "inpaint.num_steps=5",
            "inpaint.jump_length=1",
            "inpaint.jump_n_sample=1",
            "num_samples=3",
        ],
        tmp_path,
    )
    out = sample(cfg, tmp_path / "inpaint")
    saved = np.load(out / "samples.npz")
    assert saved["images"].shape == (3, 8, 8, 1) and saved["keep"].shape == (8, 8)  # pixels, the pixel mask
    assert (out / "inpaint.png").is_file()


def test_cpu_threads_auto_times_the_denoiser_on_latents(ldm_run, monkeypatch):
    # the data config's shape is the pixels'; the probe must feed the U-Net latents
    denoiser, _ = load(ldm_run / "checkpoints" / "last.ckpt")
    module = type("M", (), {"denoiser": denoiser})()
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS")
    try:
        assert set_cpu_threads(module, "auto", (32, 1, 8, 8)) in (1, before)
    finally:
        torch.set_num_threads(before)
    assert all(p.grad is None for p in denoiser.parameters())
