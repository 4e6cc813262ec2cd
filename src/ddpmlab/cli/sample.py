"""``python sample.py ckpt_path=... num_samples=N seed=S``: samples.npz (uint8 N x H x W x C), grid.png and
sampler.yaml (the sampler used: the checkpoint's own unless the command line changes it). ``ckpt_path`` may also be
a folder ``export.py`` wrote. With ``inpaint.image`` or ``inpaint.index``: RePaint completions and inpaint.png
instead. A model trained on an image task (super-resolution, inpainting) is sampled from its condition,
``cond.index`` (images of the dataset split) or ``cond.image`` (a file): ``num_samples`` per input, and cond.png.
A text-conditioned model is sampled from its captions, ``prompt=`` (one), ``prompts=[...]`` or ``prompts_file=``
(one a line): ``num_samples`` per prompt, guided by ``guidance=`` against the empty caption; grid.png writes each
prompt under its row and samples.npz holds each sample's prompt.

The samples go to disk batch by batch as they are drawn (``ddpmlab.chunks``): memory holds one batch, and the
same command run again into the same folder (``hydra.run.dir=...``) after a kill continues where it stopped and
writes the samples an uninterrupted run writes. Every output file is written atomically."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchvision.transforms.v2.functional import pil_to_tensor

from ddpmlab.api import CONFIG_DIR, load_denoiser, pick_device, rebuild
from ddpmlab.chunks import SampleChunks, tensor_hash
from ddpmlab.cli.common import friendly_errors
from ddpmlab.conditioning import Cond, make_task, text_cond
from ddpmlab.errors import ConfigError
from ddpmlab.fileio import read_image, write_atomic
from ddpmlab.images import (
    caption_grid,
    cond_rows,
    load_image,
    save_grid,
    save_png,
    side_by_side,
    to_hwc_uint8,
    to_model_range,
    to_unit,
)
from ddpmlab.perf import sampling_cpu_threads
from ddpmlab.samplers import GuidedDenoiser, Sampler, generate_chain, with_guidance
from ddpmlab.samplers.generate import generate_batches
from ddpmlab.samplers.guidance import cycle_labels
from ddpmlab.samplers.masks import make_mask
from ddpmlab.sampling import chosen_sampler, classifier_guidance, given  # noqa: F401  (given: for callers)
from ddpmlab.stages import example_prompt, stage_of
from ddpmlab.validate import MAX_NUM_SAMPLES, check_sample_config, check_sampler_steps

GRID_SAMPLES = 100  # grid.png and inpaint.png show the first 100 samples
COND_ROWS, COND_PER_ROW = 16, 8  # cond.png shows up to 16 inputs with up to 8 samples each
TEXT_ROWS, TEXT_PER_ROW = 16, 16  # a text model's grid.png: up to 16 prompts with up to 16 samples each
PROMPT_KEYS = ("prompt", "prompts", "prompts_file")


def draw_to_disk(
    cfg: DictConfig, out: Path, denoiser, sampler: Sampler, labels, perf, num_samples: int | None = None, **inputs
) -> SampleChunks:
    """Draw ``num_samples`` (default ``cfg.num_samples``) batch by batch into ``<out>/chunks`` (one batch in memory
    at a time), continuing from the chunks a stopped run with the same settings left there."""
    num_samples = num_samples or cfg.num_samples
    device = next(denoiser.parameters()).device
    cond = inputs.get("cond")
    conditions = () if cond is None else (cond.image, cond.labels)  # nothing added for the other paths' hashes
    if cond is not None and cond.tokens is not None:  # the prompts
        conditions += (cond.tokens, cond.token_mask)
    settings = {
        "seed": cfg.seed,
        "sampler": sampler.to_config(),
        "weights": tensor_hash(modules=(denoiser,)),  # the EMA or raw weights, classifier and first stage included
        "inputs": tensor_hash(labels, inputs.get("x0"), inputs.get("keep"), *conditions),
        "guidance": cfg.get("guidance"),
        "guidance_rescale": cfg.get("guidance_rescale"),
        "classifier_scale": (cfg.get("classifier") or {}).get("scale"),
        "device": device.type,  # CPU and CUDA generators draw different numbers
        "perf": OmegaConf.to_container(perf, resolve=True) if isinstance(perf, DictConfig) else perf,
    }
    chunks = SampleChunks(out / "chunks", settings, num_samples, cfg.batch_size)
    start, state = chunks.resume()
    if start:
        print(f"continuing: {start} of {num_samples} samples already drawn in {chunks.folder}")
    if start == num_samples:  # stopped after the last batch: only the outputs are left to write
        return chunks
    began = time.perf_counter()
    batches = generate_batches(
        denoiser, sampler, num_samples, seed=cfg.seed, batch_size=cfg.batch_size, labels=labels, perf=perf,
        progress=True, start=start, generator_state=state, **inputs,
    )  # fmt: skip
    for index, (x, state) in enumerate(batches, start // cfg.batch_size):
        chunks.write(index, to_hwc_uint8(x), state)
    seconds, drawn = time.perf_counter() - began, num_samples - start
    print(f"{drawn} samples in {seconds:.1f}s ({drawn / seconds:.1f} img/s) on {device}")
    return chunks


def write_outputs(out: Path, chunks: SampleChunks, sampler: Sampler, labels: torch.Tensor | None, **arrays) -> None:
    """samples.npz (assembled from the chunks) and sampler.yaml, each written atomically."""
    extra = {} if labels is None else {"labels": labels.numpy()}
    chunks.assemble(out / "samples.npz", **extra, **arrays)
    write_atomic(out / "sampler.yaml", OmegaConf.to_yaml(OmegaConf.create(sampler.to_config())))


def first_samples(chunks: SampleChunks, n: int = GRID_SAMPLES) -> torch.Tensor:
    """The first ``n`` samples as samples.npz holds them (uint8), back in [-1, 1] for a grid."""
    return to_model_range(torch.from_numpy(chunks.head(n)).permute(0, 3, 1, 2))


def sample(cfg: DictConfig, output_dir: str | Path) -> Path:
    check_sample_config(cfg)
    prompts = read_prompts(cfg)  # a bad prompts_file is refused before the checkpoint is read
    device = pick_device(cfg.device)
    denoiser, ckpt_cfg = load_denoiser(cfg.ckpt_path, ema=cfg.use_ema)
    check_sampler_steps(cfg, denoiser.diffusion.T)
    task = make_task(ckpt_cfg.get("task"))
    check_text_given(cfg, denoiser, ckpt_cfg, task, prompts)
    check_condition_given(cfg, denoiser, task)
    # Tokenized here, before anything is drawn: a word outside the vocabulary, or a prompt longer than the context,
    # is a one-line error, not a failure after minutes of sampling.
    cond = None if prompts is None else text_cond(denoiser, prompts)
    denoiser.to(device)
    perf = (cfg.get("perf") or {}).get("sampling")
    sampling_cpu_threads(denoiser, device, cfg.batch_size)  # small networks sample faster on one CPU thread
    if task is not None:
        return sample_conditioned(cfg, denoiser, ckpt_cfg, task, Path(output_dir), perf)
    if cond is not None:
        return sample_text(cfg, denoiser, ckpt_cfg, prompts, cond, Path(output_dir), perf)
    if wants_inpainting(cfg):
        return inpaint(cfg, denoiser, ckpt_cfg, Path(output_dir), perf)
    guided = classifier_guidance(cfg, denoiser, ckpt_cfg, cfg.num_samples, device)  # with classifier.ckpt_path
    labels, denoiser = guided or with_guidance(
        denoiser, cfg.get("labels"), cfg.get("guidance"), cfg.num_samples, cfg.get("guidance_rescale")
    )
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


def wants_condition(cfg: DictConfig) -> bool:
    spec = cfg.get("cond") or {}
    return spec.get("image") is not None or spec.get("index") is not None


def check_condition_given(cfg: DictConfig, denoiser, task) -> None:
    """``cond.*`` for a model trained on an image task, and only for one; ``inpaint.*`` (RePaint) for the others."""
    where = cfg.ckpt_path
    if task is None and denoiser.cond_channels:  # a network with an image input, but no task says how to build it
        raise ConfigError(
            f"{where}: its network takes a {denoiser.cond_channels}-channel image but its stored config names no "
            f"task (task=sr or task=inpaint) to build it with; sample it from Python with generate(..., cond=Cond(...))"
        )
    if task is None:
        if wants_condition(cfg):
            raise ConfigError(
                f"cond.image / cond.index give the image of a model trained on an image task (experiment=sr_digits, "
                f"inpaint_digits, ldm_sr_mnist); {where} has no image condition: drop them (RePaint inpaints "
                f"it with inpaint.image or inpaint.index)"
            )
        return
    what = describe_task(task)
    if wants_inpainting(cfg):
        raise ConfigError(
            f"{where} is conditioned on an image ({what}): give it with cond.image or cond.index"
            f"{' (and cond.mask)' if task.name == 'inpaint' else ''}, not inpaint.* (RePaint, for models without an "
            f"image condition)"
        )
    if not wants_condition(cfg):
        raise ConfigError(
            f"{where} is conditioned on an image ({what}): give its condition with cond.index=<n> (image n of its "
            f"validation split, or a list [0,1,2]) or cond.image=<png>"
        )
    if (cfg.get("classifier") or {}).get("ckpt_path"):
        raise ConfigError("classifier.ckpt_path guides models without an image condition; drop it for this one")


def describe_task(task) -> str:
    if task.name == "sr":
        return f"task=sr: x{task.factor} super-resolution of a low-resolution input"
    return "task=inpaint: a masked image and its mask"


def dataset_images(data_cfg: DictConfig, indices: list[int], split: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``indices`` of the checkpoint's dataset split ('val' or 'train') as [N,C,H,W] in [-1, 1], and their
    labels [N]; ``key`` names the setting in the error (``inpaint.index``, ``cond.index``)."""
    if not data_cfg.get("name"):  # a model in diffusers' format does not say its data
        image_key = key.replace("index", "image")
        raise ConfigError(
            f"{key} picks an image of the model's dataset, and this model does not say what it was trained on: give "
            f"the image instead, {image_key}=<an image file>"
        )
    datamodule = rebuild(data_cfg, "data")  # the checkpoint's data config: only ddpmlab's own targets
    datamodule.setup("fit")
    ds = {"val": datamodule.val_set, "train": datamodule.train_set}.get(split)
    size = 0 if ds is None else len(ds)
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        shown = bad[0] if len(indices) == 1 else indices
        raise ConfigError(
            f"{key}={shown} is not an image of the {data_cfg.name} '{split}' split ({size} images); use "
            f"{key.split('.')[0]}.split=val|train and indices below that"
        )
    items = [ds[i] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def dataset_image(data_cfg: DictConfig, index: int, split: str = "val") -> tuple[torch.Tensor, int]:
    """Image ``index`` of the checkpoint's dataset split as [1,C,H,W] in [-1, 1], and its label (RePaint's input)."""
    x0, labels = dataset_images(data_cfg, [index], split, "inpaint.index")
    return x0, int(labels[0])


def index_list(value) -> list[int]:
    """``cond.index``: one index or a non-empty list of them."""
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"cond.index={value} must be an image number or a list of them, e.g. cond.index=[0,1,2]")
    return values


