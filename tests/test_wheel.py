"""The package as users install it: build the wheel, install it (not editable) into a fresh virtual environment,
and train there, with the configs the wheel ships and with a user's own config directory."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*cmd, cwd: Path, env=None, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
@pytest.mark.wheel
def test_the_wheel_installs_and_trains_in_a_fresh_environment(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    skip = shutil.ignore_patterns(".git", ".venv", "outputs", "build", "dist", "*.egg-info", "__pycache__", "wandb")
    shutil.copytree(REPO, source, ignore=skip)
    dist = tmp_path / "dist"
    build = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source)
    run(*build, cwd=tmp_path)
    (wheel,) = dist.glob("ddpmlab-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = Path(run(python, "-c", code, cwd=tmp_path).stdout.strip())
    # The dependencies come from the environment running the tests (a path, so none of its .pth files, an
    # editable ddpmlab included, take effect); ddpmlab itself only from the wheel.
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no checkout on the path
    env.update(WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    pip = (sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    run(*pip, cwd=tmp_path, env=env)
    code = "import ddpmlab, ddpmlab.api as a; print(ddpmlab.__file__); print(a.CONFIG_DIR)"
    where = run(python, "-c", code, cwd=tmp_path, env=env)
    module_file, config_dir = where.stdout.split()
    assert Path(module_file).is_relative_to(venv) and Path(config_dir, "train.yaml").is_file()

    train = venv / "bin" / "ddpm-train"
    run(train, "model=unet_tiny", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()

    mine = tmp_path / "my_configs" / "experiment"
    mine.mkdir(parents=True)
    (mine / "tiny_cosine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: unet_tiny\n  - override /schedule: cosine\n"
        "trainer:\n  max_steps: 1\n"
    )
    r = run(
        train, "--config-dir", tmp_path / "my_configs", "experiment=tiny_cosine", "--cfg", "job", cwd=tmp_path, env=env
    )
    assert "cosine_betas" in r.stdout and "max_steps: 1" in r.stdout
