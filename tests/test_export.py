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


def test_export_cli(train_cfg, tmp_path):
    train(train_cfg())
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = run_cli("export.py", f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'shared'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"exported to {tmp_path / 'shared'}" in proc.stdout
    assert (tmp_path / "shared" / "model.safetensors").is_file()