def read_cond_image(path: str, channels: int) -> torch.Tensor:
    """``cond.image`` as [1,channels,h,w] in [-1, 1] at the file's own size (nothing resized: the size says what
    the file is). A colour file for a grey model is refused, not silently converted."""
    if channels not in (1, 3):
        raise ConfigError(f"cond.image is read as a grey or RGB file; this model takes {channels}-channel images")
    rgb = pil_to_tensor(read_image(path, "RGB", "cond.image"))  # [3,h,w] uint8
    if channels == 1 and not bool((rgb == rgb[:1]).all()):
        raise ConfigError(
            f"cond.image={path} is a colour image (3 channels); this model takes 1-channel (grey) images: give a "
            f"grey-scale file"
        )
    return to_model_range(rgb[:channels])[None]


def condition_inputs(
    spec: DictConfig, seed: int, data_cfg: DictConfig, task, C: int, H: int
) -> dict[str, torch.Tensor]:
    """What ``cond.*`` (``spec``) asks for: ``image`` [N,C',h,w] (the model's condition, built with its task),
    ``original`` [N,C,H,W] where known, ``labels`` and ``split_index`` [N] (images of the checkpoint's dataset,
    ``data_cfg``), ``keep`` [H,W] (inpainting; random_strokes drawn from ``seed``)."""
    out = {}
    if task.name == "inpaint":
        out["keep"] = make_mask(str(spec.mask), H, torch.Generator().manual_seed(seed))  # 1 = known
    build = (lambda x: task(x, keep=out["keep"])) if task.name == "inpaint" else task
    if spec.get("index") is not None:
        if spec.get("image") is not None:
            raise ConfigError("give cond.image or cond.index, not both")
        indices = index_list(spec.index)
        x0, out["labels"] = dataset_images(data_cfg, indices, str(spec.get("split", "val")), "cond.index")
        out.update(image=build(x0), original=x0, split_index=torch.tensor(indices))
        return out
    x = read_cond_image(spec.image, C)
    size = tuple(x.shape[-2:])
    low = H // task.factor if task.name == "sr" else H
    if task.name == "sr" and size == (low, low):  # super-resolution's input as it is
        out["image"] = x
    elif size == (H, H) and (task.name == "inpaint" or spec.get("downsample")):
        out.update(image=build(x), original=x)
    elif size == (H, H):
        raise ConfigError(
            f"cond.image={spec.image} is {H}x{H}, the model's output size; it takes the {low}x{low} low-resolution "
            f"input (x{task.factor} super-resolution): give that, or add cond.downsample=true to downsample this one"
        )
    else:
        raise ConfigError(
            f"cond.image={spec.image} is {size[1]}x{size[0]}; this model takes a {low}x{low} image "
            f"({'the low-resolution input' if task.name == 'sr' else 'the full image, masked with cond.mask'})"
        )
    return out


