"""Whether a text model drew its caption: the protocol of ddpmlab.metrics.caption on stand-in generators whose
answers are known (a perfect one, one that always draws the same pair, a bag of words), evaluate.py
metrics=[caption] on a tiny text checkpoint, and the training callback's val/caption_acc."""

from __future__ import annotations

import csv
import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY, TINY_CLASSIFIER, compose_cfg, run_cli
from ddpmlab.callbacks import CaptionAccuracy
from ddpmlab.cli.evaluate import evaluate
from ddpmlab.data.captions import pair_captions, pair_key, pair_of
from ddpmlab.data.datasets import HELD_OUT_PAIRS
from ddpmlab.errors import ConfigError
from ddpmlab.metrics.caption import caption_accuracy, digit_svm, judge_ceiling, read_pairs

CAPTIONS = [pair_captions(*pair_of(k)) for k in range(100)]
HELD = {pair_key(a, b) for a, b in HELD_OUT_PAIRS}
KEY_OF = {c: k for k, options in enumerate(CAPTIONS) for c in options}  # every caption names one ordered pair

# A tiny text model on the digit pairs: a few hundred pairs, a small encoder, a few steps.
TINY_TEXT = [
    "experiment=text_digits", *TINY, "data.num_pairs=300", "text_encoder.dim=32", "text_encoder.depth=1",
    "callbacks.sample_grid.num_samples=16", "callbacks.caption.every_n_steps=3", "callbacks.caption.per_pair=1",
    "callbacks.caption.num_steps=2",
]  # fmt: skip


# ------------------------------------------------------------------ stand-ins: a drawing the judge reads exactly
def drawn(pairs: torch.Tensor) -> torch.Tensor:
    """[N,1,8,16] images whose left (right) half is flat at a grey level that encodes digit a (b)."""
    level = (pairs.float() / 9 * 2 - 1)[:, :, None, None, None]  # digit d -> d / 9 on [0, 1]
    return torch.cat([level[:, 0].expand(-1, 1, 8, 8), level[:, 1].expand(-1, 1, 8, 8)], -1)


def grey_judge(halves: torch.Tensor) -> np.ndarray:
    return ((halves.mean((1, 2, 3)) + 1) / 2 * 9).round().long().numpy()


def generator(choose):
    """sample(prompts, seed) drawing, for each prompt's pair (a, b), the pair ``choose(a, b)``; records its calls."""
    calls = []

    def sample(prompts, seed):
        calls.append((len(prompts), seed))
        return drawn(torch.tensor([choose(*pair_of(KEY_OF[p])) for p in prompts]))

    sample.calls = calls
    return sample


def test_a_perfect_generator_scores_one_and_a_constant_one_a_hundredth():
    perfect = caption_accuracy(generator(lambda a, b: (a, b)), CAPTIONS, HELD, grey_judge, per_pair=3).metrics
    for part in ("seen", "held_out"):
        assert (perfect[part]["accuracy"], perfect[part]["left"], perfect[part]["right"]) == (1.0, 1.0, 1.0)
    assert perfect["swap"]["all"] == perfect["swap"]["held_out"] == 1.0 and perfect["per_pair"] == [1.0] * 100

    const = caption_accuracy(generator(lambda a, b: (3, 7)), CAPTIONS, HELD, grey_judge, per_pair=3).metrics
    seen, held = const["seen"], const["held_out"]
    overall = (seen["accuracy"] * seen["n"] + held["accuracy"] * held["n"]) / (seen["n"] + held["n"])
    assert overall == pytest.approx(0.01) and seen["accuracy"] == pytest.approx(1 / 90) and held["accuracy"] == 0
    assert seen["left"] == pytest.approx(9 / 90)  # a = 3 in 9 of the 90 seen pairs ((3, 6) is held out)
    assert const["swap"]["all"] == 0 and const["per_pair"][37] == 1.0 and sum(const["per_pair"]) == 1.0


def test_a_bag_of_words_passes_half_the_pairs_and_fails_the_swap_test():
    # It hears which two digits, not which comes first: it always draws the smaller on the left.
    run = caption_accuracy(generator(lambda a, b: (min(a, b), max(a, b))), CAPTIONS, HELD, grey_judge, per_pair=2)
    m = run.metrics
    assert m["swap"] == {"all": 0.0, "seen": 0.0, "held_out": 0.0, "n": 90, "n_held_out": 20}
    right = sum(m["per_pair"])
    assert right == 55 and m["per_pair"][37] == 1.0 and m["per_pair"][73] == 0.0  # a <= b: 45 + 10 of 100
    # Which half fails: for (b, a), b > a, both halves are wrong
    assert m["seen"]["left"] == m["seen"]["accuracy"]


