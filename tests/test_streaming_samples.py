"""sample.py writes samples to disk as it draws them (one batch in memory), and the same command run again into the
same folder after a kill continues from the chunks on disk to the samples an uninterrupted run writes."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, compose_cfg, run_cli
from ddpmlab.chunks import SampleChunks
from ddpmlab.cli.sample import sample
from ddpmlab.errors import ConfigError
from ddpmlab.fileio import atomic_path
from ddpmlab.samplers import Sampler, generate
from ddpmlab.samplers.generate import generate_batches
from test_same_samples import tiny_denoiser

FAST = ["sampler=ddim", "sampler.num_steps=3"]


def sample_cfg(ckpt, out, *extra):
    return compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=10", "batch_size=3", *FAST, *extra], out)


def outputs(out):
    with np.load(out / "samples.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, (out / "grid.png").read_bytes()


class Killed(Exception):
    pass


def die_after(monkeypatch, chunks: int):
    write = SampleChunks.write

    def write_then_die(self, index, images, state):
        write(self, index, images, state)
        if index + 1 == chunks:
            raise Killed

    monkeypatch.setattr(SampleChunks, "write", write_then_die)


def test_generate_batches_continue_from_a_state_as_if_never_stopped():
    denoiser, sampler = tiny_denoiser(), Sampler("ddpm", 10, "trailing")
    whole = generate(denoiser, sampler, 7, seed=5, batch_size=2)
    batches = list(generate_batches(denoiser, sampler, 7, seed=5, batch_size=2))
    assert torch.equal(torch.cat([x for x, _ in batches]), whole)
    rest = generate_batches(denoiser, sampler, 7, seed=5, batch_size=2, start=4, generator_state=batches[1][1])
    assert torch.equal(torch.cat([x for x, _ in rest]), whole[4:])
    assert torch.is_grad_enabled()  # the batches are drawn without autograd; the caller's mode is its own


@pytest.mark.parametrize("stop", ["mid_draw", "assembling"])
def test_a_stopped_draw_continues_to_the_same_samples(tiny_ckpt, tmp_path, monkeypatch, capsys, stop):
    whole = outputs(sample(sample_cfg(tiny_ckpt, tmp_path / "whole"), tmp_path / "whole"))
    out = tmp_path / "stopped"
    if stop == "mid_draw":
        die_after(monkeypatch, 2)
    else:  # every batch drawn, killed while samples.npz is written
        assemble = SampleChunks.assemble

        def die_mid_write(self, path, **arrays):
            with atomic_path(path) as tmp:
                assemble(self, tmp, **arrays)
                raise Killed

        monkeypatch.setattr(SampleChunks, "assemble", die_mid_write)
    with pytest.raises(Killed):
        sample(sample_cfg(tiny_ckpt, out), out)
    chunks = 2 if stop == "mid_draw" else 4
    assert sorted(p.name for p in (out / "chunks").iterdir()) == [f"chunk_{i:06d}.npz" for i in range(chunks)] + [
        "settings.json"
    ]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == []  # no samples.npz, no grid, nothing half
    monkeypatch.undo()
    capsys.readouterr()
    sample(sample_cfg(tiny_ckpt, out), out)
    assert (
        f"continuing: {min(3 * chunks, 10)} of 10 samples already drawn in {out / 'chunks'}" in capsys.readouterr().out
    )
    again = outputs(out)
    assert again[0].keys() == whole[0].keys() == {"images"}
    assert np.array_equal(again[0]["images"], whole[0]["images"]) and again[1] == whole[1]
    assert not (out / "chunks").exists()  # samples.npz holds them all


def test_a_stopped_inpainting_continues_to_the_same_completions(tiny_ckpt, tmp_path, monkeypatch):
    extra = ["inpaint.index=3", "inpaint.num_steps=6", "inpaint.jump_length=2", "inpaint.jump_n_sample=2"]
    cfg = lambda out: sample_cfg(tiny_ckpt, out, *extra)
    sample(cfg(tmp_path / "whole"), tmp_path / "whole")
    die_after(monkeypatch, 1)
    with pytest.raises(Killed):
        sample(cfg(tmp_path / "stopped"), tmp_path / "stopped")
    monkeypatch.undo()
    sample(cfg(tmp_path / "stopped"), tmp_path / "stopped")
    with np.load(tmp_path / "whole" / "samples.npz") as a, np.load(tmp_path / "stopped" / "samples.npz") as b:
        assert a.files == b.files == ["images", "original", "keep"]
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    assert (tmp_path / "whole" / "inpaint.png").read_bytes() == (tmp_path / "stopped" / "inpaint.png").read_bytes()


@pytest.mark.parametrize("change", ["seed=1", "batch_size=4", "sampler.num_steps=4", "use_ema=false"])
def test_chunks_drawn_with_other_settings_are_refused(tiny_ckpt, tmp_path, monkeypatch, change):
    out = tmp_path / "out"
    die_after(monkeypatch, 1)
    with pytest.raises(Killed):
        sample(sample_cfg(tiny_ckpt, out), out)
    monkeypatch.undo()
    key = {"seed=1": "seed", "batch_size=4": "batch_size", "sampler.num_steps=4": "sampler", "use_ema=false": "weights"}
    with pytest.raises(ConfigError, match=f"holds samples drawn with other settings \\({key[change]} differ"):
        sample(sample_cfg(tiny_ckpt, out, change), out)
    assert (out / "chunks" / "chunk_000000.npz").is_file()  # refused, never deleted


def test_streamed_samples_npz_is_what_savez_compressed_writes(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    chunks = SampleChunks(tmp_path / "chunks", {"seed": 0}, 7, 3)
    assert chunks.resume() == (0, None)
    for i in range(3):
        chunks.write(i, images[3 * i : 3 * i + 3], torch.zeros(4, dtype=torch.uint8))
    labels, keep = np.arange(7), np.eye(4, dtype=bool)
    chunks.assemble(tmp_path / "streamed.npz", labels=labels, keep=keep)
    np.savez_compressed(tmp_path / "whole.npz", images=images, labels=labels, keep=keep)
    with np.load(tmp_path / "streamed.npz") as a, np.load(tmp_path / "whole.npz") as b:
        assert a.files == b.files
        for k in a.files:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])
    assert np.array_equal(chunks.head(5), images[:5])


def test_sigkill_mid_draw_then_the_same_command_finishes_it(tiny_ckpt, tmp_path):
    args = [f"ckpt_path={tiny_ckpt}", "num_samples=600", "batch_size=2", *FAST]
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "sample.py"), *args, f"hydra.run.dir={out}"],
        cwd=tmp_path,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while not (out / "chunks" / "chunk_000003.npz").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    drawn = len(list((out / "chunks").glob("chunk_*.npz")))
    assert 4 <= drawn < 300 and not (out / "samples.npz").exists()
    r = run_cli("sample.py", *args, f"hydra.run.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"continuing: {2 * drawn} of 600 samples already drawn" in r.stdout
    whole = outputs(sample(compose_cfg("sample", args, tmp_path / "whole"), tmp_path / "whole"))
    assert np.array_equal(outputs(out)[0]["images"], whole[0]["images"]) and outputs(out)[1] == whole[1]


def test_num_samples_has_a_sane_bound(tiny_ckpt, tmp_path):
    r = run_cli(
        "sample.py", f"ckpt_path={tiny_ckpt}", "num_samples=1000000000", f"hydra.run.dir={tmp_path}", cwd=tmp_path
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "ddpmlab: error: num_samples=1000000000 is more than 1,000,000: samples.npz holds them all, C*H*W bytes each "
        "(3,072 GB at 32x32 RGB), and is read whole; FID uses 50,000. Draw a larger set as several runs with "
        "different seeds"
    ]
    sample(
        compose_cfg("sample", [f"ckpt_path={tiny_ckpt}", "num_samples=1", *FAST], tmp_path / "one"), tmp_path / "one"
    )
