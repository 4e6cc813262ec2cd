"""Judge generated digits with a small CNN trained on the real MNIST training digits: class histogram and mean
confidence (max softmax probability) of the samples in a ``samples.npz`` written by sample.py.

    python bench/mnist_classifier.py --data-root <dir holding MNIST/raw> --samples <sample run>/samples.npz \
        [--weights outputs/mnist_cnn.pt] [--out bench/results/ldm_mnist_samples.json]

With the true ``labels`` in the file (evaluate.py's ``sr_samples.npz``), it also reports the accuracy of the
samples, and of the ``bicubic`` and ``originals`` arrays the file holds beside them.

The classifier (two conv layers, ~0.1M parameters) trains for ``--epochs`` on the 60k training digits at the samples'
size (28x28 resized once, as the data module does) and reports its accuracy on the 10k test digits; its weights are
cached in ``--weights`` so that later calls only classify.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpmlab.data import datasets as D
from ddpmlab.images import to_model_range


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.LazyLinear(128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def mnist(root: str, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = D.load_idx(root, "mnist", split)
    if images.shape[-1] != size:
        images = D.resize_uint8(images, size)
    return to_model_range(images), labels.long()


def train_classifier(root: str, size: int, epochs: int, seed: int = 0) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    x, y = mnist(root, "train", size)
    net = cnn()
    net(x[:1])  # materialise the lazy layer
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), accuracy(net, *mnist(root, "val", size))


@torch.no_grad()
def predict(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.softmax(net(x[i : i + 500]), 1) for i in range(0, len(x), 500)])


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(net, x).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--samples", required=True, help="samples.npz from sample.py (uint8 N x H x W x 1)")
    ap.add_argument("--weights", default="outputs/mnist_cnn.pt")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    samples = to_model_range(torch.from_numpy(np.load(args.samples)["images"]).permute(0, 3, 1, 2))
    size = samples.shape[-1]
    weights = Path(args.weights)
    if weights.is_file():
        net = cnn()
        net(torch.zeros(1, 1, size, size))
        state = torch.load(weights, weights_only=True)
        net.load_state_dict(state["state_dict"])
        net.eval()
        test_acc = state["test_accuracy"]
    else:
        start = time.perf_counter()
        net, test_acc = train_classifier(args.data_root, size, args.epochs)
        print(f"classifier trained in {time.perf_counter() - start:.0f}s")
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": net.state_dict(), "test_accuracy": test_acc}, weights)
    probs = predict(net, samples)
    conf, cls = probs.max(1)
    hist = torch.bincount(cls, minlength=10).tolist()
    result = {
        "samples": args.samples,
        "num_samples": len(samples),
        "classifier_test_accuracy": round(test_acc, 4),
        "class_histogram": hist,
        "mean_confidence": round(float(conf.mean()), 4),
        "share_confident_over_0.9": round(float((conf > 0.9).float().mean()), 4),
    }
    arrays = np.load(args.samples)
    if "labels" in arrays:  # an evaluation's outputs: accuracy against the true labels, for every array there
        labels = torch.from_numpy(arrays["labels"]).long()
        result["accuracy"] = round(float((cls == labels).float().mean()), 4)
        for name in ("bicubic", "originals"):
            if name in arrays:
                x = to_model_range(torch.from_numpy(arrays[name]).permute(0, 3, 1, 2))
                truth = labels if len(x) == len(labels) else labels[:: len(labels) // len(x)]
                result[f"{name}_accuracy"] = round(accuracy(net, x, truth), 4)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
