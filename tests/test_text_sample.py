"""sample.py for text-conditioned models: prompt=, prompts=[...] and prompts_file=, every sampler with classifier-free
guidance against the empty caption, grid.png with each prompt under its row, the prompts in samples.npz; the
one-line errors; the training grids' caption rows, the model card and the closing line of a text run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import ddpmlab.cli.sample as sample_cli
from conftest import TINY, compose_cfg, run_cli
from ddpmlab.api import load_denoiser
from ddpmlab.cli.export import export
from ddpmlab.cli.sample import sample
from ddpmlab.conditioning import text_cond
from ddpmlab.errors import ConfigError
from ddpmlab.images import caption_grid, to_uint8
from ddpmlab.samplers import GuidedDenoiser, Sampler, generate
from ddpmlab.stages import PixelDiffusion, example_prompt, prompt_argument
from ddpmlab.training import train

FAST = ["sampler=ddim", "sampler.num_steps=4"]
PROMPT = "a 4 left of a 9"
CELL_H, CELL_W, PAD = 32, 64, 2  # an 8x16 pair upscaled x4 in the grids, 2 px between cells


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """experiment=text_digits (learned encoder, cross-attention, p_uncond 0.1) trained for two steps."""
    run = tmp_path_factory.mktemp("text") / "run"
    overrides = [
        *TINY, "experiment=text_digits", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "callbacks.checkpoint.every_n_train_steps=2", "callbacks.sample_grid.every_n_steps=2",
    ]  # fmt: skip
    train(compose_cfg("train", overrides, run))
    return run


@pytest.fixture(scope="module")
def text_ckpt(text_run, tmp_path_factory):
    """The run's checkpoint with its cross-attention opened: the SpatialTransformers' output projections start at
    zero and two steps barely move them, so here they are set to random values (in the EMA and the raw weights)
    so that the caption visibly changes the samples."""
    ckpt = torch.load(text_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for state in (ckpt["state_dict"], ckpt.get("current_model_state") or {}):
        g = torch.Generator().manual_seed(0)  # the same values in both
        for name, value in state.items():
            if ".proj_out." in name:
                state[name] = torch.randn(value.shape, generator=g) * 0.5
    path = tmp_path_factory.mktemp("opened") / "text.ckpt"
    torch.save(ckpt, path)
    return path


def draw(ckpt, out, *overrides: str) -> dict[str, np.ndarray]:
    sample(compose_cfg("sample", [f"ckpt_path={ckpt}", *FAST, *overrides], out), out)
    return dict(np.load(out / "samples.npz"))


def grid_size(rows: int, per_row: int) -> tuple[int, int]:
    """(width, height without the caption strips) of rows of per_row upscaled 8x16 cells."""
    return per_row * (CELL_W + PAD) + PAD, rows * (CELL_H + 2 * PAD)


def has_text(strip: np.ndarray) -> bool:
    """A caption strip: white, with dark pixels where the caption is written."""
    return bool((strip < 100).any() and np.median(strip) == 255)


# ------------------------------------------------------------------ prompt=, prompts=, prompts_file=
@pytest.mark.parametrize("algorithm", ["ddpm", "ddim"])
def test_prompt_draws_num_samples_guided_as_generate_does(text_ckpt, tmp_path, algorithm):
    steps = [f"sampler={algorithm}", "sampler.num_steps=4", f"prompt={PROMPT}", "num_samples=3", "batch_size=2"]
    npz = draw(text_ckpt, tmp_path / "g", *steps, "guidance=2")
    assert npz["images"].shape == (3, 8, 16, 1) and npz["images"].dtype == np.uint8
    assert npz["prompts"].dtype.kind == "U" and npz["prompts"].tolist() == [PROMPT] * 3
    assert npz["prompt_index"].tolist() == [0, 0, 0]
    # the same draw from Python: the prompt's tokens, w = 2 against the empty caption, the same seed and batches
    denoiser, _ = load_denoiser(text_ckpt)
    sampler = Sampler.from_config(OmegaConf.to_container(OmegaConf.load(tmp_path / "g" / "sampler.yaml")))
    assert sampler.algorithm == algorithm
    cond = text_cond(denoiser, [PROMPT]).repeat_interleave(3)
    x0 = generate(GuidedDenoiser(denoiser, 2.0), sampler, 3, seed=0, batch_size=2, cond=cond)
    assert np.array_equal(npz["images"], to_uint8(x0).permute(0, 2, 3, 1).numpy())
    plain = draw(text_ckpt, tmp_path / "plain", *steps)
    assert not np.array_equal(plain["images"], npz["images"])  # eq. 6 with w = 2 moves the samples
    other = draw(text_ckpt, tmp_path / "other", *steps[:-2], "prompt=nine then four", "num_samples=3", "guidance=2")
    assert not np.array_equal(other["images"], npz["images"])  # same noise, another caption: the caption acts


def test_prompts_draw_num_samples_each_and_the_grid_writes_them_under_their_rows(text_ckpt, tmp_path):
    prompts = [PROMPT, "nine then four", ""]  # the last: the empty caption, the unconditional model
    # batches of 2: the same seed and batch size draw the same samples (CPU kernels round by batch size)
    npz = draw(text_ckpt, tmp_path / "a", f"prompts=[{PROMPT},nine then four,'']", "num_samples=2", "save_chain=true",
               "batch_size=2")  # fmt: skip
    assert npz["images"].shape == (6, 8, 16, 1)
    assert npz["prompts"].tolist() == [p for p in prompts for _ in range(2)]
    assert npz["prompt_index"].tolist() == [0, 0, 1, 1, 2, 2]
    grid = np.asarray(Image.open(tmp_path / "a" / "grid.png").convert("L"))
    width, cells = grid_size(1, 2)
    row = CELL_H + 2 * PAD
    strip = (grid.shape[0] - 3 * row) // 3  # every row is followed by an equally tall caption strip
    assert grid.shape[1] == width and strip > 10 and grid.shape[0] == 3 * (row + strip)
    assert all(has_text(grid[i * (row + strip) + row : (i + 1) * (row + strip)]) for i in range(3))
    assert (tmp_path / "a" / "chain.png").is_file() and (tmp_path / "a" / "sampler.yaml").is_file()
    # the first prompt's samples are those prompt= draws alone (same seed, same noise)
    alone = draw(text_ckpt, tmp_path / "b", f"prompt={PROMPT}", "num_samples=2", "batch_size=2")
    assert np.array_equal(alone["images"], npz["images"][:2])


def test_prompts_file_one_prompt_a_line(text_ckpt, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(f"{PROMPT}\n\n  nine then four  \n")
    npz = draw(text_ckpt, tmp_path / "f", f"prompts_file={path}", "num_samples=1")
    assert npz["prompts"].tolist() == [PROMPT, "nine then four"]
    listed = draw(text_ckpt, tmp_path / "l", f"prompts=[{PROMPT},nine then four]", "num_samples=1")
    assert np.array_equal(listed["images"], npz["images"])


def test_an_export_samples_prompts_like_its_checkpoint(text_ckpt, tmp_path):
    folder = export(text_ckpt, tmp_path / "export")
    a = draw(text_ckpt, tmp_path / "c", f"prompt={PROMPT}", "num_samples=2", "guidance=2")
    b = draw(folder, tmp_path / "e", f"prompt={PROMPT}", "num_samples=2", "guidance=2")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ errors
def cli(ckpt, tmp_path, *args: str):
    out = tmp_path / "outputs" / "out"  # a failed call removes its empty run folder, and its parent if empty
    r = run_cli("sample.py", f"ckpt_path={ckpt}", *args, f"hydra.run.dir={out}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
    assert r.stderr.startswith("ddpmlab: error: ")
    assert not (out / "chunks").exists()  # refused before anything was drawn
    return r.stderr


def refused(ckpt, tmp_path, *args: str) -> str:
    """sample.py's refusal of ``args``, in this process (what the CLI prints after ``ddpmlab: error:``)."""
    out = tmp_path / "outputs" / "out"
    with pytest.raises(ConfigError) as e:
        sample(compose_cfg("sample", [f"ckpt_path={ckpt}", *args], out), out)
    assert "\n" not in str(e.value) and not (out / "chunks").exists()  # one line, refused before anything was drawn
    return str(e.value)