def test_counts_seeds_and_captions_of_the_protocol():
    per_pair = 48  # every caption of every pair once
    sample = generator(lambda a, b: (a, b))
    run = caption_accuracy(sample, CAPTIONS, HELD, grey_judge, per_pair=per_pair, seed=5)
    m = run.metrics
    assert (m["seen"]["n"], m["held_out"]["n"]) == (90 * per_pair, 10 * per_pair)
    assert (m["swap"]["n"], m["swap"]["n_held_out"]) == (45 * per_pair, 10 * per_pair)
    # (a, b) for a < b and its swap from the same seed and layout (the same noise), then the 10 pairs (a, a)
    assert sample.calls == [(45 * per_pair, 5), (45 * per_pair, 5), (10 * per_pair, 6)]
    assert Counter(run.keys.tolist()) == {k: per_pair for k in range(100)}
    for key in (37, 73, 44, pair_key(*HELD_OUT_PAIRS[0])):  # every template, both word orders, numerals and words
        drawn_for = [p for p, k in zip(run.prompts, run.keys.tolist(), strict=True) if k == key]
        assert sorted(drawn_for) == sorted(CAPTIONS[key])
    # swap partners share the template: sample i of draw 0 and sample i of draw 1 are captions number n of each
    n = 45 * per_pair
    for i in range(0, n, 97):
        first, second = run.prompts[i], run.prompts[n + i]
        assert CAPTIONS[KEY_OF[first]].index(first) == CAPTIONS[KEY_OF[second]].index(second)
        a, b = pair_of(KEY_OF[first])
        assert KEY_OF[second] == pair_key(b, a) and a < b
    with pytest.raises(ValueError, match="per_pair"):
        caption_accuracy(sample, CAPTIONS, HELD, grey_judge, per_pair=0)


# ------------------------------------------------------------------ the SVM judge on real digit pairs
@pytest.fixture(scope="module")
def val_pairs():
    dm = instantiate(compose_cfg("train", ["data=digit_pairs", "data.num_pairs=300"]).data)
    dm.setup("fit")
    return dm.val_set


def test_real_pairs_score_the_judges_ceiling_and_pass_the_swap_test(val_pairs):
    judge = digit_svm(0.1)
    assert digit_svm(0.1) is judge  # fit once
    ceiling = judge_ceiling(val_pairs.images, val_pairs.labels, judge)
    assert ceiling["n"] == 1000 and 0.95 < ceiling["accuracy"] <= min(ceiling["left"], ceiling["right"])

    def real(prompts, seed):  # the n-th prompt of a pair gets the pair's n-th validation image: each image once
        seen = Counter()
        out = []
        for p in prompts:
            key = KEY_OF[p]
            out.append(val_pairs.images[key + 100 * (seen[key] % 10)])  # validation items run 0..99, 0..99, ...
            seen[key] += 1
        return torch.stack(out).float() / 127.5 - 1

    m = caption_accuracy(real, val_pairs.captions, val_pairs.held_out, judge, per_pair=10).metrics
    seen, held = m["seen"], m["held_out"]
    for k in ("accuracy", "left", "right"):  # the same 1000 images the ceiling read
        assert (seen[k] * seen["n"] + held[k] * held["n"]) / 1000 == pytest.approx(ceiling[k])
    assert m["swap"]["all"] > 0.9 and m["swap"]["held_out"] > 0.8

    # One pair for every caption: a hundredth at most (one pair right)
    same = caption_accuracy(lambda prompts, seed: real(["a 3 left of a 7"] * len(prompts), seed), val_pairs.captions,
                            val_pairs.held_out, judge, per_pair=1).metrics  # fmt: skip
    assert same["seen"]["accuracy"] <= 1 / 90 + 1e-9 and same["held_out"]["accuracy"] == 0 and same["swap"]["all"] == 0


