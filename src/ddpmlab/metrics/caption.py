"""Whether a text-to-image model on the digit pairs (data=digit_pairs) drew what its caption said: a judge reads each
8x16 sample as two digits, its left half and its right half, and the sample counts when it reads the caption's
digits in the caption's order.

The protocol (``evaluate.py metrics=[caption]`` and the training callback ``CaptionAccuracy``):

- every one of the 100 ordered pairs (a, b) gets ``per_pair`` samples; sample j of (a, b) is drawn for its caption
  number ``(j + a + b) mod K`` of the pair's K captions, so the captions cycle through every template, both word
  orders and numerals and words (not only the canonical "a {a} left of a {b}"), and (a, b) and (b, a) use the same
  template at every j;
- ``accuracy``: the share of samples read as (a, b); ``left`` / ``right``: the share whose left (right) half reads
  a (b), so a reader sees which half fails; each on the seen pairs and on the held-out pairs (never trained on,
  ``dataset.held_out``) apart;
- the swap test: for a != b, sample j of (a, b) and sample j of (b, a) start from the same x_T and the same sampler
  noise (two draws of the same seed and layout) and differ only in the caption; a success is both read right, i.e.
  the same noise came out swapped when the words were. A bag of words cannot pass it: both captions hold the same
  words. Reported over the 45 unordered pairs, and apart over those with a held-out order;
- the ceiling: the judge's accuracy on real validation pairs, so the numbers can be read against it.

The default judge is an RBF-SVM fit on the training split of the bundled digits (the digits data=digits and
data=digit_pairs train on; never the validation digits), as ``metrics=[guided]`` judges with. Pure torch and
scikit-learn: no Lightning, no Hydra.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ddpmlab.metrics.image_metrics import svc_digits

Judge = Callable[[Tensor], np.ndarray]  # images [N,C,h,w] in [-1, 1] -> digit labels [N]
Sample = Callable[[list[str], int], Tensor]  # (prompts, seed) -> one image [N,C,H,W] in [-1, 1] per prompt


def pair_digits(keys: Tensor) -> Tensor:
    """[N,2] (left digit, right digit) of pair keys ``10 * a + b`` [N]."""
    keys = torch.as_tensor(keys).long()
    return torch.stack([keys // 10, keys % 10], dim=1)


@functools.cache
def digit_svm(val_fraction: float = 0.1) -> Judge:
    """The RBF-SVM judge (``svc_digits``) fit on the training split of scikit-learn's bundled 8x8 digits, the split
    that data=digits and data=digit_pairs hold out ``val_fraction`` from; fit once per process. Inputs of another
    size (resized pairs) are resized to 8x8 first."""
    from ddpmlab.data.datasets import holdout, load_digits

    images, labels = load_digits()
    train, _ = holdout(len(images), val_fraction)
    predict = svc_digits(images[train].float() / 127.5 - 1, labels[train])

    def judge(halves: Tensor) -> np.ndarray:
        if tuple(halves.shape[-2:]) != (8, 8):
            halves = F.interpolate(halves.float(), size=(8, 8), mode="bilinear", antialias=True)
        return predict(halves)

    return judge


def read_pairs(images: Tensor, judge: Judge) -> Tensor:
    """[N,2] the judge's reading of the left half ``x[..., :W/2]`` and the right half ``x[..., W/2:]`` of images
    [N,C,H,W] in [-1, 1]."""
    images = images.detach().float().cpu().clamp(-1, 1)
    half = images.shape[-1] // 2
    read = torch.as_tensor(np.asarray(judge(torch.cat([images[..., :half], images[..., half:]]))), dtype=torch.long)
    return torch.stack(read.chunk(2), dim=1)


def scores(read: Tensor, keys: Tensor) -> dict[str, float | int]:
    """``accuracy`` (both halves right), ``left``, ``right`` (that half right) and ``n`` of readings [N,2] of
    samples of pairs ``keys`` [N]."""
    right = read == pair_digits(keys)
    if not len(right):
        return {"accuracy": float("nan"), "left": float("nan"), "right": float("nan"), "n": 0}
    return {
        "accuracy": float(right.all(1).double().mean()),
        "left": float(right[:, 0].double().mean()),
        "right": float(right[:, 1].double().mean()),
        "n": len(right),
    }


def judge_ceiling(images: Tensor, keys: Tensor, judge: Judge) -> dict[str, float | int]:
    """The judge's :func:`scores` on real pairs: images uint8 [N,1,H,W] (or float in [-1, 1]) of pairs ``keys``."""
    x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images
    return scores(read_pairs(x, judge), torch.as_tensor(keys))


