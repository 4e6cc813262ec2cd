"""Text-image data: the digit-pair captions (a bag of words cannot tell a pair from its swap), data=digit_pairs
(two bundled digits side by side, held-out pairs) and data=captioned_folder (images with a .txt caption beside
each), through the configs a user runs, and their errors."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from conftest import TINY, compose_cfg, run_cli
from ddpmlab.cli.common import user_error
from ddpmlab.data import DiffusionDataModule, to_uint8
from ddpmlab.data import datasets as D
from ddpmlab.data.captions import DIGIT_WORDS, TEMPLATES, pair_captions, pair_key, pair_of
from ddpmlab.errors import ConfigError, DatasetNotFoundError
from fixtures_data import assert_model_range, datamodule

SMALL = ("data.num_pairs=3000", "data.batch_size=64")  # keeps setup quick; the defaults are checked on the config


# ---------------------------------------------------------------------------------------------- captions
def bags(a: int, b: int) -> Counter:
    return Counter(tuple(sorted(c.split())) for c in pair_captions(a, b))


def test_a_bag_of_words_cannot_tell_a_pair_from_its_swap():
    assert sorted("a 3 left of a 7".split()) == sorted("a 7 left of a 3".split())
    assert "a 7 left of a 3" in pair_captions(7, 3)
    for a in range(10):
        for b in range(10):
            assert bags(a, b) == bags(b, a), (a, b)  # the same bags, each as often: no word-count cue to the order
            if a != b:
                assert not set(pair_captions(a, b)) & set(pair_captions(b, a)), "the word order tells them apart"


def first_is_right(caption: str) -> bool:
    """Whether a caption names the right digit first (read off its relation words)."""
    return any(w in caption for w in ("right of", "on its left", "on the right and"))


def test_each_caption_says_which_digit_is_on_the_left_in_both_word_orders():
    spelled = {str(d): d for d in range(10)} | {w: d for d, w in enumerate(DIGIT_WORDS)}
    for a, b in [(3, 7), (0, 9), (8, 1)]:
        caps = pair_captions(a, b)
        assert caps[0] == f"a {a} left of a {b}"  # the canonical caption
        assert len(caps) == len(set(caps)) == 4 * len(TEMPLATES) >= 32
        mentioned = [[spelled[w] for w in c.split() if w in spelled] for c in caps]
        assert all(m in ([a, b], [b, a]) for m in mentioned)
        assert all((m == [b, a]) == first_is_right(c) for m, c in zip(mentioned, caps, strict=True))
        assert 0.3 < np.mean([first_is_right(c) for c in caps]) < 0.7  # both word orders
        assert {w in c.split() for c in caps for w in (str(a), DIGIT_WORDS[a])} == {True, False}  # numerals, words


def test_the_vocabulary_is_small_closed_and_lowercase():
    words = {w for k in range(100) for c in pair_captions(*pair_of(k)) for w in c.split()}
    assert all(re.fullmatch(r"[a-z]+|[0-9]", w) for w in words)
    assert set(DIGIT_WORDS) | {str(d) for d in range(10)} <= words and len(words) <= 40
    assert all(pair_of(pair_key(a, b)) == (a, b) for a in range(10) for b in range(10))
    with pytest.raises(ValueError, match="0 to 9"):
        pair_captions(3, 10)


# ---------------------------------------------------------------------------------------------- digit pairs
def digit_pairs(*overrides: str) -> DiffusionDataModule:
    """The data module exactly as ``python train.py data=digit_pairs ...`` builds it, set up."""
    dm = instantiate(compose_cfg("train", ["data=digit_pairs", *overrides]).data)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def pairs():
    return digit_pairs(*SMALL)


def test_the_config_states_the_pair_layout():
    cfg = compose_cfg("train", ["data=digit_pairs"])
    d = cfg.data
    assert (list(d.image_size), d.channels, d.num_classes, d.random_flip) == ([8, 16], 1, None, False)
    assert (d.num_pairs, d.val_pairs_per_pair) == (20000, 10)
    held = [tuple(p) for p in d.held_out_pairs]
    assert held == list(D.HELD_OUT_PAIRS)
    # 10 ordered pairs of two different digits, each digit once on each side, none together with its swap
    assert len(set(held)) == 10 and all(a != b for a, b in held)
    assert sorted(a for a, _ in held) == sorted(b for _, b in held) == list(range(10))
    assert not {(b, a) for a, b in held} & set(held)
    assert isinstance(instantiate(d), DiffusionDataModule)  # nothing is read before setup()


def test_digit_pairs_shapes_keys_and_captions(pairs):
    train, val = pairs.train_set, pairs.val_set
    assert isinstance(train, D.ImageTensorDataset)  # the in-memory path: the on-device loader takes it
    assert train.images.shape == (3000, 1, 8, 16) and train.images.dtype == torch.uint8
    assert val.images.shape == (1000, 1, 8, 16)
    assert 0 <= int(train.labels.min()) and int(train.labels.max()) <= 99
    for ds in (train, val):
        assert len(ds.captions) == 100
        assert all(ds.captions[k] == pair_captions(k // 10, k % 10) for k in range(100))
        assert ds.pair_of(37) == (3, 7)
    x0, key = train[0]
    assert x0.shape == (1, 8, 16) and key.dtype == torch.long
    batch, keys = next(iter(pairs.train_dataloader()))
    assert batch.shape == (64, 1, 8, 16) and keys.dtype == torch.long
    assert_model_range(batch)


def test_held_out_pairs_are_never_trained_on_and_all_pairs_are_validated(pairs):
    train, val = pairs.train_set, pairs.val_set
    held = {pair_key(a, b) for a, b in D.HELD_OUT_PAIRS}
    assert train.held_out == val.held_out == held
    seen = Counter(train.labels.tolist())
    assert set(seen) == set(range(100)) - held  # every other pair is trained on
    counts = np.array(list(seen.values()))  # drawn uniformly: 3000 / 90 = 33 each on average
    assert ((counts - counts.mean()) ** 2 / counts.mean()).sum() < 89 + 5 * (2 * 89) ** 0.5  # chi-square, 89 dof
    assert Counter(val.labels.tolist()) == {k: 10 for k in range(100)}
    assert sorted(val.labels[:100].tolist()) == list(range(100)), "any 100 first items hold every pair once"
    swaps = {pair_key(b, a) for a, b in D.HELD_OUT_PAIRS}
    assert swaps <= set(seen), "each held-out pair's swap is seen"


def test_each_half_is_a_digit_of_its_side_from_the_right_split(pairs):
    images, labels = D.load_digits()
    train_digits, val_digits = D.holdout(len(images), 0.1)  # the split data=digits uses
    for ds, allowed in ((pairs.train_set, train_digits), (pairs.val_set, val_digits)):
        left, right = ds.sources[:, 0], ds.sources[:, 1]
        assert torch.equal(labels[left], ds.labels // 10) and torch.equal(labels[right], ds.labels % 10)
        assert torch.equal(ds.images[..., :8], images[left]) and torch.equal(ds.images[..., 8:], images[right])
        assert torch.isin(ds.sources, allowed).all(), "validation digits never appear in training pairs"
    assert len(pairs.train_set.sources.unique()) > 1000, "many images of each digit, not one per class"


def test_the_pairs_are_the_same_in_every_run_and_sizes_follow_the_config():
    one = digit_pairs(*SMALL, "seed=1")
    two = digit_pairs(*SMALL, "seed=2")
    assert torch.equal(one.train_set.images, two.train_set.images) and torch.equal(
        one.val_set.labels, two.val_set.labels
    )
    dm = digit_pairs(
        "data.num_pairs=500", "data.val_pairs_per_pair=2", "data.held_out_pairs=[]",
        "data.image_size=[16,32]", "data.on_device=true", "data.batch_size=50",
    )  # fmt: skip
    assert dm.train_set.images.shape == (500, 1, 16, 32) and len(dm.val_set) == 200 and dm.train_set.held_out == set()
    assert dm.uses_device_loader()
    x0, keys = next(iter(dm.train_dataloader()))  # the whole split on the device (here the CPU), batches gathered
    assert x0.shape == (50, 1, 16, 32) and keys.dtype == torch.long
    assert digit_pairs("data.num_pairs=10", "data.val_pairs_per_pair=0").val_set is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(random_flip=True), "random_flip=true would mirror digit pairs"),
        (dict(held_out_pairs=[[0, 10]]), r"held_out_pairs must be a list of \[a, b\] pairs of digits 0..9"),
        (dict(held_out_pairs=[[1, 2, 3]]), "held_out_pairs must be a list"),
        (dict(held_out_pairs=[3, 7]), "held_out_pairs must be a list"),
        (dict(held_out_pairs="37"), "held_out_pairs must be a list"),
        (dict(held_out_pairs=[[1, 2], [3, 4], [1, 2]]), r"lists \[1, 2\] twice"),
        (dict(held_out_pairs=[[a, b] for a in range(10) for b in range(10)]), "all 100 pairs"),
        (dict(num_pairs=0), "data.num_pairs must be >= 1"),
        (dict(image_size=8), r"image_size for digit_pairs is \[H, W\]"),
        (dict(image_size=[8, 0]), r"image_size for digit_pairs is \[H, W\]"),
    ],
)
def test_bad_digit_pair_settings_are_refused_before_any_data_is_read(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DiffusionDataModule(**{"name": "digit_pairs", "image_size": [8, 16], "num_classes": None, **kwargs})


def test_bad_settings_from_the_command_line_are_one_line():
    for over, message in [
        ("data.held_out_pairs=[[0,7],[7,12]]", "held_out_pairs must be a list"),
        ("data.random_flip=true", "random_flip=true"),
    ]:
        with pytest.raises(Exception) as e:  # Hydra's instantiate wraps it; the CLI finds it as user_error does
            instantiate(compose_cfg("train", ["data=digit_pairs", over]).data)
        line = str(user_error(e.value))
        assert message in line and "\n" not in line
    with pytest.raises(ConfigError, match=r"\[H, W\] is for digit_pairs"):
        DiffusionDataModule(name="digits", image_size=[8, 8])


# ---------------------------------------------------------------------------------------------- captioned folder
def make_captioned(root, n: int = 4, size: int = 20):
    """``n`` PNGs, image i filled with grey level 40 * i, each with a .txt naming it (img_1 has two captions)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size + 6, 3), 40 * i, np.uint8)).save(root / f"img_{i}.png")
        text = f"  picture number {i}  \n" + ("\n\nanother caption of 1\n" if i == 1 else "")
        (root / f"img_{i}.txt").write_text(text)
    return root