def sample_conditioned(cfg: DictConfig, denoiser, ckpt_cfg: DictConfig, task, out: Path, perf=None) -> Path:
    """``num_samples`` samples for each input of ``cond.*`` (consecutive: input 0's first); writes samples.npz
    (images, cond_image, original where known, input_index, ...), sampler.yaml and cond.png: rows of
    [input | samples | original]."""
    C, H, _ = stage_of(ckpt_cfg).image_shape(denoiser, ckpt_cfg)  # pixels, for latent diffusion too
    inputs = condition_inputs(cfg.cond, cfg.seed, ckpt_cfg.data, task, C, H)
    image, original = inputs["image"], inputs.get("original")
    N, K = len(image), cfg.num_samples
    if N * K > MAX_NUM_SAMPLES:
        raise ConfigError(f"{N} inputs x num_samples={K} is more than {MAX_NUM_SAMPLES:,} samples; draw fewer")
    labels = None
    if denoiser.num_classes:  # also class-conditional: the given classes, else the dataset images' own
        labels = (
            inputs.get("labels") if cfg.get("labels") is None else cycle_labels(cfg.labels, denoiser.num_classes, N)
        )
        if labels is None:
            raise ConfigError("this model is also class-conditional: give labels=[...] for cond.image")
    elif cfg.get("labels") is not None:
        raise ConfigError("labels= needs a class-conditional checkpoint (trained with model.num_classes); drop it")
    denoiser = guided(cfg, denoiser, ckpt_cfg)
    cond = Cond(labels=labels, image=image).repeat_interleave(K)  # K samples of each input, one after another
    sampler = chosen_sampler(cfg, ckpt_cfg)
    print(f"sampler: {sampler}; {K} samples for each of {N} inputs ({describe_task(task)})")
    chunks = draw_to_disk(cfg, out, denoiser, sampler, None, perf, num_samples=N * K, cond=cond)
    arrays = {"cond_image": to_hwc_uint8(image[:, :C]), "input_index": torch.arange(N).repeat_interleave(K).numpy()}
    if original is not None:
        arrays["original"] = to_hwc_uint8(original)
    if "keep" in inputs:
        arrays["keep"] = inputs["keep"].bool().numpy()
    if "split_index" in inputs:
        arrays["split_index"] = inputs["split_index"].numpy()
    write_outputs(out, chunks, sampler, None if labels is None else labels.repeat_interleave(K), **arrays)
    rows, per = min(N, COND_ROWS), min(K, COND_PER_ROW)
    shown = first_samples(chunks, rows * K).unflatten(0, (rows, K))[:, :per].flatten(0, 1)
    grid = cond_rows(image[:rows], shown, None if original is None else original[:rows])
    save_grid(grid, out / "cond.png", nrow=len(grid) // rows)
    chunks.remove()  # samples.npz holds them all now
    if cfg.get("save_chain"):  # the first input's chain
        frames = generate_chain(
            denoiser, sampler, cfg.chain_samples, cfg.chain_frames, seed=cfg.seed, perf=perf, progress=True,
            cond=cond[:1].repeat_interleave(cfg.chain_samples),
        )  # fmt: skip
        save_grid(to_unit(frames.flatten(0, 1)), out / "chain.png", nrow=frames.shape[1])
    return out


def guided(cfg: DictConfig, denoiser, ckpt_cfg: DictConfig):
    """The denoiser with classifier-free guidance at ``guidance=`` w (Ho & Salimans 2022, eq. 6) against the null of
    its condition (the null image, the empty caption), rescaled by ``guidance_rescale=`` phi; as it is at w = 0."""
    w = float(cfg.get("guidance") or 0.0)
    if w == 0:
        return denoiser
    if not float(ckpt_cfg.get("p_uncond") or 0.0) > 0:
        raise ConfigError(
            f"guidance={w} needs a model trained with condition dropout (p_uncond > 0: the unconditional term "
            f"of classifier-free guidance); {cfg.ckpt_path} was trained with p_uncond=0: sample it with guidance=0"
        )
    return GuidedDenoiser(denoiser, w, cfg.get("guidance_rescale") or 0.0)


# --------------------------------------------------------------------------------------------- text
def wants_text(cfg: DictConfig) -> bool:
    return any(cfg.get(k) is not None for k in PROMPT_KEYS)


def read_prompts(cfg: DictConfig) -> list[str] | None:
    """The prompts of ``prompt=`` (one), ``prompts=[...]`` or ``prompts_file=`` (one per non-empty line, stripped);
    None when none is given. ``prompt=""`` is the empty caption: the unconditional model."""
    named = [k for k in PROMPT_KEYS if cfg.get(k) is not None]
    if len(named) > 1:
        raise ConfigError(f"give one of prompt=, prompts=[...] or prompts_file=, not {' and '.join(named)}")
    if not named:
        return None
    if named[0] == "prompt":
        value = cfg.prompt
        if isinstance(value, (ListConfig, list, DictConfig)):
            raise ConfigError('prompt= takes one caption, e.g. prompt="a 4 left of a 9"; for several, prompts=[...]')
        return [str(value)]
    if named[0] == "prompts":
        values = list(cfg.prompts) if isinstance(cfg.prompts, (ListConfig, list)) else [cfg.prompts]
        if not values or any(isinstance(v, (ListConfig, DictConfig)) for v in values):
            raise ConfigError(
                'prompts= takes a non-empty list of captions, e.g. prompts=["a 4 left of a 9","nine then four"]'
            )
        return [str(v) for v in values]
    path = Path(str(cfg.prompts_file)).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompts_file={cfg.prompts_file} is not a file; give a text file with one prompt a line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read prompts_file={cfg.prompts_file} ({str(e)[:200]}); save it as UTF-8 text") from e
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"prompts_file={cfg.prompts_file} holds no prompt; write one prompt a line")
    return prompts