def test_read_pairs_reads_the_left_then_the_right_half(val_pairs):
    x = val_pairs.images[:100].float() / 127.5 - 1
    read = read_pairs(x, digit_svm(0.1))
    keys = val_pairs.labels[:100]
    assert (read[:, 0] == keys // 10).float().mean() > 0.95 and (read[:, 1] == keys % 10).float().mean() > 0.95
    swapped = read_pairs(torch.cat([x[..., 8:], x[..., :8]], -1), digit_svm(0.1))
    assert torch.equal(swapped, read.flip(1))


# ------------------------------------------------------------------ evaluate.py and the callback, on a tiny model
@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from ddpmlab.training import train

    run = tmp_path_factory.mktemp("text_run")
    train(compose_cfg("train", TINY_TEXT, run))
    return run


def test_training_logs_caption_accuracy(text_run):
    rows = [r for r in csv.DictReader(open(text_run / "metrics.csv")) if r.get("val/caption_acc")]
    assert [int(r["step"]) for r in rows] == [2, 5]  # every 3 steps (logged at the step of the batch just trained)
    for r in rows:
        for key in ("val/caption_acc", "val/caption_acc_held_out", "val/caption_swap"):
            assert 0 <= float(r[key]) <= 1
        assert float(r["val/caption_seconds"]) > 0


def test_evaluate_caption_writes_every_number(text_run, tmp_path):
    out = tmp_path / "eval"
    ckpt = text_run / "checkpoints" / "last.ckpt"
    r = run_cli("evaluate.py", f"ckpt_path={ckpt}", "metrics=[caption]", "caption.per_pair=1",
                "caption.sampler.num_steps=2", "caption.guidance=2", f"hydra.run.dir={out}", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "swap test:" in r.stdout and "held_out" in r.stdout
    saved = json.loads((out / "caption.json").read_text())
    assert {"seen", "held_out", "swap", "ceiling", "per_pair", "protocol", "grid"} <= set(saved)
    assert (saved["seen"]["n"], saved["held_out"]["n"], saved["swap"]["n"], saved["ceiling"]["n"]) == (90, 10, 45, 1000)
    for part in ("seen", "held_out", "ceiling"):
        assert {"accuracy", "left", "right"} <= set(saved[part])
    p = saved["protocol"]
    assert p["guidance"] == 2.0 and p["sampler"]["num_steps"] == 2 and p["num_samples"] == 100 and "SVM" in p["judge"]
    assert p["held_out_pairs"] == sorted(HELD)
    assert saved["grid"][0]["held_out"] and saved["grid"][1]["pair"] == saved["grid"][0]["pair"][::-1]
    assert (out / "caption_grid.png").stat().st_size > 0
    assert json.loads((out / "metrics.json").read_text())["caption"]["swap"] == saved["swap"]


def test_a_classifier_checkpoint_judges_instead_of_the_svm(text_run, tmp_path):
    from ddpmlab.training import train

    train(compose_cfg("train", TINY_CLASSIFIER, tmp_path / "clf"))
    clf = tmp_path / "clf" / "checkpoints" / "last.ckpt"
    over = [f"ckpt_path={text_run / 'checkpoints' / 'last.ckpt'}", "metrics=[caption]", "caption.per_pair=1",
            "caption.sampler.num_steps=2", f"caption.classifier={clf}"]  # fmt: skip
    result = evaluate(compose_cfg("evaluate", over, tmp_path / "eval"), tmp_path / "eval")["caption"]
    assert result["protocol"]["judge"] == f"{clf} at t = 0" and result["ceiling"]["n"] == 1000
    assert 0 <= result["seen"]["accuracy"] <= 1 and 0 <= result["ceiling"]["accuracy"] <= 1


def test_caption_needs_a_text_model_on_digit_pairs(tiny_ckpt, tmp_path):
    cfg = compose_cfg("evaluate", [f"ckpt_path={tiny_ckpt}", "metrics=[caption]"], tmp_path)
    with pytest.raises(ConfigError, match=r"metrics=\[caption\] needs a model trained on data=digit_pairs"):
        evaluate(cfg, tmp_path)
    assert not (tmp_path / "caption.json").exists()


def test_the_callback_switches_itself_off_without_text_or_pairs():
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_set=object(), name="digits"))
    for module in (SimpleNamespace(text=False), SimpleNamespace(text=True)):
        cb = CaptionAccuracy(every_n_steps=1)
        with pytest.warns(UserWarning, match="caption accuracy switched off"):
            cb.setup(trainer, module, "fit")
        assert not cb.enabled
    with pytest.raises(ConfigError, match="per_pair"):
        CaptionAccuracy(per_pair=0)


@pytest.mark.ddp
def test_the_callback_under_two_process_ddp(tmp_path):
    # Rank 0 draws and reads the samples, the other rank waits in the broadcast: one value, and training goes on
    run = tmp_path / "run"
    overrides = [o for o in TINY_TEXT if not o.startswith(("trainer.max_steps", "callbacks.checkpoint"))]
    res = run_cli("train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *overrides,
                  "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=3", f"hydra.run.dir={run}",
                  cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val/caption_acc")]
    assert [int(r["step"]) for r in rows] == [2] and 0 <= float(rows[0]["val/caption_swap"]) <= 1