@dataclass(frozen=True)
class CaptionRun:
    """What :func:`caption_accuracy` measured: its numbers, and every sample with its pair key and prompt."""

    metrics: dict
    samples: Tensor  # [N,C,H,W] in [-1, 1]
    keys: Tensor  # [N] pair key of each sample
    prompts: list[str]


def draws(per_pair: int) -> list[tuple[Tensor, int]]:
    """The three draws of the protocol, each (keys [45 or 10 x per_pair], seed offset): the pairs (a, b) with
    a < b, then (b, a) in the same order from the same seed (the swap test's partners), then (a, a). Slot j of
    every pair is at j * P + p (P pairs in the draw)."""
    lower = torch.tensor([10 * a + b for a in range(10) for b in range(a + 1, 10)])
    upper = (lower % 10) * 10 + lower // 10
    same = torch.arange(10) * 11
    return [(lower.repeat(per_pair), 0), (upper.repeat(per_pair), 0), (same.repeat(per_pair), 1)]


def prompts_for(keys: Tensor, captions: Sequence[Sequence[str]], per_pair: int) -> list[str]:
    """Sample j of pair (a, b) gets caption ``(j + a + b) mod K`` of the pair's K: every template in turn, the
    same one for (a, b) and (b, a)."""
    P = len(keys) // per_pair
    out = []
    for i, key in enumerate(keys.tolist()):
        a, b = divmod(key, 10)
        options = captions[key]
        out.append(options[(i // P + a + b) % len(options)])
    return out


def caption_accuracy(
    sample: Sample, captions: Sequence[Sequence[str]], held_out: set[int], judge: Judge, per_pair: int, seed: int = 0
) -> CaptionRun:
    """The protocol of this module: ``sample(prompts, seed)`` draws one image per prompt (sample i's noise a
    function of the seed, i and the number of prompts only), ``captions[key]`` every caption of pair ``key``,
    ``held_out`` the keys never trained on, ``judge`` reads one 8x8 digit."""
    if not (isinstance(per_pair, int) and per_pair >= 1):
        raise ValueError(f"per_pair={per_pair} must be an integer >= 1")
    held = torch.tensor(sorted(int(k) for k in held_out), dtype=torch.long)
    samples, keys, prompts, reads = [], [], [], []
    for draw_keys, offset in draws(per_pair):
        draw_prompts = prompts_for(draw_keys, captions, per_pair)
        x = sample(draw_prompts, seed + offset).float().cpu()
        samples.append(x)
        keys.append(draw_keys)
        prompts += draw_prompts
        reads.append(read_pairs(x, judge))
    right = [(r == pair_digits(k)).all(1) for r, k in zip(reads, keys, strict=True)]
    swapped = right[0] & right[1]  # [45 x per_pair]: (a, b) and its swap (b, a), from the same noise, both right
    either_held = torch.isin(keys[0], held) | torch.isin(keys[1], held)
    all_keys, all_reads = torch.cat(keys), torch.cat(reads)
    seen = ~torch.isin(all_keys, held)
    by_pair = torch.zeros(100).index_add_(0, all_keys, torch.cat(right).float()) / per_pair

    def share(ok: Tensor) -> float:
        return float(ok.double().mean()) if len(ok) else float("nan")

    metrics = {
        "seen": scores(all_reads[seen], all_keys[seen]),
        "held_out": scores(all_reads[~seen], all_keys[~seen]),
        "swap": {
            "all": share(swapped),
            "seen": share(swapped[~either_held]),
            "held_out": share(swapped[either_held]),
            "n": len(swapped),
            "n_held_out": int(either_held.sum()),
        },
        "per_pair": [round(float(v), 4) for v in by_pair],  # accuracy of pair key 10a + b, at index 10a + b
    }
    return CaptionRun(metrics, torch.cat(samples), all_keys, prompts)
