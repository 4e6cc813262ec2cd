"""Batches per second of the data module's two training loaders: the on-device fast path (``DeviceLoader``)
against the DataLoader path, each exactly as ``DiffusionDataModule`` builds it for the device.

    python bench/data_throughput.py [--mnist-root DIR] [--batch-size 128] [--batches 300]

Prints one JSON object: MNIST on the CPU (the real files under DIR/MNIST/raw when given, else a synthetic
60,000 x 28 x 28 set) and, where a CUDA device exists, CIFAR-shaped data (50,000 x 3 x 32 x 32, random flips)
on it; without one the GPU entry says it was skipped. A batch counts once it is on the training device as
x0 in [-1, 1] (DataLoader batches are copied there as Lightning does: pinned, non-blocking).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from types import SimpleNamespace

import torch

from ddpmlab.data import DiffusionDataModule, ImageTensorDataset


def attach(dm: DiffusionDataModule, device: torch.device) -> DiffusionDataModule:
    """What the data module reads from a one-device Lightning trainer: its device, rank and epoch."""
    dm.trainer = SimpleNamespace(
        global_rank=0, world_size=1, current_epoch=0, strategy=SimpleNamespace(root_device=device)
    )
    return dm


def batches_per_second(loader, device: torch.device, batches: int, warmup: int) -> float:
    def stream():
        while True:  # as many epochs as it takes
            for x0, y in loader:
                yield x0.to(device, non_blocking=True), y.to(device, non_blocking=True)

    it = stream()
    for _ in range(warmup):  # worker start-up, first-call allocations
        next(it)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(batches):
        x0, _ = next(it)
    sync()
    assert x0.device.type == device.type and x0.dtype == torch.float32
    return batches / (time.perf_counter() - start)


def compare(make_dm, device: torch.device, batches: int, warmup: int, workers: int) -> dict:
    result = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)}
    variants = {"fast_path": dict(on_device=True), "dataloader": dict(on_device=False)}
    if workers > 0:
        variants[f"dataloader_{workers}_workers"] = dict(on_device=False, num_workers=workers)
    for name, options in variants.items():
        dm = attach(make_dm(**options), device)
        loader = dm.train_dataloader()
        result[name] = {
            "loader": type(loader).__name__,
            "num_workers": getattr(loader, "num_workers", 0),
            "batches_per_s": round(batches_per_second(loader, device, batches, warmup), 1),
        }
        result[name]["images_per_s"] = round(result[name]["batches_per_s"] * dm.batch_size)
        del loader, dm
    result["speedup_fast_vs_dataloader"] = round(
        result["fast_path"]["batches_per_s"] / result["dataloader"]["batches_per_s"], 1
    )
    return result


def in_memory(name: str, images: torch.Tensor, labels: torch.Tensor, **options) -> DiffusionDataModule:
    dm = DiffusionDataModule(name=name, image_size=images.shape[-1], channels=images.shape[1], **options)
    dm.train_set = ImageTensorDataset(images, labels)  # setup() keeps a dataset that is already there
    return dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist-root", default=None, help="a directory holding MNIST/raw (plain or .gz IDX files)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=300, help="timed batches per loader")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's choice); "
        "1 on a shared, oversubscribed CPU, where parallel regions stall waiting for descheduled threads",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="also time a DataLoader with this many workers (0: skip)",
    )
    args = parser.parse_args()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    torch.manual_seed(0)
    report = {
        "batch_size": args.batch_size,
        "batches": args.batches,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "cpu_count": len(os.sched_getaffinity(0)),
    }

    if args.mnist_root:
        probe = DiffusionDataModule(name="mnist", root=args.mnist_root, image_size=28, channels=1)
        probe.setup()
        mnist, source = (probe.train_set.images, probe.train_set.labels), f"{args.mnist_root}/MNIST/raw"
    else:
        images = torch.randint(0, 256, (60_000, 1, 28, 28), dtype=torch.uint8)
        mnist, source = (images, torch.randint(0, 10, (60_000,))), "synthetic"
    make = lambda **o: in_memory("mnist", *mnist, batch_size=args.batch_size, random_flip=False, **o)
    report["mnist_cpu"] = {
        "data": source,
        "images": len(mnist[0]),
        **compare(make, torch.device("cpu"), args.batches, args.warmup, args.workers),
    }

    if torch.cuda.is_available():
        cifar = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (50_000,))
        make = lambda **o: in_memory("cifar10", *cifar, batch_size=args.batch_size, random_flip=True, **o)
        report["cifar_shaped_gpu"] = {
            "data": "synthetic 50,000 x 3 x 32 x 32, random flips",
            "images": 50_000,
            **compare(make, torch.device("cuda"), args.batches, args.warmup, args.workers),
        }
    else:
        report["cifar_shaped_gpu"] = "skipped: no CUDA device"
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