def test_prompt_errors_are_one_line_with_exit_2(text_ckpt, tiny_ckpt, tmp_path):
    err = cli(text_ckpt, tmp_path, "prompt=a 4 left of a cat on a dog")  # the command line: exit 2, one line
    assert "never saw in training: 'cat', 'dog'" in err
    err = refused(text_ckpt, tmp_path, "prompt=" + " ".join([PROMPT] * 3))
    assert "has 18 words, more than the text encoder's context length of 12" in err
    err = refused(tiny_ckpt, tmp_path, f"prompt={PROMPT}")
    assert "need a text-conditioned model" in err and "has no text encoder" in err
    err = refused(text_ckpt, tmp_path, f"prompt={PROMPT}", "prompts=[nine then four]")
    assert "give one of prompt=, prompts=[...] or prompts_file=, not prompt and prompts" in err
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "holds no prompt" in refused(text_ckpt, tmp_path, f"prompts_file={tmp_path / 'empty.txt'}")
    assert "is not a file" in refused(text_ckpt, tmp_path, f"prompts_file={tmp_path / 'missing.txt'}")
    err = refused(text_ckpt, tmp_path)  # a text model without a prompt: refused, with the fix
    assert f'conditioned on text: give its caption, e.g. prompt="{PROMPT}"' in err and 'prompt=""' in err


