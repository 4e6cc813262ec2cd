"""text_encoder=clip: a frozen CLIP text model and tokenizer read offline from a folder, safetensors only; tested
with a tiny randomly initialised CLIP text model saved to a temporary folder."""

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="text_encoder=clip needs transformers (pip install .[text])")

from ddpmlab.conditioning import Cond  # noqa: E402
from ddpmlab.errors import ConfigError  # noqa: E402
from ddpmlab.networks.clip_text import (  # noqa: E402
    CLIPTextEncoder,
    clip_hidden_size,
    load_clip_text_model,
)

POSITIONS = 16


def tiny_vocab() -> dict[str, int]:
    """A valid CLIP BPE vocabulary without merges: every letter and digit alone, inside and at the end of a word."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab |= {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A folder as CLIPTextModel.save_pretrained + CLIPTokenizer.save_pretrained write it (safetensors)."""
    src = tmp_path_factory.mktemp("bpe")
    vocab = tiny_vocab()
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    tokenizer = cls.from_pretrained(str(src), local_files_only=True)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=POSITIONS, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    transformers.CLIPTextModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(clip_dir):
    return CLIPTextEncoder(str(clip_dir))


def copy_without(src, dst, *names):
    shutil.copytree(src, dst)
    for name in names:
        (dst / name).unlink(missing_ok=True)
    return dst


def test_loads_offline_and_encodes_to_the_hidden_size(clip_dir, monkeypatch):
    # Nothing online: the hub is told so, and a connection attempt would fail the test outright.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the CLIP encoder tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    enc = CLIPTextEncoder(str(clip_dir))
    assert enc.dim == 32 == clip_hidden_size(clip_dir)
    assert enc.tokenizer.max_length == POSITIONS  # the model's positions by default
    tokens, mask = enc.tokenizer(["a cat", "two dogs on a mat"])
    assert tokens.shape == mask.shape == (2, POSITIONS) and tokens.dtype == torch.long and mask.dtype == torch.bool
    context, context_mask = enc(tokens, mask)
    assert context.shape == (2, POSITIONS, 32) and torch.isfinite(context).all()
    assert torch.equal(context_mask, mask)


def test_mask_covers_bos_to_eos_and_padding_is_the_tokenizers(encoder):
    hf = encoder.tokenizer.hf
    tokens, mask = encoder.tokenizer(["a cat", ""])
    # "a cat" -> BOS a</w> c a t</w> EOS: six real tokens, then the tokenizer's pad token
    assert mask.sum(1).tolist() == [6, 2]
    assert tokens[0, 0] == hf.bos_token_id and tokens[0, 5] == hf.eos_token_id
    assert tokens[1, :2].tolist() == [hf.bos_token_id, hf.eos_token_id]
    assert (tokens[0, 6:] == hf.pad_token_id).all() and not mask[0, 6:].any()
    assert tokens.tolist()[0][:6] == hf(["a cat"])["input_ids"][0]


