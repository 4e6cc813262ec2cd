"""The console: training progress over steps, sampling progress, the config tree, no warnings from ddpmlab's
own configs, the closing summary, no empty run directory after a failed call; the thread count chooser;
the everyday training options (AdamW, LR schedules, accumulation, declared debug flags)."""

import logging
import time
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg, run_cli
from ddpmlab.api import build_module
from ddpmlab.console import final_summary
from ddpmlab.diffusion import GaussianDiffusion
from ddpmlab.diffusion.parameterization import Denoiser
from ddpmlab.diffusion.schedules import linear_betas
from ddpmlab.lit.module import lr_factor
from ddpmlab.networks import UNet
from ddpmlab.perf import choose_cpu_threads, sampling_cpu_threads, set_cpu_threads
from ddpmlab.progress import SamplingProgress
from ddpmlab.samplers import Sampler
from ddpmlab.stages import CLASSIFIER, FIRST_STAGE, LATENT, PIXEL, stage_of
from ddpmlab.training import train

PROGRESS_ON = ["trainer.enable_progress_bar=true", "callbacks.progress.every_n_steps=2"]


def test_training_progress_prints_a_line_every_n_steps_off_a_terminal(train_cfg, capsys):
    train(train_cfg(*PROGRESS_ON, "extras.print_config=false"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    assert "loss" in lines[-1] and "img/s" in lines[-1] and "ETA 0:00" in lines[-1]


def test_training_progress_is_one_bar_over_the_steps_on_a_terminal(train_cfg, capsys):
    train(train_cfg(*PROGRESS_ON, "+callbacks.progress.terminal=true", "extras.print_config=false"))
    out = capsys.readouterr().out
    assert "6/6" in out and "train" in out and "Epoch" not in out
    assert not any(line.startswith("step ") for line in out.splitlines())


def test_sampling_progress_counts_network_evaluations(capsys):
    diffusion = GaussianDiffusion(linear_betas(50))
    denoiser = Denoiser(
        UNet(1, image_size=8, base_channels=8, channel_mult=[1], num_res_blocks=1, attn_resolutions=[], num_groups=4),
        diffusion,
    ).eval()
    sampler = Sampler("ddim", num_steps=7)
    with SamplingProgress(2 * sampler.num_evaluations(diffusion), "sampling") as bar:
        for _ in range(2):
            sampler(denoiser, torch.randn(2, 1, 8, 8), progress=bar.wrap)
    assert bar.n == 14
    lines = capsys.readouterr().out.splitlines()  # not a terminal: a line per quarter
    assert len(lines) == 4 and lines[-1].startswith("sampling: 14/14 evals (100%)")
    with SamplingProgress(10, enabled=False) as quiet:
        quiet.update(10)
    assert capsys.readouterr().out == ""


def test_config_tree_warnings_and_closing_summary(train_cfg, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(train_cfg("trainer.log_every_n_steps=25"))  # an epoch of fewer batches than the logging interval
    messages = [str(w.message) for w in caught]
    assert messages == [], messages
    out = capsys.readouterr().out
    assert "config" in out and "├── model" in out and "base_channels: 16" in out  # the tree, resolved
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"checkpoint: {ckpt}" in out
    assert f"sample with: python sample.py ckpt_path={ckpt}" in out
    assert "trained 6 steps" in out and "val/loss" in out


def test_print_config_switch(train_cfg, capsys):
    train(train_cfg("extras.print_config=false"))
    assert "├── model" not in capsys.readouterr().out


def test_a_failed_call_leaves_no_empty_run_directory(tmp_path):
    proc = run_cli("sample.py", f"ckpt_path={tmp_path / 'missing.ckpt'}", cwd=tmp_path)
    assert proc.returncode == 2 and "ddpmlab: error:" in proc.stderr
    assert not (tmp_path / "outputs" / "sample").exists()


def test_choose_cpu_threads_keeps_the_faster_count(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    chosen_counts = []
    monkeypatch.setattr(torch, "set_num_threads", chosen_counts.append)
    current = {"n": 2}

    def set_threads(n):
        current["n"] = n
        chosen_counts.append(n)

    monkeypatch.setattr(torch, "set_num_threads", set_threads)
    # a step that is slow on two threads: 1 is chosen
    assert choose_cpu_threads(lambda: time.sleep(0.02 if current["n"] == 2 else 0.001), []) == 1
    # and one that is slow on one thread: 2 is chosen
    assert choose_cpu_threads(lambda: time.sleep(0.02 if current["n"] == 1 else 0.001), []) == 2
    assert current["n"] == 2


def test_cpu_threads_setting(monkeypatch):
    diffusion = GaussianDiffusion(linear_betas(50))
    net = UNet(1, image_size=8, base_channels=8, channel_mult=[1], num_res_blocks=1, attn_resolutions=[], num_groups=4)
    module = type("M", (), {"denoiser": Denoiser(net, diffusion)})()
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(module, 1, (4, 1, 8, 8)) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user decided: auto measures nothing
        assert set_cpu_threads(module, "auto", (4, 1, 8, 8)) == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_cpu_threads(module, "auto", (4, 1, 8, 8)) in (1, before)
        assert all(p.grad is None for p in net.parameters())  # the timing leaves no gradient behind
        assert sampling_cpu_threads(module.denoiser, "cpu", 16) in (1, before)
        from ddpmlab.errors import ConfigError

        with pytest.raises(ConfigError, match="cpu_threads"):
            set_cpu_threads(module, 0, (4, 1, 8, 8))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("budget", "probed"), [(60.0, 64), (0.0, 32)])
def test_cpu_threads_auto_times_the_whole_batch_when_it_is_cheap(monkeypatch, budget, probed):
    import ddpmlab.perf as perf

    diffusion = GaussianDiffusion(linear_betas(50))
    net = UNet(1, image_size=8, base_channels=8, channel_mult=[1], num_res_blocks=1, attn_resolutions=[], num_groups=4)
    module = type("M", (), {"denoiser": Denoiser(net, diffusion)})()
    sizes, probe = [], perf.training_probe
    monkeypatch.setattr(perf, "training_probe", lambda m, n, shape: sizes.append(n) or probe(m, n, shape))
    monkeypatch.setattr(perf, "FULL_BATCH_PROBE_SECONDS", budget)
    monkeypatch.delenv("OMP_NUM_THREADS")
    rng = torch.get_rng_state()
    before = torch.get_num_threads()
    try:
        set_cpu_threads(module, "auto", (64, 1, 8, 8))
    finally:
        torch.set_num_threads(before)
    assert sizes[-1] == probed and sizes[0] == 32  # a slice first, to estimate what the whole batch costs
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=classifier_digits"],
        ["experiment=autoencoder_mnist", "first_stage=vq_f4"],
        ["experiment=autoencoder_mnist"],
    ],
)
def test_cpu_threads_auto_times_every_kind_of_training_module(overrides, tmp_path, monkeypatch):
    # auto times a training step of what the run trains: a noisy classifier, or a first stage on 8x8 images
    small = ["data=digits", "data.image_size=8"]
    if "autoencoder" in overrides[0]:
        small += ["first_stage.net.base_channels=8", "first_stage.net.num_groups=4"]
    cfg = compose_cfg("train", overrides + small, tmp_path)
    module, probe = build_module(cfg), stage_of(cfg).training_probe
    before = torch.get_num_threads()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    monkeypatch.delenv("OMP_NUM_THREADS")
    try:
        assert set_cpu_threads(module, "auto", (32, 1, 8, 8), probe) in (1, before)
    finally:
        torch.set_num_threads(before)
    assert all(p.grad is None for p in module.parameters())
    for k, v in module.state_dict().items():  # the probe changes nothing, a VQ codebook's EMA included
        torch.testing.assert_close(v, state[k], msg=k)


@pytest.mark.parametrize(
    ("schedule", "warmup", "expected"),
    [
        ("constant", 0, [1.0, 1.0, 1.0, 1.0]),
        ("constant", 2, [0.5, 1.0, 1.0, 1.0]),
        ("cosine", 0, [1.0, 0.5 * (1 + 0.5**0.5), 0.5, 0.5 * (1 - 0.5**0.5)]),
        ("cosine", 2, [0.5, 1.0, 1.0, 0.5]),
    ],
)
def test_lr_factor(schedule, warmup, expected):
    assert [lr_factor(schedule, warmup, 4, s) for s in range(4)] == pytest.approx(expected)


def test_adamw_cosine_and_gradient_accumulation_train(train_cfg, tmp_path):
    cfg = train_cfg(
        "optimizer=adamw",
        "optimizer.lr_schedule=cosine",
        "optimizer.lr_warmup_steps=2",
        "trainer.accumulate_grad_batches=2",
    )
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6  # optimizer steps, each over 2 batches
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 12
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["weight_decay"] == 0.01 and group["lr"] == pytest.approx(1e-3 * lr_factor("cosine", 2, 6, 6))
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 6


def test_debug_trainer_flags_are_declared(train_cfg):
    cfg = train_cfg(
        "trainer.fast_dev_run=true",
        "trainer.overfit_batches=2",
        "trainer.limit_train_batches=3",
        "trainer.detect_anomaly=true",
        "trainer.profiler=simple",
    )  # no '+' needed
    assert cfg.trainer.fast_dev_run is True and cfg.trainer.profiler == "simple"


def test_last_checkpoint_written_at_the_end_is_full_and_silent(train_cfg, tmp_path, caplog):
    # 7 steps with checkpoints every 3: last.ckpt at step 7 is written when training ends
    with caplog.at_level(logging.INFO):
        train(train_cfg("trainer.max_steps=7"))
    assert not [r.getMessage() for r in caplog.records if "weights_only" in r.getMessage()]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 7 and ckpt["optimizer_states"] and ckpt["callbacks"]


@pytest.mark.parametrize(
    "stage,expected",
    [
        (PIXEL, "sample with: python sample.py ckpt_path=run/last.ckpt"),
        (LATENT, "sample with: python sample.py ckpt_path=run/last.ckpt"),
        (FIRST_STAGE, "python train.py experiment=ldm_mnist first_stage.ckpt_path=run/last.ckpt"),
        (CLASSIFIER, "python sample.py ckpt_path=<diffusion ckpt> classifier.ckpt_path=run/last.ckpt"),
    ],
)
def test_closing_lines_name_the_next_command_for_what_was_trained(stage, expected):
    metrics = {"val/psnr": 27.91, "val/ssim": 0.97, "val/acc": 0.5, "train/loss": 0.1, "lr-Adam": 1e-3}
    out = final_summary(600, 312.0, metrics, "run/last.ckpt", stage.next_command)
    assert expected in out and "checkpoint: run/last.ckpt" in out
    assert "val/psnr 27.91" in out and "val/acc 0.5" in out and "lr-Adam" not in out


@pytest.mark.parametrize("stage", [PIXEL, LATENT])
def test_the_closing_line_of_an_image_conditioned_run_gives_the_input_too(stage):
    cfg = OmegaConf.create({"task": {"name": "sr", "factor": 2}})
    line = stage.next_command("run/last.ckpt", cfg)
    assert line == "sample with: python sample.py ckpt_path=run/last.ckpt cond.index=0 num_samples=8"
    assert stage.next_command("run/last.ckpt", OmegaConf.create({})).endswith("ckpt_path=run/last.ckpt")