def test_a_text_model_is_refused_before_anything_is_drawn(text_ckpt, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(sample_cli, "generate_batches", never)
    for bad in ([], ["prompt=a 4 left of a cat"], ["prompt=" + " ".join([PROMPT] * 3)], ["labels=[1]", "prompt=4"]):
        with pytest.raises(ConfigError):
            sample(compose_cfg("sample", [f"ckpt_path={text_ckpt}", "num_samples=50000", *bad], tmp_path), tmp_path)
    with pytest.raises(ConfigError, match="inpaint.\\* and cond.\\* do not go with them"):
        sample(compose_cfg("sample", [f"ckpt_path={text_ckpt}", "prompt=4", "inpaint.index=0"], tmp_path), tmp_path)


# ------------------------------------------------------------------ grids, card, closing line
def test_caption_grid_writes_each_caption_under_its_row_and_wraps_long_ones():
    images = torch.rand(6, 1, 8, 16)
    short = caption_grid(images, ["a 4 left of a 9", "three then seven"], per_row=3)
    width, cells = grid_size(2, 3)
    assert short.shape[0] == 3 and short.shape[2] == width and short.shape[1] > cells
    long = caption_grid(images, ["a 4 left of a 9", " ".join(["a 4 left of a 9"] * 6)], per_row=3)
    assert long.shape[2] == width and long.shape[1] > short.shape[1]  # the long caption wraps: taller strips
    with pytest.raises(ValueError, match="do not make 2 rows of 4"):
        caption_grid(images, ["a", "b"], per_row=4)


def test_training_grid_of_a_text_model_has_caption_rows(text_run):
    grid = np.asarray(Image.open(sorted((text_run / "grids").glob("*.png"))[-1]).convert("L"))
    # TINY's 4 grid samples: 8 captions, each row one sample | a real pair of the caption
    width, cells = grid_size(8, 2)
    row = CELL_H + 2 * PAD
    strip = (grid.shape[0] - cells) // 8
    assert grid.shape[1] == width and strip > 10 and grid.shape[0] == 8 * (row + strip)
    assert all(has_text(grid[i * (row + strip) + row : (i + 1) * (row + strip)]) for i in range(8))


def test_model_card_names_the_text_encoder_and_its_code_runs(text_ckpt, tmp_path):
    folder = export(text_ckpt, tmp_path / "export")
    card = (folder / "README.md").read_text()
    assert "| data | digit_pairs (1 x 8 x 16)" in card
    assert (
        "| text encoder | learned Transformer encoder, trained with the U-Net: word-level vocabulary of 34 words"
        in card
    )
    assert "context 12 words, width 128" in card
    assert (
        "| text condition | cross-attention (SpatialTransformer, LDM) at feature heights [4] and in the middle, "
        "context_dim 128, a learned embedding of each position on the image tokens;" in card
    )
    assert "p_uncond=0.1" in card
    code = card.split("```python\n")[1].split("```")[0].replace("<this folder>", str(folder))
    assert f"text_cond(denoiser, [{PROMPT!r}] * 16)" in code and "GuidedDenoiser(denoiser, 3.0)" in code
    scope: dict = {}
    exec(code.replace("num_steps=50", "num_steps=2"), scope)  # the card's own lines: load, tokenize, guide, sample
    assert scope["x0"].shape == (16, 1, 8, 16)


def test_closing_line_of_a_text_run_gives_sample_py_a_prompt(text_run):
    cfg = compose_cfg("train", [*TINY, "experiment=text_digits"])
    line = PixelDiffusion().next_command("run/last.ckpt", cfg)
    assert line == f'sample with: python sample.py ckpt_path=run/last.ckpt prompt="{PROMPT}" num_samples=16 guidance=3'
    assert example_prompt(cfg) == PROMPT
    assert prompt_argument("a dog, running") == "'prompt=\"a dog, running\"'"  # quoted for Hydra, then the shell
    assert (
        PixelDiffusion().next_command("x.ckpt", compose_cfg("train", TINY))
        == "sample with: python sample.py ckpt_path=x.ckpt"
    )