def test_frozen_and_stays_in_eval_mode(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    parent = torch.nn.Sequential(encoder)
    parent.train()
    assert not encoder.training and not encoder.model.training
    tokens, mask = encoder.tokenizer(["a cat"])
    # dropout off: the same input encodes the same way twice; no graph through CLIP
    a, _ = encoder(tokens, mask)
    b, _ = encoder(tokens, mask)
    assert torch.equal(a, b) and not a.requires_grad


def test_the_null_caption_is_the_encoding_of_the_empty_string(encoder):
    tokens, mask = encoder.tokenizer(["a cat", "seven dogs"])
    null = Cond(tokens=tokens, token_mask=mask).null()
    assert not null.token_mask.any()
    context, context_mask = encoder(null.tokens, null.token_mask)
    empty, empty_mask = encoder(*encoder.tokenizer([""]))
    assert torch.allclose(context, empty.expand(2, -1, -1), atol=1e-6)
    assert context_mask.sum(1).tolist() == [2, 2] and torch.equal(context_mask[0], empty_mask[0])
    # only the null rows are replaced
    half = Cond(tokens=tokens, token_mask=mask).drop(torch.tensor([False, True]))
    mixed, _ = encoder(half.tokens, half.token_mask)
    full, _ = encoder(tokens, mask)
    assert torch.allclose(mixed[0], full[0]) and torch.allclose(mixed[1], empty[0], atol=1e-6)


def test_penultimate_layer_and_shorter_context(clip_dir, encoder):
    enc = CLIPTextEncoder(str(clip_dir), max_length=8, layer="penultimate")
    tokens, mask = enc.tokenizer(["a cat"])
    assert tokens.shape == (1, 8)
    context, _ = enc(tokens, mask)
    long_tokens, long_mask = encoder.tokenizer(["a cat"])
    last, _ = encoder(long_tokens, long_mask)
    assert context.shape == (1, 8, 32) and not torch.allclose(context[0, :6], last[0, :6])
    # causal attention: the real tokens' states do not depend on how much padding follows them
    short, short_mask = encoder(long_tokens[:, :8], long_mask[:, :8])
    assert torch.allclose(short[0, :6], last[0, :6], atol=1e-6) and torch.equal(short_mask, mask)
    with pytest.raises(ConfigError, match="text_encoder.layer=middle"):
        CLIPTextEncoder(str(clip_dir), layer="middle")
    with pytest.raises(ConfigError, match="max_length=17 .* 16 positions"):
        CLIPTextEncoder(str(clip_dir), max_length=17)


def test_a_caption_longer_than_the_context_is_refused_with_both_lengths(encoder):
    with pytest.raises(ConfigError, match=r"'abcdefghijklmnop' is 18 CLIP tokens long .* context length 16"):
        encoder.tokenizer(["a cat", "abcdefghijklmnop"])
    assert encoder.tokenizer(["abcdefghijklmn"])[1].all()  # 14 + BOS + EOS fit exactly


def test_text_encoder_clip_config_builds_a_unet_that_cross_attends_to_clip_and_a_full_clip_folder(clip_dir, tmp_path):
    from conftest import compose_cfg
    from ddpmlab.api import build_denoiser

    over = ["data=digit_pairs", "text_encoder=clip", f"text_encoder.path={clip_dir}", "model=unet_tiny"]
    denoiser = build_denoiser(compose_cfg("train", over, tmp_path))
    assert isinstance(denoiser.net.text_encoder, CLIPTextEncoder) and denoiser.net.context_dim == 32
    assert denoiser.tokenizer(["a cat"])[0].shape == (1, 16)
    # a whole CLIPModel's folder: its text half is read (the same encoding), its width is text_config.hidden_size
    text = transformers.CLIPTextConfig.from_pretrained(str(clip_dir))
    vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "image_size": 32, "patch_size": 16}  # fmt: skip
    full_model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision))
    full = tmp_path / "full"
    full_model.save_pretrained(full, safe_serialization=True)
    for f in clip_dir.glob("*"):
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            shutil.copy(f, full)
    assert clip_hidden_size(full) == 32
    from_full = CLIPTextEncoder(str(full))
    tokens, mask = from_full.tokenizer(["a cat"])
    expected = full_model.text_model(input_ids=tokens).last_hidden_state
    assert torch.allclose(from_full(tokens, mask)[0], expected, atol=1e-5)
    other = copy_without(clip_dir, tmp_path / "t5")
    (other / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 512}))
    with pytest.raises(ConfigError, match="'t5' model, not a CLIP text model"):
        clip_hidden_size(other)


@pytest.mark.parametrize(
    "path,message",
    [
        (None, "needs text_encoder.path=<a folder holding config.json, model.safetensors"),
        ("???", "needs text_encoder.path="),
        ("nowhere", "is not a folder; it must hold config.json, model.safetensors"),
    ],
)
def test_no_folder_is_refused(tmp_path, path, message):
    with pytest.raises(ConfigError, match=message):
        CLIPTextEncoder(str(tmp_path / path) if path == "nowhere" else path)


@pytest.mark.parametrize(
    "removed,message",
    [
        (["config.json"], "has no config.json; it must hold .*save_pretrained"),
        (["model.safetensors"], "has no model.safetensors; it must hold"),
        (["tokenizer.json", "vocab.json"], r"has no tokenizer \(tokenizer.json, or vocab.json \+ merges.txt\)"),
    ],
)
def test_an_incomplete_folder_is_refused_naming_what_is_missing(clip_dir, tmp_path, removed, message):
    folder = copy_without(clip_dir, tmp_path / "clip", *removed)
    with pytest.raises(ConfigError, match=message):
        CLIPTextEncoder(str(folder))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"num_hidden_layers": 3}, r"lacks \d+ weights of the CLIP text model its config.json describes \(encoder"),
        ({"intermediate_size": 48}, "do not fit its config.json"),
    ],
)
def test_weights_that_do_not_fit_the_config_are_refused(clip_dir, tmp_path, change, message):
    # transformers itself would start a missing weight from random numbers with a warning only
    folder = copy_without(clip_dir, tmp_path / "clip")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(ConfigError, match=message):
        CLIPTextEncoder(str(folder))


def test_a_pickle_only_folder_is_refused_and_never_unpickled(clip_dir, tmp_path, monkeypatch):
    folder = copy_without(clip_dir, tmp_path / "clip", "model.safetensors")
    model = load_clip_text_model(clip_dir)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="holds only pytorch_model.bin.*safetensors only.*safe_serialization=True"):
        CLIPTextEncoder(str(folder))
    # Below our own check, transformers itself refuses the pickle when asked for safetensors, without reading it.
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.CLIPTextModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    assert not loads


def test_import_ddpmlab_does_not_import_transformers():
    code = "import sys, ddpmlab, ddpmlab.networks, ddpmlab.networks.clip_text; assert 'transformers' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
