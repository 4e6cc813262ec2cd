"""Stored configs are bounded before OmegaConf reads them: a small crafted file that stands for a huge config (a
pickle referencing one list many times, a YAML alias bomb) is refused at once, by every reader, in one line."""

import time

import pytest
import torch
from omegaconf import OmegaConf

import ddpmlab
from conftest import run_cli
from ddpmlab.api import classifier_from_checkpoint, load_checkpoint
from ddpmlab.errors import CheckpointError
from ddpmlab.stages import load_first_stage
from ddpmlab.stored_config import MAX_FILE_BYTES, check_plain, read_yaml
from ddpmlab.training import check_resume

# Unbounded, each of these crafted files kept OmegaConf walking for a minute until the process died; refused
# before the walk, they take milliseconds. The bound is loose only so that a busy machine cannot fail it.
QUICK = 5.0


def shared_lists():
    """10^9 leaves in three lists: pickled, each list is stored once and referenced 1000 times."""
    a = [0] * 1000
    b = [a] * 1000
    return [b] * 1000


def deep_lists(depth=200):
    node = []
    for _ in range(depth):
        node = [node]
    return node


def crafted_checkpoint(tiny_ckpt, tmp_path, value, **top):
    """The tiny checkpoint with ``value`` under a config key that nothing reads."""
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["ddpmlab_config"]["unused"] = value
    ckpt["ddpmlab_config"].update(top)
    path = tmp_path / "crafted.ckpt"
    torch.save(ckpt, path)
    assert path.stat().st_size < tiny_ckpt.stat().st_size + 50_000  # small on disk, huge when walked
    return path


def refused(fn, *args, match=r"far larger than any ddpmlab config"):
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=match) as info:
        fn(*args)
    assert time.perf_counter() - start < QUICK
    assert "\n" not in str(info.value)
    return info.value


def test_shared_references_count_every_time_they_are_reached():
    check_plain({"model": {"channel_mult": [1, 2, 2]}, "tags": ["a"] * 100}, "x")  # a real config's shape passes
    with pytest.raises(CheckpointError, match="far larger"):
        check_plain({"unused": shared_lists()}, "x")
    with pytest.raises(CheckpointError, match="far larger"):
        check_plain({"unused": deep_lists()}, "x")
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        check_plain({"model": torch.zeros(1)}, "x")


@pytest.mark.parametrize("bomb", [shared_lists, deep_lists])
def test_every_reader_of_a_checkpoint_refuses_a_config_bomb(tiny_ckpt, tmp_path, train_cfg, bomb):
    path = crafted_checkpoint(tiny_ckpt, tmp_path, bomb())
    refused(ddpmlab.load, path)  # sample.py, evaluate.py and export.py read it so
    refused(load_checkpoint, path)
    refused(classifier_from_checkpoint, {"ddpmlab_config": {"unused": bomb()}, "state_dict": {}})
    refused(check_resume, str(path), train_cfg(f"ckpt_path={path}"))
    ae = crafted_checkpoint(tiny_ckpt, tmp_path, bomb(), stage="autoencoder")
    refused(load_first_stage, ae)


def test_sample_py_refuses_a_config_bomb_in_one_line(tiny_ckpt, tmp_path):
    path = crafted_checkpoint(tiny_ckpt, tmp_path, shared_lists())
    r = run_cli("sample.py", f"ckpt_path={path}", "num_samples=2", f"hydra.run.dir={tmp_path / 'o'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ddpmlab: error: {path}: its stored config is far larger")


@pytest.fixture
def exported(tiny_ckpt, tmp_path):
    pytest.importorskip("safetensors")
    from ddpmlab.cli.export import export

    return export(tiny_ckpt, tmp_path / "export")


def test_an_export_config_is_written_without_aliases_and_read_back_alike(exported):
    text = (exported / "config.yaml").read_text()
    assert OmegaConf.create(text) == read_yaml(exported / "config.yaml")
    ddpmlab.load(exported)


def test_a_yaml_alias_bomb_in_an_export_is_refused(exported):
    lines = ["  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9^10 leaves
    config = exported / "config.yaml"
    config.write_text(config.read_text() + "unused:\n" + "\n".join(lines) + "\n")
    assert config.stat().st_size < 5000
    refused(ddpmlab.load, exported, match=r"config.yaml uses a YAML alias \(\*a0\)")


def test_an_oversized_export_config_is_refused_unread(exported):
    config = exported / "config.yaml"
    config.write_text(config.read_text() + "unused: [" + "0, " * (MAX_FILE_BYTES // 3) + "0]\n")
    refused(ddpmlab.load, exported, match=r"config.yaml holds [\d,]+ bytes, far more than any ddpmlab config")