def check_text_given(cfg: DictConfig, denoiser, ckpt_cfg: DictConfig, task, prompts: list[str] | None) -> None:
    """Prompts for a text-conditioned model, and only for one; what does not go with them refused."""
    where, text = cfg.ckpt_path, denoiser.tokenizer is not None
    if prompts is not None and not text:
        raise ConfigError(
            f"prompt= / prompts= / prompts_file= need a text-conditioned model (trained with text_encoder=learned | "
            f"pooled | clip, e.g. experiment=text_digits); {where} has no text encoder: drop them"
        )
    if not text:
        return
    if task is not None:
        raise ConfigError(
            f"{where} is conditioned on both an image ({describe_task(task)}) and text; sample it from Python: "
            f"generate(..., cond=Cond(image=..., tokens=..., token_mask=...))"
        )
    if prompts is None and not wants_inpainting(cfg):
        # Refused rather than drawn from the empty caption: a text model's grid without its prompts would show its
        # weakest part (the unconditional model, trained on a p_uncond share of the steps, or never) as if it were
        # the model; the unconditional draw stays one argument away (prompt=""). RePaint completes unconditionally,
        # as it does for a class-conditional model without labels.
        example = example_prompt(ckpt_cfg) or "<a caption in the words of its training captions>"
        empty = ', or prompt="" for its unconditional model' if float(ckpt_cfg.get("p_uncond") or 0) > 0 else ""
        raise ConfigError(
            f'{where} is conditioned on text: give its caption, e.g. prompt="{example}" (or prompts=[...], or '
            f"prompts_file=<a text file, one prompt a line>){empty}"
        )
    if prompts is not None and (wants_inpainting(cfg) or wants_condition(cfg)):
        raise ConfigError("prompts draw new samples; inpaint.* and cond.* do not go with them: drop those")
    if prompts is not None and cfg.get("labels") is not None:
        raise ConfigError("labels= needs a class-conditional checkpoint (trained with model.num_classes); drop it")
    if prompts is not None and (cfg.get("classifier") or {}).get("ckpt_path"):
        raise ConfigError("classifier.ckpt_path guides class labels; a text model is guided with guidance= instead")


