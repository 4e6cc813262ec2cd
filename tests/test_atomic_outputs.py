"""Outputs are never half-written: a file (grid, metrics, samples) or an export folder holds the old content or the
whole new one when the write fails or the process dies mid-write."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch

import ddpmlab
import ddpmlab.fileio as fileio
from conftest import REPO, compose_cfg
from ddpmlab.cli import export as export_cli
from ddpmlab.cli.evaluate import evaluate
from ddpmlab.errors import ConfigError, DiskFullError
from ddpmlab.fileio import atomic_dir, atomic_path, write_atomic
from ddpmlab.images import save_grid
from ddpmlab.training import train

pytest.importorskip("safetensors")


class Boom(Exception):
    pass


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_atomic(target, '{"fid": 1.0}')
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text('{"fid": ')  # half of the new content, then the writer dies
        raise Boom
    assert json.loads(target.read_text()) == {"fid": 1.0}
    assert leftovers(tmp_path) == []
    write_atomic(target, '{"fid": 2.0}')
    assert json.loads(target.read_text()) == {"fid": 2.0}
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~fileio.UMASK)  # not mkstemp's 0600


def test_a_grid_that_fails_mid_write_leaves_the_old_grid(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    save_grid(torch.zeros(4, 1, 8, 8), path)
    before = path.read_bytes()

    def half_then_die(grid, fp, **kwargs):
        open(fp, "wb").write(before[: len(before) // 2])
        raise Boom

    monkeypatch.setattr("ddpmlab.images.save_image", half_then_die)
    with pytest.raises(Boom):
        save_grid(torch.ones(4, 1, 8, 8), path)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "samples.npz"
    write_atomic(target, b"old")

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", full)
    with pytest.raises(DiskFullError, match=f"no space left in {tmp_path} to write samples.npz"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename_aside"])
def test_a_folder_is_replaced_whole(tmp_path, monkeypatch, exchange):
    if not exchange:  # the fallback where the system cannot swap two folders in one step
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    out = tmp_path / "export"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("old a")
        (tmp / "b").write_text("old b")
    with pytest.raises(Boom), atomic_dir(out) as tmp:
        (tmp / "a").write_text("new a")
        raise Boom
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "old a", "b": "old b"}
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("new a")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "new a"}  # b was the old folder's
    assert leftovers(tmp_path) == []


def forward(denoiser):
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 10, 49])
    with torch.no_grad():
        return denoiser(x, t).eps_hat


@pytest.mark.parametrize("fails_in", ["weights", "config"])
def test_an_export_that_fails_mid_write_leaves_the_old_export(tiny_ckpt, tmp_path, monkeypatch, fails_in):
    out = export_cli.export(tiny_ckpt, tmp_path / "export")  # the EMA weights
    ema = forward(ddpmlab.load(out)[0])
    raw = forward(ddpmlab.load(tiny_ckpt, ema=False)[0])
    assert not torch.equal(ema, raw)
    if fails_in == "weights":  # the new weights half-written
        save_file = export_cli.safetensors_api().save_file

        def half_then_die(state, path, metadata=None):
            save_file(state, path, metadata=metadata)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise Boom

        monkeypatch.setattr(export_cli, "safetensors_api", lambda: type("api", (), {"save_file": half_then_die}))
    else:  # the new weights written whole, then the config write dies
        monkeypatch.setattr(export_cli.OmegaConf, "to_yaml", lambda cfg: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        export_cli.export(tiny_ckpt, out, use_ema=False)
    assert torch.equal(forward(ddpmlab.load(out)[0]), ema)  # the old export, whole
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    export_cli.export(tiny_ckpt, out, use_ema=False)
    assert torch.equal(forward(ddpmlab.load(out)[0]), raw)  # a complete re-export replaces it


def test_an_export_killed_mid_write_leaves_the_old_export(tiny_ckpt, tmp_path):
    """SIGKILL while the new weights are being written: the folder still holds the old export."""
    out = export_cli.export(tiny_ckpt, tmp_path / "export")
    ema = forward(ddpmlab.load(out)[0])
    script = (
        "import os, signal, sys\n"
        "from ddpmlab.cli import export as e\n"
        "api = e.safetensors_api()\n"
        "class Api:\n"
        "    def save_file(self, state, path, metadata=None):\n"
        "        api.save_file(state, path, metadata=metadata)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "e.safetensors_api = Api\n"
        "e.export(sys.argv[1], sys.argv[2], use_ema=False)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_ckpt), str(out)], capture_output=True, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "model.safetensors"]
    assert torch.equal(forward(ddpmlab.load(out)[0]), ema)
    export_cli.export(tiny_ckpt, out, use_ema=False)  # the next export goes through (the killed one's temp aside)
    assert not torch.equal(forward(ddpmlab.load(out)[0]), ema)


def test_export_refuses_to_replace_a_folder_holding_other_files(tiny_ckpt, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"holds files an export does not write \(notes.txt\)"):
        export_cli.export(tiny_ckpt, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        export_cli.export(tiny_ckpt, tmp_path / "file")


def die_mid_write(monkeypatch, name: str) -> None:
    """Path.write_text / write_bytes of any file whose name holds ``name`` write half the data, then raise."""
    originals = {m: getattr(pathlib.Path, m) for m in ("write_text", "write_bytes")}

    def patched(method):
        def write(self, data, *args, **kwargs):
            if name not in self.name:
                return originals[method](self, data, *args, **kwargs)
            originals[method](self, data[: len(data) // 2], *args, **kwargs)
            raise Boom

        return write

    for method in originals:
        monkeypatch.setattr(pathlib.Path, method, patched(method))


def test_evaluate_dying_mid_write_leaves_the_old_metrics(tiny_ckpt, tmp_path, monkeypatch):
    old = '{"bpd": {"value": 1.5}}\n'
    (tmp_path / "metrics.json").write_text(old)
    cfg = compose_cfg("evaluate", [f"ckpt_path={tiny_ckpt}", "bpd.num_images=8", "bpd.stride=25"], tmp_path)
    die_mid_write(monkeypatch, "metrics")
    with pytest.raises(Boom):
        evaluate(cfg, tmp_path)
    assert (tmp_path / "metrics.json").read_text() == old
    monkeypatch.undo()
    evaluate(cfg, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["bpd"]["n"] == 8


def test_training_dying_mid_write_leaves_the_old_final_metrics(train_cfg, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final_metrics.json").write_text('{"step": 0}')
    die_mid_write(monkeypatch, "final_metrics")
    with pytest.raises(Boom):
        train(train_cfg("trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=0"))
    assert json.loads((run / "final_metrics.json").read_text()) == {"step": 0}
    assert leftovers(run) == []
