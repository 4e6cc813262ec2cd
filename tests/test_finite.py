"""A training that diverges stops at once with one line, writes no checkpoint of NaN weights, and ``ckpt_path=last``
keeps the last finite one; a model with non-finite weights is refused wherever it is loaded to sample."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import TINY, compose_cfg, run_cli
from ddpmlab.api import classifier_from_checkpoint, load, load_checkpoint, safetensors_api
from ddpmlab.callbacks.finite import FiniteGuard, TrainingDivergedError
from ddpmlab.cli.export import export
from ddpmlab.errors import CheckpointError
from ddpmlab.training import resume_path, train


class Poison(Callback):
    """Test fault: at step ``at_step``, a NaN in the first weight (``weight``) or an infinity in its gradient after
    the backward pass (``grad``, the loss of that step stays finite)."""

    def __init__(self, at_step: int, where: str = "weight") -> None:
        self.at_step, self.where = at_step, where

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.where == "weight" and trainer.global_step == self.at_step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.where == "grad" and trainer.global_step == self.at_step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


def poison(at_step: int, where: str = "weight") -> list[str]:
    return [
        "+callbacks.poison._target_=test_finite.Poison",
        f"+callbacks.poison.at_step={at_step}",
        f"+callbacks.poison.where={where}",
    ]


EVERY_STEP = ["trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=1"]
KINDS = {
    "diffusion": TINY,
    "classifier": [
        "experiment=classifier_digits", "schedule.num_timesteps=50", "data.batch_size=32",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "model.base_channels=16", "model.channel_mult=[1,2]",
        "model.num_res_blocks=1", "model.attn_resolutions=[]", "model.num_groups=8", "model.num_heads=1",
    ],
    "autoencoder": [
        "experiment=autoencoder_mnist", "data=digits", "data.image_size=8", "data.batch_size=32",
        "first_stage.net.base_channels=8", "first_stage.net.channel_mult=[1,2]", "first_stage.net.num_groups=4",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "callbacks.reconstruction_grid.num_images=4", "logger=csv",
    ],
}  # fmt: skip


def assert_finite_checkpoints(folder, step: int) -> None:
    """Every checkpoint in ``folder`` is complete, finite and at most at ``step``, and resume picks one at ``step``."""
    names = sorted(p.name for p in folder.glob("*.ckpt"))
    assert "on_exception.ckpt" not in names and "last.ckpt" in names, names
    for p in folder.glob("*.ckpt"):
        ckpt = torch.load(p, weights_only=True)
        assert ckpt["global_step"] <= step, (p.name, ckpt["global_step"])
        for key in ("state_dict", "current_model_state"):
            for name, w in (ckpt.get(key) or {}).items():
                assert not w.is_floating_point() or torch.isfinite(w).all(), f"{p.name}: {key}[{name}]"
    cfg = SimpleNamespace(get=lambda key, default=None: "last" if key == "ckpt_path" else default, ckpt_path="last")
    chosen = resume_path(cfg, folder.parent)
    assert torch.load(chosen, weights_only=True)["global_step"] == step


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_nan_stops_every_kind_of_training_at_its_step_and_keeps_the_last_finite_checkpoint(tmp_path, kind):
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as e:
        train(compose_cfg("train", KINDS[kind] + EVERY_STEP + poison(3), run))
    message = str(e.value)
    assert "\n" not in message and "of step 3 is not finite" in message and str(run / "checkpoints") in message
    assert_finite_checkpoints(run / "checkpoints", step=3)  # the weights after 3 steps, which the 4th step broke


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("every,at", [(1, 3), (5, 6)], ids=["saved_every_step", "read_a_step_later"])
def test_on_a_gpu_the_verdict_read_a_step_later_still_names_the_step_and_saves_nothing_after_it(tmp_path, every, at):
    # every=1: the save at the next step reads the pending verdict first; every=5: the next step's end reads it.
    run = tmp_path / "run"
    cfg = TINY + ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.max_steps=12"]
    cfg += [f"callbacks.checkpoint.every_n_train_steps={every}", *poison(at)]
    with pytest.raises(TrainingDivergedError, match=f"of step {at} is not finite"):
        train(compose_cfg("train", cfg, run))
    assert_finite_checkpoints(run / "checkpoints", step=at if every == 1 else 5)


def test_an_infinite_gradient_stops_training_though_the_loss_is_finite(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match="of step 2 is not finite"):
        train(compose_cfg("train", TINY + EVERY_STEP + poison(2, "grad"), run))
    assert_finite_checkpoints(run / "checkpoints", step=2)


def test_no_checkpoint_is_written_with_non_finite_weights(tmp_path):
    guard = FiniteGuard()
    trainer = SimpleNamespace(global_step=7, checkpoint_callbacks=[])
    good = {"state_dict": {"w": torch.ones(3), "steps": torch.tensor(4)}}
    guard.on_save_checkpoint(trainer, None, good)  # passes
    bad = {
        "state_dict": {"w": torch.ones(3)},
        "current_model_state": {"a": torch.ones(2), "b": torch.tensor([1.0, -torch.inf])},
    }
    with pytest.raises(TrainingDivergedError, match=r"the weight b is not finite at step 7"):
        guard.on_save_checkpoint(trainer, None, bad)


def test_a_diverging_cli_run_exits_2_with_one_line_and_resume_picks_the_last_finite_checkpoint(tmp_path):
    run = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith(("trainer.max_steps", "callbacks.checkpoint"))]
    res = run_cli(
        "train.py", *overrides, "optimizer.lr=1e6", "trainer.max_steps=30",
        "callbacks.checkpoint.every_n_train_steps=1", f"hydra.run.dir={run}", cwd=tmp_path,
    )  # fmt: skip
    errors = [line for line in res.stderr.splitlines() if line.startswith("ddpmlab: error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    step = int(re.search(r"of step (\d+) is not finite", errors[0]).group(1))
    assert step < 30
    assert_finite_checkpoints(run / "checkpoints", step=step)


@pytest.fixture
def nan_ckpt(tiny_ckpt, tmp_path):
    """A copy of the tiny checkpoint whose EMA and raw weights both hold a NaN, as a diverged training leaves them."""
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    for key in ("state_dict", "current_model_state"):
        name = next(k for k in ckpt[key] if k.startswith("denoiser.net.") and ckpt[key][k].is_floating_point())
        ckpt[key][name].view(-1)[0] = float("nan")
    path = tmp_path / "nan.ckpt"
    torch.save(ckpt, path)
    return path


def test_loading_refuses_non_finite_weights_from_a_checkpoint_or_an_export(nan_ckpt, tiny_ckpt, tmp_path):
    for ema in (True, False):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(nan_ckpt))}: the weight net\.\S+ is not finite"):
            load(nan_ckpt, ema=ema)
    with pytest.raises(CheckpointError, match="is not finite"):
        export(nan_ckpt, tmp_path / "refused")
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    folder = export(tiny_ckpt, tmp_path / "export")
    weights = folder / "model.safetensors"
    state = safetensors_api().load_file(str(weights))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] = float("inf")
    safetensors_api().save_file(state, str(weights))
    with pytest.raises(
        CheckpointError, match=rf"^{re.escape(str(weights))}: the weight {re.escape(name)} is not finite"
    ):
        load(folder)


def test_classifier_guidance_refuses_a_non_finite_classifier(tmp_path):
    run = tmp_path / "classifier"
    train(compose_cfg("train", KINDS["classifier"] + ["trainer.max_steps=1"], run))
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    classifier_from_checkpoint(ckpt)  # finite: loads
    name = next(k for k in ckpt["state_dict"] if k.startswith("net."))
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))
    with pytest.raises(CheckpointError, match=r"classifier checkpoint: the weight \S+ is not finite"):
        classifier_from_checkpoint(ckpt)


def test_sample_py_refuses_a_nan_checkpoint_with_one_line(nan_ckpt, tmp_path):
    res = run_cli(
        "sample.py", f"ckpt_path={nan_ckpt}", "num_samples=4", f"hydra.run.dir={tmp_path / 's'}", cwd=tmp_path
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"ddpmlab: error: {nan_ckpt}: the weight" in res.stderr
    assert not (tmp_path / "s" / "samples.npz").exists()
