"""Two-process CPU DDP (gloo): the FID callback's synced value equals one process's on the same samples, and
a `trainer=ddp` training through the CLI runs and writes one set of checkpoints."""

import json

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY, compose_cfg
from ddpmlab.api import build_module
from ddpmlab.callbacks.fid import FID
from test_fid import TinyFeatures

pytestmark = pytest.mark.ddp


class RecordingFID(FID):
    """Writes what each rank generated and computed to <out>/rank<r>.json."""

    def __init__(self, out, **kwargs):
        super().__init__(**kwargs)
        self.out = out

    def evaluate(self, trainer, pl_module):
        values = super().evaluate(trainer, pl_module)
        record = {"values": values, "generated": self.generated, "noise_seed": pl_module._noise.initial_seed()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
        return values


def fid_run(tmp_path, name, devices, cache_dir, extra=()):
    """One training step at lr=0 (weights stay at their seeded init), then FID at the end of training."""
    cfg = compose_cfg("train", TINY + ["optimizer.lr=0.0", *extra], tmp_path / name)
    pl.seed_everything(0, verbose=False)
    module, datamodule = build_module(cfg), instantiate(cfg.data)
    out = tmp_path / name
    out.mkdir(parents=True)
    fid = RecordingFID(
        out,
        every_n_steps=0,
        num_samples=12,
        batch_size=4,
        num_steps=2,
        feature=TinyFeatures(),
        cache_dir=cache_dir,
        num_real=100,
        kid_subsets=5,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[fid],
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=datamodule)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


@pytest.mark.parametrize("extra", [[], ["experiment=sr_digits"]], ids=["unconditional", "image_conditioned"])
def test_fid_under_two_process_ddp_equals_one_process_and_ranks_share_the_work(tmp_path, extra):
    # an image-conditioned model draws sample i for validation image i's condition, on whichever rank draws it
    [single] = fid_run(tmp_path, "single", 1, cache_dir=None, extra=extra)
    r0, r1 = fid_run(tmp_path, "ddp", 2, cache_dir=tmp_path / "cache", extra=extra)
    # 3 chunks of 4 images, seeds 0, 1, 2: rank 0 draws chunks 0-1, rank 1 chunk 2; one process draws all three
    assert single["generated"] == [[0, 4], [1, 4], [2, 4]]
    assert r0["generated"] == [[0, 4], [1, 4]] and r1["generated"] == [[2, 4]]
    # the synced value is the same on both ranks and equals the single process's on the same samples
    for key in ("fid", "kid"):
        assert r0["values"][key] == r1["values"][key]
        assert r0["values"][key] == pytest.approx(single["values"][key], rel=1e-4, abs=1e-7)
    assert single["values"]["fid"] > 0
    # each rank trained with its own noise / timestep generator
    assert r0["noise_seed"] != r1["noise_seed"]
    # the real features were computed once (by rank 0) and cached for both ranks
    [stats] = (tmp_path / "cache").glob("digits-1x8x8-n100-*.pt")
    assert torch.load(stats, weights_only=True)["features"].shape == (100, 6)
