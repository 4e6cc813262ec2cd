"""A frozen CLIP text encoder (Radford et al. 2021) read from a local folder: the text conditioning of Stable
Diffusion (Rombach et al. 2022, Sec. 3.3 and 4.3: tau_theta = CLIP ViT-L/14's text Transformer, frozen).

The folder is what Hugging Face ``transformers`` writes with ``CLIPTextModel.save_pretrained`` and
``CLIPTokenizer.save_pretrained``: ``config.json``, ``model.safetensors`` and the tokenizer files
(``tokenizer.json``, or ``vocab.json`` + ``merges.txt``). Nothing is downloaded (``local_files_only``), the weights
are read as safetensors only (a ``pytorch_model.bin`` is a pickle, which can run code when read) and no code from the
folder runs (the concrete CLIP classes, never ``trust_remote_code``).

``transformers`` is an optional dependency (``pip install ddpmlab[text]``), imported only when a CLIP encoder is
built, so ``import ddpmlab`` never pays for it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ddpmlab.errors import ConfigError

# What a folder must hold, in the words of the error messages.
FOLDER_LAYOUT = (
    "config.json, model.safetensors and the tokenizer (tokenizer.json, or vocab.json + merges.txt), as "
    "CLIPTextModel.save_pretrained(dir) and CLIPTokenizer.save_pretrained(dir) write them"
)
CONVERT = (
    "convert it once on a trusted machine: CLIPTextModel.from_pretrained(dir).save_pretrained(dir, "
    "safe_serialization=True)"
)
LAYERS = ("last", "penultimate")


def _transformers():
    try:
        import transformers
    except ImportError as e:  # an optional extra
        raise ConfigError(
            "text_encoder=clip needs the transformers package: pip install 'ddpmlab[text]' "
            "(or pip install 'transformers>=4.40')"
        ) from e
    return transformers


def check_clip_folder(path) -> Path:
    """The folder at ``path`` if it holds a CLIP text model and its tokenizer in safetensors; else a ConfigError that
    names what is missing."""
    if path is None or str(path) in ("", "???"):
        raise ConfigError("text_encoder=clip needs text_encoder.path=<a folder holding " + FOLDER_LAYOUT + ">")
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"text_encoder.path={path} is not a folder; it must hold {FOLDER_LAYOUT}")
    has = lambda *names: all((folder / n).is_file() for n in names)
    if not has("config.json"):
        raise ConfigError(f"the CLIP folder {folder} has no config.json; it must hold {FOLDER_LAYOUT}")
    if not (has("model.safetensors") or has("model.safetensors.index.json")):
        if has("pytorch_model.bin") or has("pytorch_model.bin.index.json"):
            raise ConfigError(
                f"the CLIP folder {folder} holds only pytorch_model.bin, a pickle that can run code when read; "
                f"ddpmlab reads safetensors only: {CONVERT}"
            )
        raise ConfigError(f"the CLIP folder {folder} has no model.safetensors; it must hold {FOLDER_LAYOUT}")
    if not (has("tokenizer.json") or has("vocab.json", "merges.txt")):
        raise ConfigError(
            f"the CLIP folder {folder} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); save it "
            "there with CLIPTokenizer.from_pretrained(<the model>).save_pretrained(dir)"
        )
    return folder


def _text_config(path) -> dict:
    """config.json's text part, read as JSON only: a CLIPTextModel's own, or ``text_config`` of a full CLIPModel."""
    folder = check_clip_folder(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {folder / 'config.json'} as JSON: {e}") from e
    kind = config.get("model_type")
    if kind == "clip":
        config = config.get("text_config") or {}
    elif kind != "clip_text_model":
        raise ConfigError(
            f"{folder / 'config.json'} describes a {kind!r} model, not a CLIP text model (model_type clip_text_model "
            "or clip)"
        )
    return config


def clip_hidden_size(path) -> int:
    """The width of the CLIP text model's output (``hidden_size``; 768 for ViT-L/14), from config.json alone."""
    config = _text_config(path)
    if "hidden_size" not in config:
        raise ConfigError(f"{Path(str(path)) / 'config.json'} gives no hidden_size for the CLIP text model")
    return int(config["hidden_size"])


def load_clip_text_model(path) -> nn.Module:
    """``CLIPTextModel`` from the folder: offline, safetensors only, no remote code. With ``use_safetensors=True``
    transformers refuses a folder that offers only a pickle rather than falling back to it. A full CLIPModel's
    folder loads too (its vision half is left unread); a weight the text model lacks is refused, where transformers
    would only warn and start it from random numbers."""
    folder = check_clip_folder(path)
    transformers = _transformers()
    logging = transformers.utils.logging
    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    # Quiet while loading: its "Loading weights" bar and its report of the unread vision half would cut into
    # ddpmlab's own console lines; what matters in the report is checked below.
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        model, info = transformers.CLIPTextModel.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, output_loading_info=True
        )
    except OSError as e:
        raise ConfigError(f"cannot read the CLIP text model in {folder}: {str(e).splitlines()[0]}") from e
    except RuntimeError as e:  # shapes that disagree with config.json
        raise ConfigError(
            f"the weights in {folder / 'model.safetensors'} do not fit its config.json (tensor shapes differ); save "
            "the model there with save_pretrained, which writes both"
        ) from e
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ConfigError(
            f"{folder / 'model.safetensors'} lacks {len(missing)} weights of the CLIP text model its config.json "
            f"describes ({', '.join(missing[:2])}{', ...' if len(missing) > 2 else ''}); save the model there with "
            "save_pretrained, which writes both"
        )
    return model


