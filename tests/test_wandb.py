"""An offline W&B run: named and tagged from the Hydra choices, the resolved config attached, images logged;
a resumed training continues the same W&B run id."""

import pytest

from ddpmlab.training import train


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def test_offline_wandb_run_keeps_images_config_name_and_tags(offline, train_cfg, tmp_path):
    cfg = train_cfg("logger=wandb", "schedule=cosine", "schedule.num_timesteps=50", "trainer.max_steps=3")
    assert cfg.logger.wandb.name == "unet_tiny-cosine-ddpm-digits"
    assert list(cfg.logger.wandb.tags) == ["unet_tiny", "cosine", "ddpm", "digits"]
    train(cfg)
    import wandb

    wandb.teardown()  # flush the offline event log now (otherwise it happens at interpreter exit)
    run = tmp_path / "run"
    run_id = (run / "wandb_run_id").read_text()
    [wandb_dir] = (run / "wandb").glob(f"offline-run-*-{run_id}")
    assert list(wandb_dir.glob("*.wandb"))  # the run's event log, what `wandb sync` uploads
    media = {
        p.relative_to(wandb_dir / "files" / "media" / "images").parts[0]
        for p in wandb_dir.glob("files/media/images/**/*.png")
    }
    assert {"samples", "data"} <= media  # sample grid + denoising chain, forward-process strip
    names = " ".join(p.name for p in wandb_dir.glob("files/media/images/**/*.png"))
    assert "grid" in names and "denoising_chain" in names and "forward_process" in names
    # Offline, the config lives in the run's event log (uploaded by `wandb sync`): the resolved values, no ${...}
    log = next(wandb_dir.glob("*.wandb")).read_bytes()
    assert b'"base_channels":16' in log and b"cosine_betas" in log and b"${" not in log
    assert b"unet_tiny-cosine-ddpm-digits" in log and b"train/loss_q1" in log and b"train/grad_norm" in log
