"""``python sample.py ckpt_path=... num_samples=N seed=S``: samples.npz (uint8 N x H x W x C), grid.png and
sampler.yaml (the sampler used: the checkpoint's own unless the command line changes it). With ``inpaint.image``
or ``inpaint.index``: RePaint completions and inpaint.png instead.

The samples go to disk batch by batch as they are drawn (``ddpmlab.chunks``): memory holds one batch, and the
same command run again into the same folder (``hydra.run.dir=...``) after a kill continues where it stopped and
writes the samples an uninterrupted run writes. Every output file is written atomically."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ddpmlab.api import CONFIG_DIR, denoiser_from_checkpoint, load_checkpoint, pick_device, rebuild
from ddpmlab.chunks import SampleChunks, tensor_hash
from ddpmlab.cli.common import friendly_errors
from ddpmlab.errors import ConfigError
from ddpmlab.fileio import write_atomic
from ddpmlab.images import load_image, save_grid, side_by_side, to_hwc_uint8, to_model_range, to_unit
from ddpmlab.perf import sampling_cpu_threads
from ddpmlab.samplers import Sampler, generate_chain, with_guidance
from ddpmlab.samplers.generate import generate_batches
from ddpmlab.samplers.masks import make_mask
from ddpmlab.sampling import chosen_sampler, classifier_guidance, given  # noqa: F401  (given: for callers)
from ddpmlab.stages import stage_of
from ddpmlab.validate import check_sample_config, check_sampler_steps

GRID_SAMPLES = 100  # grid.png and inpaint.png show the first 100 samples


def draw_to_disk(cfg: DictConfig, out: Path, denoiser, sampler: Sampler, labels, perf, **inputs) -> SampleChunks:
    """Draw ``cfg.num_samples`` batch by batch into ``<out>/chunks`` (one batch in memory at a time), continuing
    from the chunks a stopped run with the same settings left there."""
    device = next(denoiser.parameters()).device
    settings = {
        "seed": cfg.seed,
        "sampler": sampler.to_config(),
        "weights": tensor_hash(modules=(denoiser,)),  # the EMA or raw weights, classifier and first stage included
        "inputs": tensor_hash(labels, inputs.get("x0"), inputs.get("keep")),
        "guidance": cfg.get("guidance"),
        "classifier_scale": (cfg.get("classifier") or {}).get("scale"),
        "device": device.type,  # CPU and CUDA generators draw different numbers
        "perf": OmegaConf.to_container(perf, resolve=True) if isinstance(perf, DictConfig) else perf,
    }
    chunks = SampleChunks(out / "chunks", settings, cfg.num_samples, cfg.batch_size)
    start, state = chunks.resume()
    if start:
        print(f"continuing: {start} of {cfg.num_samples} samples already drawn in {chunks.folder}")
    if start == cfg.num_samples:  # stopped after the last batch: only the outputs are left to write
        return chunks
    began = time.perf_counter()
    batches = generate_batches(
        denoiser, sampler, cfg.num_samples, seed=cfg.seed, batch_size=cfg.batch_size, labels=labels, perf=perf,
        progress=True, start=start, generator_state=state, **inputs,
    )  # fmt: skip
    for index, (x, state) in enumerate(batches, start // cfg.batch_size):
        chunks.write(index, to_hwc_uint8(x), state)
    seconds, drawn = time.perf_counter() - began, cfg.num_samples - start
    print(f"{drawn} samples in {seconds:.1f}s ({drawn / seconds:.1f} img/s) on {device}")
    return chunks


def write_outputs(out: Path, chunks: SampleChunks, sampler: Sampler, labels: torch.Tensor | None, **arrays) -> None:
    """samples.npz (assembled from the chunks) and sampler.yaml, each written atomically."""
    extra = {} if labels is None else {"labels": labels.numpy()}
    chunks.assemble(out / "samples.npz", **extra, **arrays)
    write_atomic(out / "sampler.yaml", OmegaConf.to_yaml(OmegaConf.create(sampler.to_config())))


def first_samples(chunks: SampleChunks) -> torch.Tensor:
    """The first GRID_SAMPLES samples as samples.npz holds them (uint8), back in [-1, 1] for a grid."""
    return to_model_range(torch.from_numpy(chunks.head(GRID_SAMPLES)).permute(0, 3, 1, 2))


def sample(cfg: DictConfig, output_dir: str | Path) -> Path:
    check_sample_config(cfg)
    device = pick_device(cfg.device)
    ckpt = load_checkpoint(cfg.ckpt_path)
    denoiser, ckpt_cfg = denoiser_from_checkpoint(ckpt, ema=cfg.use_ema, where=str(cfg.ckpt_path))
    check_sampler_steps(cfg, denoiser.diffusion.T)
    denoiser.to(device)
    perf = (cfg.get("perf") or {}).get("sampling")
    sampling_cpu_threads(denoiser, device, cfg.batch_size)  # small networks sample faster on one CPU thread
    if wants_inpainting(cfg):
        return inpaint(cfg, denoiser, ckpt_cfg, Path(output_dir), perf)
    guided = classifier_guidance(cfg, denoiser, ckpt_cfg, cfg.num_samples, device)  # with classifier.ckpt_path
    labels, denoiser = guided or with_guidance(denoiser, cfg.get("labels"), cfg.get("guidance"), cfg.num_samples)
    sampler = chosen_sampler(cfg, ckpt_cfg)
    print(f"sampler: {sampler}")
    out = Path(output_dir)
    chunks = draw_to_disk(cfg, out, denoiser, sampler, labels, perf)
    write_outputs(out, chunks, sampler, labels)
    nrow = None if labels is None else int(labels.unique().numel())  # a column per class
    save_grid(to_unit(first_samples(chunks)), out / "grid.png", nrow=nrow)
    chunks.remove()  # samples.npz holds them all now
    if cfg.get("save_chain"):
        frames = generate_chain(
            denoiser, sampler, cfg.chain_samples, cfg.chain_frames, seed=cfg.seed, perf=perf, progress=True
        )
        save_grid(to_unit(frames.flatten(0, 1)), out / "chain.png", nrow=frames.shape[1])
    return out


def wants_inpainting(cfg: DictConfig) -> bool:
    spec = cfg.get("inpaint") or {}
    return spec.get("image") is not None or spec.get("index") is not None


def dataset_image(data_cfg: DictConfig, index: int, split: str = "val") -> tuple[torch.Tensor, int]:
    """Image ``index`` of the checkpoint's dataset split ('val' or 'train') as [1,C,H,W] in [-1, 1], and its label."""
    datamodule = rebuild(data_cfg, "data")  # the checkpoint's data config: only ddpmlab's own targets
    datamodule.setup("fit")
    ds = {"val": datamodule.val_set, "train": datamodule.train_set}.get(split)
    if ds is None or not 0 <= index < len(ds):
        raise ConfigError(
            f"inpaint.index={index} is not an image of the {data_cfg.name} '{split}' split "
            f"({0 if ds is None else len(ds)} images); use inpaint.split=val|train and an index below that"
        )
    x0, label = ds[index]
    return x0[None], int(label)


