"""The sampler atlas (``evaluate.py metrics=[atlas]``): sample quality against network evaluations, one curve per
sampler, every cell drawn from the same x_T and seeds -- DDIM's Table 1 (Song et al. 2020) for any checkpoint.

A cell is one sampler at one NFE (network evaluations per sample, counted honestly by ``Sampler.num_evaluations``:
a second-order step that evaluates twice counts two; classifier-free guidance batches the conditional and the
unconditional half into one call on a doubled batch, counted once, and the protocol says so). A sampler that
cannot take exactly the NFE asked for takes the most it can below it, and the cell records both.

Each finished cell is written to ``cache_dir`` under a name that hashes everything it depends on (the checkpoint's
bytes, the weights used, the sampler, its grid, the samples, the seed, the quality measure), so a stopped atlas run
again continues where it stopped, and an atlas that adds a sampler draws only the new cells. The outputs --
``atlas.json`` (every cell), ``atlas.csv`` (one row per cell) and ``atlas.png`` (quality against NFE on a log axis;
seconds per image in a second panel) -- are rewritten after every cell.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ddpmlab.errors import ConfigError
from ddpmlab.fileio import atomic_path, write_atomic
from ddpmlab.samplers import INPAINTING, Sampler
from ddpmlab.samplers.sampler import default_options, num_evaluations


def shipped_sampler(name: str) -> dict[str, Any]:
    """The shipped sampler config ``conf/sampler/<name>.yaml`` as a dict (read as data; nothing is imported)."""
    from ddpmlab.api import CONFIG_DIR

    path = Path(CONFIG_DIR) / "sampler" / f"{name}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"atlas.samplers names {name!r}, which is not a shipped sampler; choose from {shipped}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def atlas_samplers(entries: Sequence[Any]) -> list[Sampler]:
    """The atlas's samplers from ``atlas.samplers``: each a shipped sampler's name (``ddim``: its recommended
    spacing and options), or a mapping of keys over the shipped config of its ``algorithm`` (``{algorithm: ddpm,
    variance: large}``; algorithms with no shipped config start from their function's defaults)."""
    samplers = []
    for entry in entries:
        if isinstance(entry, str):
            config = shipped_sampler(entry)
        elif isinstance(entry, Mapping) and entry.get("algorithm"):
            try:
                base = shipped_sampler(entry["algorithm"])
            except ConfigError:
                base = {"algorithm": entry["algorithm"]}
            config = {**base, **entry}
        else:
            raise ConfigError(
                f"atlas.samplers entry {entry!r} must be a shipped sampler's name (ddim) or a mapping with an "
                "algorithm ({algorithm: ddim, eta: 1.0})"
            )
        if config["algorithm"] in INPAINTING:
            raise ConfigError(
                f"atlas.samplers: {config['algorithm']} completes images from known pixels, the atlas draws from "
                "noise alone; measure it with metrics=[inpaint]"
            )
        config.pop("num_steps", None)  # the atlas sets the grid
        samplers.append(Sampler.from_config(None, config))
    return samplers


def label_of(sampler: Sampler) -> str:
    """A short, unique name of a sampler for tables and legends: ``ddim[leading, eta=0.0]``; options at their
    function's defaults are left out but for those that name the variant (eta, variance, order)."""
    defaults = default_options(sampler.algorithm)
    shown = [f"{k}={v}" for k, v in sampler.options.items()
             if k != "clip_x0" and (k in ("eta", "variance", "order") or v != defaults.get(k))]  # fmt: skip
    clip = "" if sampler.options.get("clip_x0", True) else ", no clip"
    return f"{sampler.algorithm}[{', '.join([sampler.spacing, *shown])}{clip}]"


def steps_for(sampler: Sampler, diffusion, nfe: int) -> tuple[int, int]:
    """(num_steps S, its NFE): the largest grid whose network evaluations are at most ``nfe`` (exactly ``nfe`` where
    the sampler can take it: ``steps_for_nfe``)."""
    fits = [
        (S, n) for S in range(1, min(nfe, diffusion.T) + 1)
        if (n := num_evaluations(sampler.algorithm, S, sampler.options)) <= nfe
    ]  # fmt: skip
    if not fits:
        least = num_evaluations(sampler.algorithm, 1, sampler.options)
        raise ConfigError(
            f"atlas: {label_of(sampler)} needs {least} network evaluations at the least, more than nfe={nfe}; "
            f"drop {nfe} from atlas.nfe"
        )
    return max(fits)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (the checkpoint a cell was drawn from); of a folder (an export), of every file's
    name and bytes in turn."""
    path = Path(str(path)).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        if path.is_dir():
            h.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass
class Quality:
    """How a cell's samples are judged: ``measure(uint8 images [N,C,H,W]) -> {name: value}``, the main number's
    key and the label it is reported under."""

    measure: Callable[[torch.Tensor], dict[str, float]]
    key: str
    label: str
    identity: str  # what the cache name hashes: the measure, its feature network, its reference set


def cell_name(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20] + ".json"


def run_atlas(
    denoiser,
    samplers: Sequence[Sampler],
    nfes: Sequence[int],
    draw: Callable[[Sampler], torch.Tensor],
    quality: Quality,
    identity: Mapping[str, Any],
    output_dir: Path,
    cache_dir: Path | None,
    protocol: Mapping[str, Any],
) -> dict[str, Any]:
    """Every (sampler, NFE) cell: ``draw(sampler)`` -> uint8 samples, judged by ``quality``, saved as it finishes."""
    diffusion = denoiser.diffusion
    plan = []
    for sampler in samplers:
        for nfe in sorted(set(nfes)):
            num_steps, actual = steps_for(sampler, diffusion, nfe)
            if any(p[0] is sampler and p[2] == actual for p in plan):
                continue  # two requested NFEs that this sampler can only take as one
            plan.append((sampler, nfe, actual, num_steps))
    cells: list[dict[str, Any]] = []
    for i, (sampler, requested, nfe, num_steps) in enumerate(plan, start=1):
        sampler_at = sampler.with_steps(num_steps)
        key = {**identity, "sampler": sampler_at.to_config(), "quality": quality.identity}
        cached = None if cache_dir is None else cache_dir / cell_name(key)
        head = f"atlas [{i}/{len(plan)}] {label_of(sampler)} nfe={nfe}"
        if cached is not None and cached.is_file():
            cell = json.loads(cached.read_text())
            note = "(saved earlier)"
        else:
            start = time.perf_counter()
            fake = draw(sampler_at)
            seconds = time.perf_counter() - start
            cell = {
                "sampler": label_of(sampler), "config": sampler_at.to_config(), "nfe": nfe,
                "requested_nfe": requested, "num_steps": num_steps, **quality.measure(fake),
                "seconds_per_image": seconds / len(fake), "seconds": seconds,
            }  # fmt: skip
            if cached is not None:
                write_atomic(cached, json.dumps(cell, indent=1) + "\n")
            note = f"({cell['seconds']:.1f} s)"
        cell = {**cell, "sampler": label_of(sampler), "requested_nfe": requested}
        cells.append(cell)
        print(f"{head}: {quality.label} = {cell[quality.key]:.4g} {note}", flush=True)
        write_outputs(output_dir, cells, quality, protocol)
    return {"cells": cells, "quality": quality.label, "key": quality.key, "protocol": dict(protocol)}


def write_outputs(output_dir: Path, cells: list[dict], quality: Quality, protocol: Mapping[str, Any]) -> None:
    """atlas.json, atlas.csv and atlas.png of the cells so far."""
    output_dir.mkdir(parents=True, exist_ok=True)
    body = {"quality": quality.label, "key": quality.key, "protocol": dict(protocol), "cells": cells}
    write_atomic(output_dir / "atlas.json", json.dumps(body, indent=2) + "\n")
    columns = ["sampler", "nfe", "requested_nfe", "num_steps", quality.key, "seconds_per_image"]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow([*columns[:4], quality.label, "seconds_per_image"])
    for c in cells:
        writer.writerow([c[k] if not isinstance(c[k], float) else f"{c[k]:.6g}" for k in columns])
    write_atomic(output_dir / "atlas.csv", text.getvalue())
    plot_atlas(cells, quality, output_dir / "atlas.png", str(protocol.get("title", "")))


def plot_atlas(cells: list[dict], quality: Quality, path: Path, title: str = "") -> None:
    """Quality against NFE (log x; log y where every value is positive), one curve per sampler; seconds per image
    against NFE beside it."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, (ax_q, ax_t) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    names = list(dict.fromkeys(c["sampler"] for c in cells))
    markers = "os^vD<>ph*"
    for k, name in enumerate(names):
        rows = sorted((c for c in cells if c["sampler"] == name), key=lambda c: c["nfe"])
        x = [c["nfe"] for c in rows]
        style = dict(marker=markers[k % len(markers)], label=name, linestyle="-" if k < 10 else "--")
        ax_q.plot(x, [c[quality.key] for c in rows], **style)
        ax_t.plot(x, [c["seconds_per_image"] * 1e3 for c in rows], **style)
    values = [c[quality.key] for c in cells]
    ticks = sorted({c["requested_nfe"] for c in cells})  # Heun's 9 plots beside 10, under the tick of 10
    for ax in (ax_q, ax_t):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.minorticks_off()
        ax.set_xlabel("network evaluations per sample (NFE)")
        ax.grid(True, which="both", alpha=0.3)
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax_q.set_yscale("log")
    short = quality.label if len(quality.label) <= 40 else quality.label.split(" (")[0]  # the title names it whole
    ax_q.set_ylabel(f"{short} (lower is better)")
    ax_t.set_ylabel("milliseconds per image")
    ax_q.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def check_atlas_options(options: DictConfig) -> None:
    nfes = list(options.nfe or [])
    if not nfes or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in nfes):
        raise ConfigError(f"atlas.nfe={nfes} must be a non-empty list of integers >= 1, e.g. [5,10,20,50,100]")
    n = options.num_samples
    if not (isinstance(n, int) and n >= 2):
        raise ConfigError(f"atlas.num_samples={n!r} must be an integer >= 2 (a covariance needs two samples)")
    if not options.samplers:
        raise ConfigError("atlas.samplers is empty: name shipped samplers ([ddim,heun]) or give configs")
    if not (isinstance(options.guidance, (int, float)) and math.isfinite(options.guidance) and options.guidance >= 0):
        raise ConfigError(f"atlas.guidance={options.guidance!r} must be a number >= 0")