def sample_text(cfg: DictConfig, denoiser, ckpt_cfg: DictConfig, prompts: list[str], cond: Cond, out: Path, perf=None):
    """``num_samples`` samples of each prompt (consecutive: the first prompt's first), with classifier-free guidance
    ``guidance=`` w against the empty caption; writes samples.npz (images, prompts: each sample's, prompt_index),
    sampler.yaml and grid.png: a row per prompt (up to 16 of 16), the prompt written under it."""
    N, K = len(prompts), cfg.num_samples
    if N * K > MAX_NUM_SAMPLES:
        raise ConfigError(f"{N} prompts x num_samples={K} is more than {MAX_NUM_SAMPLES:,} samples; draw fewer")
    denoiser = guided(cfg, denoiser, ckpt_cfg)
    cond = cond.repeat_interleave(K)  # K samples of each prompt, one after another
    sampler = chosen_sampler(cfg, ckpt_cfg)
    w = float(cfg.get("guidance") or 0.0)
    print(f"sampler: {sampler}; {K} samples for each of {N} prompt{'s' * (N > 1)}, guidance w={w:g}")
    chunks = draw_to_disk(cfg, out, denoiser, sampler, None, perf, num_samples=N * K, cond=cond)
    index = np.repeat(np.arange(N), K)
    write_outputs(out, chunks, sampler, None, prompts=np.array(prompts, dtype=str)[index], prompt_index=index)
    rows, per = min(N, TEXT_ROWS), min(K, TEXT_PER_ROW)
    shown = first_samples(chunks, rows * K).unflatten(0, (rows, K))[:, :per].flatten(0, 1)
    save_png(caption_grid(to_unit(shown), prompts[:rows], per), out / "grid.png")
    chunks.remove()  # samples.npz holds them all now
    if cfg.get("save_chain"):  # the first prompt's chain
        frames = generate_chain(
            denoiser, sampler, cfg.chain_samples, cfg.chain_frames, seed=cfg.seed, perf=perf, progress=True,
            cond=cond[:1].repeat_interleave(cfg.chain_samples),
        )  # fmt: skip
        save_grid(to_unit(frames.flatten(0, 1)), out / "chain.png", nrow=frames.shape[1])
    return out


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
        labels, denoiser = with_guidance(
            denoiser, cfg.labels, cfg.get("guidance"), cfg.num_samples, cfg.get("guidance_rescale")
        )
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