def test_captioned_folder_reads_each_images_captions(tmp_path):
    make_captioned(tmp_path / "caps")
    dm = datamodule(
        "captioned_folder", tmp_path / "caps", "data.image_size=16", "data.val_fraction=0", "data.num_workers=0",
        "data.batch_size=4",
    )  # fmt: skip
    ds = dm.train_set
    assert len(ds) == 4 and dm.val_set is None
    by_name = {p.name: c for p, c in zip(ds.paths, ds.captions, strict=True)}
    assert by_name == {f"img_{i}.png": [f"picture number {i}"] for i in (0, 2, 3)} | {
        "img_1.png": ["picture number 1", "another caption of 1"]  # one caption a line, stripped, blank lines skipped
    }
    for i in range(4):
        x0, key = ds[i]
        assert x0.shape == (3, 16, 16) and int(key) == i
        assert int(to_uint8(x0)[0, 8, 8]) == 40 * int(ds.paths[i].stem[-1])  # the image of its own caption
    x0, keys = next(iter(dm.train_dataloader()))
    assert x0.shape == (4, 3, 16, 16) and sorted(keys.tolist()) == [0, 1, 2, 3]
    assert_model_range(x0)


def test_captioned_folder_keys_index_each_split(tmp_path):
    make_captioned(tmp_path / "caps")
    dm = datamodule("captioned_folder", tmp_path / "caps", "data.image_size=8", "data.val_fraction=0.25")
    assert (len(dm.train_set), len(dm.val_set)) == (3, 1)
    for ds in (dm.train_set, dm.val_set):
        assert ds.labels.tolist() == list(range(len(ds)))
        assert all(ds.captions[i][0] == f"picture number {p.stem[-1]}" for i, p in enumerate(ds.paths))