def inpaint(cfg: DictConfig, denoiser, ckpt_cfg: DictConfig, out: Path, perf=None) -> Path:
    """RePaint ``num_samples`` completions of one image; writes samples.npz (completions, original, keep, labels),
    sampler.yaml and inpaint.png: rows of [masked input | completions | original]."""
    spec, stage = cfg.inpaint, stage_of(ckpt_cfg)
    C, H, _ = stage.image_shape(denoiser, ckpt_cfg)  # pixels, for latent diffusion too
    if spec.get("image") is not None:
        x0 = load_image(spec.image, C, H, what="inpaint.image")
    else:
        x0, _ = dataset_image(ckpt_cfg.data, int(spec.index), spec.get("split", "val"))
    keep = make_mask(str(spec.mask), H, torch.Generator().manual_seed(cfg.seed))  # [H,W], 1 = known
    known, known_keep = stage.known_region(denoiser, x0, keep, cfg.seed)  # latent diffusion: z = s E(x0), pooled
    labels = None  # a class-conditional model completes unconditionally (null label) unless labels are given
    if cfg.get("labels") is not None:
        labels, denoiser = with_guidance(denoiser, cfg.labels, cfg.get("guidance"), cfg.num_samples)
    elif float(cfg.get("guidance") or 0.0) != 0:
        raise ConfigError("inpainting with guidance= needs labels=[...], the class(es) to complete towards")
    options = {k: spec[k] for k in ("jump_length", "jump_n_sample", "variance")}
    sampler = Sampler("repaint", spec.num_steps, spec.spacing, **options)
    print(f"sampler: {sampler} ({sampler.num_evaluations(denoiser.diffusion)} network evaluations per completion)")
    chunks = draw_to_disk(cfg, out, denoiser, sampler, labels, perf, x0=known, keep=known_keep)
    write_outputs(out, chunks, sampler, labels, original=to_hwc_uint8(x0)[0], keep=keep.bool().numpy())
    images = first_samples(chunks)
    save_grid(side_by_side(x0, keep, images), out / "inpaint.png", nrow=min(8, len(images)) + 2, min_cell=64)
    chunks.remove()  # samples.npz holds them all now
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
@friendly_errors
def main(cfg: DictConfig) -> None:
    out = sample(cfg, HydraConfig.get().runtime.output_dir)
    print(out)


if __name__ == "__main__":
    main()
