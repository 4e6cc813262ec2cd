"""export.py: EMA weights as safetensors, the resolved config and a model card; ddpmlab.load reads the folder."""

import pytest
import torch

import ddpmlab
from conftest import run_cli
from ddpmlab.cli.export import export
from ddpmlab.errors import CheckpointError
from ddpmlab.training import train

pytest.importorskip("safetensors")


def test_export_holds_the_ema_weights_and_loads_like_the_checkpoint(train_cfg, tmp_path):
    train(train_cfg())
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = export(ckpt)
    assert out == tmp_path / "run" / "export"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "model.safetensors"]
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert all(not k.startswith(("denoiser.", "diffusion.")) for k in weights)  # the network alone
    from_ckpt, cfg = ddpmlab.load(ckpt)
    from_export, cfg2 = ddpmlab.load(out)
    assert cfg2.model == cfg.model and cfg2.schedule == cfg.schedule
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 49])
    with torch.no_grad():
        assert torch.equal(from_ckpt(x, t).eps_hat, from_export(x, t).eps_hat)  # the EMA weights, exactly
        raw, _ = ddpmlab.load(ckpt, ema=False)
        assert not torch.equal(raw(x, t).eps_hat, from_export(x, t).eps_hat)
    card = (out / "README.md").read_text()
    assert "digits" in card and "6 training steps" in card and "val/loss" in card and "ddpmlab.load" in card


def test_load_refuses_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(CheckpointError, match="not an exported ddpmlab model"):
        ddpmlab.load(tmp_path)


def test_export_cli(tiny_ckpt, tmp_path):
    proc = run_cli("export.py", f"ckpt_path={tiny_ckpt}", f"out_dir={tmp_path / 'shared'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"exported to {tmp_path / 'shared'}" in proc.stdout
    assert (tmp_path / "shared" / "model.safetensors").is_file()


def test_a_pixel_export_states_its_stage_and_a_stage_nobody_knows_is_refused(tiny_ckpt, tmp_path):
    out = export(tiny_ckpt, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "| stage | pixel diffusion |" in card and "(denoiser, x_T)" in card
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["ddpmlab_config"]["stage"] = "superresolution"  # a kind of run this version does not have
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"other\.ckpt: its stage='superresolution' is not a kind of run"):
        ddpmlab.load(tmp_path / "other.ckpt")
    config = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text("stage: superresolution\n" + config)
    with pytest.raises(CheckpointError, match="is not a kind of run ddpmlab knows"):
        ddpmlab.load(out)


def test_sample_py_refuses_a_first_stage_checkpoint_in_one_line(tmp_path):
    from conftest import compose_cfg
    from test_latent import AE

    ae = [o for o in AE if not o.startswith(("trainer.max_steps", "trainer.val_check"))]
    train(compose_cfg("train", ae + ["trainer.max_steps=1", "trainer.val_check_interval=1"], tmp_path / "ae"))
    ckpt = tmp_path / "ae" / "checkpoints" / "last.ckpt"
    r = run_cli("sample.py", f"ckpt_path={ckpt}", "num_samples=2", f"hydra.run.dir={tmp_path / 's'}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"ddpmlab: error: {ckpt} is a first stage (autoencoder) checkpoint, not a diffusion model: pass the "
        "checkpoint of a diffusion run"
    ]
