"""Latent diffusion resumes bit for bit like pixel diffusion: a second stage killed mid-epoch (SIGKILL, no chance
to save) and continued with ckpt_path=last ends with the uninterrupted run's weights, for both encode modes, and
so does the first stage; no loader of ours makes Lightning warn that a resume is not exact, and one that does not
resume exactly says so."""

import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from conftest import REPO, TINY, compose_cfg
from ddpmlab.training import resume_path, train
from test_latent import AE, ldm_overrides

NOT_RESUMABLE = (  # Lightning's warning for a mid-epoch resume with a loader it cannot see resume
    "You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable."
)
BATCHES_PER_EPOCH = 50  # 1617 training digits in batches of 32
STEPS = 120  # crosses two epoch boundaries
CKPT_EVERY = 15  # 45, 60, ... 105: every checkpoint the kill can leave is mid-epoch


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory):
    """A first stage trained for a few steps: exactness does not depend on how good it is."""
    run = tmp_path_factory.mktemp("ae") / "run"
    short = [o for o in AE if not o.startswith(("trainer.max_steps", "trainer.val_check"))]
    train(compose_cfg("train", [*short, "trainer.max_steps=20", "trainer.val_check_interval=20"], run))
    return run / "checkpoints" / "last.ckpt"


def overrides(ae_ckpt, mode):
    return ldm_overrides(
        ae_ckpt,
        f"first_stage.encode={mode}",
        f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=40",  # validation (its own posterior draws) between training steps
        f"callbacks.checkpoint.every_n_train_steps={CKPT_EVERY}",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.denoising_chain.every_n_steps=0",
        "trainer.log_every_n_steps=10",
    )


def killed_at_a_checkpoint(args, run, min_step):
    """Run train.py in a subprocess and SIGKILL it once a periodic checkpoint of step >= min_step is written."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run}"],
        cwd=run.parent,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if any(int(p.stem.split("_")[1]) >= min_step for p in (run / "checkpoints").glob("step_*.ckpt")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL


def resume_warnings(cfg) -> list:
    """train(cfg); Lightning's warnings that the resume is not exact, and any warning filter that would hide one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
        hiding = [f for f in warnings.filters if f[0] == "ignore" and f[1] is not None and f[1].match(NOT_RESUMABLE)]
    return hiding + [str(w.message) for w in caught if "not resumable" in str(w.message)]


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("mode", ["once", "per_batch"])
def test_latent_diffusion_killed_mid_epoch_resumes_bit_for_bit(ae_ckpt, tmp_path, mode):
    args = overrides(ae_ckpt, mode)
    train(compose_cfg("train", args, tmp_path / "straight"))

    run = tmp_path / "killed"
    run.mkdir()
    killed_at_a_checkpoint(args, run, min_step=45)
    step = torch.load(resume_path(compose_cfg("train", [*args, "ckpt_path=last"], run), run), weights_only=True)
    assert 0 < step["global_step"] < STEPS and step["global_step"] % BATCHES_PER_EPOCH, step["global_step"]
    warned = resume_warnings(compose_cfg("train", [*args, "ckpt_path=last"], run))

    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (run, tmp_path / "straight"))
    assert a["global_step"] == b["global_step"] == STEPS
    for key in ("state_dict", "current_model_state"):  # EMA weights, raw weights
        assert max_abs_diff(a[key], b[key]) == 0.0, f"{mode}: {key} differs by {max_abs_diff(a[key], b[key])}"
    assert not warned


def test_first_stage_resumes_bit_for_bit(tmp_path):
    """The autoencoder's posterior sample draws from a generator seeded per step, not from the process's history."""
    args = [o for o in AE if not o.startswith(("trainer.max_steps", "trainer.val_check"))]
    args += ["trainer.max_steps=30", "trainer.val_check_interval=10"]
    train(compose_cfg("train", args, tmp_path / "straight"))
    train(compose_cfg("train", [*args, "trainer.max_steps=15"], tmp_path / "resumed"))  # mid-epoch (50 batches)
    warned = resume_warnings(compose_cfg("train", [*args, "ckpt_path=last"], tmp_path / "resumed"))
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True) for r in ("resumed", "straight"))
    assert a["global_step"] == b["global_step"] == 30
    assert max_abs_diff(a["state_dict"], b["state_dict"]) == 0.0, max_abs_diff(a["state_dict"], b["state_dict"])
    assert not warned


@pytest.mark.parametrize("on_device", [False, True], ids=["dataloader", "device_loader"])
def test_pixel_loaders_resume_mid_epoch_without_a_not_resumable_warning(tmp_path, on_device):
    """Lightning warns unless a loader is stateful; ours are, and the warning is not filtered away."""
    args = [*TINY, f"data.on_device={on_device}", "callbacks.sample_grid.every_n_steps=0"]
    run = tmp_path / "run"
    train(compose_cfg("train", [*args, "trainer.max_steps=5"], run))  # 5 of 50 batches: mid-epoch
    warned = resume_warnings(compose_cfg("train", [*args, "trainer.max_steps=7", "ckpt_path=last"], run))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert not warned


def test_a_resume_that_restarts_the_epoch_says_so(tmp_path):
    """trainer.overfit_batches makes Lightning replace our sampler with its own, which cannot skip what was trained."""
    args = [*TINY, "data.on_device=false", "trainer.overfit_batches=2", "callbacks.sample_grid.every_n_steps=0"]
    run = tmp_path / "run"
    train(compose_cfg("train", [*args, "trainer.max_steps=3"], run))  # epochs of 2 batches: step 3 is mid-epoch
    with pytest.warns(UserWarning, match="restarts the epoch at its first batch .* SequentialSampler"):
        train(compose_cfg("train", [*args, "trainer.max_steps=5", "ckpt_path=last"], run))


class Posterior:
    """A stand-in denoiser: z = mean + std * eps."""

    def scaled_sample(self, mean, std, generator):
        return mean + std * torch.randn(mean.shape, generator=generator)


def test_latent_loader_shards_by_rank_and_continues_where_a_run_stopped():
    from ddpmlab.data.latent import LatentLoader

    n, batch = 103, 8
    mean, std = torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1), torch.zeros(n, 1, 1, 1, dtype=torch.float64)
    ids = lambda batches: [int(i) for z, _ in batches for i in z.flatten()]

    def loader(rank, at=None, std=std):
        return LatentLoader(
            Posterior(), mean, std, torch.zeros(n), batch, train=True, seed=3, rank=rank, world_size=2, position=at
        )

    ranks = [ids(loader(r, lambda b: (4, 0))) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == n // 2 // batch * batch and not set(ranks[0]) & set(ranks[1])
    assert ranks[0] != ids(loader(0, lambda b: (5, 0)))  # another epoch, another order
    # resumed 2 batches into epoch 4: the rest of that epoch, posterior draws included
    noisy = torch.ones(n, 1, 1, 1, dtype=torch.float64)
    whole, rest = list(loader(0, lambda b: (4, 0), noisy)), list(loader(0, lambda b: (4, 2), noisy))
    assert len(rest) == len(whole) - 2 and all(torch.equal(a[0], b[0]) for a, b in zip(whole[2:], rest, strict=True))