def test_a_missing_caption_file_is_one_line_naming_the_first_and_the_count(tmp_path):
    root = make_captioned(tmp_path / "caps")
    (root / "img_1.txt").unlink()
    (root / "img_3.txt").unlink()
    with pytest.raises(DatasetNotFoundError) as e:
        datamodule("captioned_folder", root)
    line = str(e.value)
    assert "2 of the 4 images" in line and str(root / "img_1.png") in line and "img_1.txt" in line
    assert "\n" not in line


def test_train_stops_on_a_missing_caption_with_one_line_before_writing_anything(tmp_path):
    root = make_captioned(tmp_path / "caps")
    (root / "img_2.txt").unlink()
    r = run_cli("train.py", *TINY, "data=captioned_folder", f"data.root={root}", "data.image_size=8",
                f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"ddpmlab: error: 1 of the 4 images under {root} have no caption file beside them (first: "
        f"{root / 'img_2.png'}, no img_2.txt); write each image's caption into a .txt file of the same name beside "
        f"it, or remove the images without one"
    ], r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_an_empty_caption_file_is_refused(tmp_path):
    root = make_captioned(tmp_path / "caps")
    (root / "img_2.txt").write_text("  \n\n")
    with pytest.raises(ConfigError, match="1 of the 4 caption files .* are empty") as e:
        datamodule("captioned_folder", root)
    assert str(root / "img_2.txt") in str(e.value) and "\n" not in str(e.value)


def test_captioned_folder_has_no_classes():
    with pytest.raises(ConfigError, match="captioned_folder has no classes"):
        DiffusionDataModule(name="captioned_folder", image_size=16, num_classes=10)