def load_clip_tokenizer(path):
    """CLIP's BPE tokenizer from the folder, offline. The Rust-backed class where the installed transformers has two
    (``CLIPTokenizerFast`` before version 5), the concrete CLIP class never ``AutoTokenizer`` (no code from the
    folder)."""
    folder = check_clip_folder(path)
    transformers = _transformers()
    cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the CLIP tokenizer in {folder}: {str(e).splitlines()[0]}") from e


class CLIPCaptionTokenizer:
    """Captions -> (tokens [B,L] long, token_mask [B,L] bool), CLIP's way: <|startoftext|> caption <|endoftext|>,
    padded to ``max_length`` with the tokenizer's own pad token; ``token_mask`` is True on BOS..EOS.

    CLIP's BPE works on bytes, so no word is unknown; a caption longer than the context is refused rather than cut
    (CLIP's own preprocessing truncates silently, which would condition on a different caption than the one asked)."""

    def __init__(self, hf_tokenizer, max_length: int):
        self.hf = hf_tokenizer
        self.max_length = int(max_length)

    def __call__(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ConfigError("captions are a list of strings")
        # verbose=False: its own warning on a too-long caption would come before the error below
        ids = self.hf(list(captions), add_special_tokens=True, verbose=False)["input_ids"] if captions else []
        for caption, seq in zip(captions, ids, strict=True):
            if len(seq) > self.max_length:
                raise ConfigError(
                    f"the caption {caption!r} is {len(seq)} CLIP tokens long (with its start and end tokens), longer "
                    f"than the context length {self.max_length}; shorten it"
                )
        pad = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id
        tokens = torch.full((len(ids), self.max_length), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), self.max_length), dtype=torch.bool)
        for i, seq in enumerate(ids):
            tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = True
        return tokens, mask


class CLIPTextEncoder(nn.Module):
    """A frozen CLIP text Transformer as the context of cross-attention: ``forward(tokens, token_mask) ->
    (context [B,L,dim], context_mask [B,L])``.

    ``layer``: ``last`` (Stable Diffusion 1.x: the final layer, after the final LayerNorm) or ``penultimate``
    (Stable Diffusion 2.x and "CLIP skip": the layer before, through the same final LayerNorm)."""

    def __init__(self, path: str, max_length: int | None = None, layer: str = "last"):
        super().__init__()
        if layer not in LAYERS:
            raise ConfigError(f"text_encoder.layer={layer} is not one of {', '.join(LAYERS)}")
        self.model = load_clip_text_model(path)
        self.model.requires_grad_(False)
        self.layer = layer
        self.dim = int(self.model.config.hidden_size)
        positions = int(self.model.config.max_position_embeddings)
        max_length = positions if max_length is None else int(max_length)
        if not 2 <= max_length <= positions:
            raise ConfigError(
                f"text_encoder.max_length={max_length} must lie between 2 (the start and end tokens) and the CLIP "
                f"model's {positions} positions"
            )
        self.tokenizer = CLIPCaptionTokenizer(load_clip_tokenizer(path), max_length)
        # Classifier-free guidance's null is the empty caption, and for CLIP that is the encoding of "" (BOS, EOS),
        # as Stable Diffusion's unconditional embedding is CLIP("") (a Cond's null only clears token_mask).
        null_tokens, null_mask = self.tokenizer([""])
        self.register_buffer("null_tokens", null_tokens[0], persistent=False)
        self.register_buffer("null_mask", null_mask[0], persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        # Frozen and in eval mode always: a parent's .train() must not switch CLIP's dropout on.
        return super().train(False)

    @torch.no_grad()
    def forward(self, tokens: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
        length = tokens.shape[1]
        if not 2 <= length <= self.null_tokens.shape[0]:
            raise ValueError(
                f"token sequences of length {length}; this CLIP encoder takes 2..{self.tokenizer.max_length}"
            )
        empty = ~token_mask.any(dim=1, keepdim=True)  # the null rows: the empty caption
        tokens = torch.where(empty, self.null_tokens[:length], tokens)
        token_mask = torch.where(empty, self.null_mask[:length], token_mask)
        # No attention mask into CLIP, as Stable Diffusion: its causal attention already keeps the padding out of the
        # states of BOS..EOS. The context mask keeps the padding out of cross-attention, where Stable Diffusion
        # attends to all 77 positions. Past EOS each state sees only BOS..EOS and padding, so it holds nothing about
        # the caption that EOS's own state (CLIP's pooled output) does not; masking it loses no information, keeps
        # the context independent of max_length, and the empty caption still has its two positions.
        out = self.model(input_ids=tokens, output_hidden_states=self.layer != "last")
        if self.layer == "last":
            context = out.last_hidden_state
        else:
            # the final LayerNorm: CLIPTextModel's own from transformers 5, its text_model's before
            final_norm = getattr(self.model, "text_model", self.model).final_layer_norm
            context = final_norm(out.hidden_states[-2])
        return context, token_mask
