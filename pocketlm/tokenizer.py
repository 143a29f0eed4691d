"""Tokenizers, all stored as a Hugging Face `tokenizer.json` (+ tokenizer_config.json).

Char-level: a WordLevel vocabulary over the corpus's exact character set, one token per character.
Byte-level BPE: trained with the `tokenizers` library (GPT-2's scheme, any vocabulary size). Both are saved
through `transformers.PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained(folder)` loads what we
train, and both round-trip: decode(encode(text)) == text (char-level: for characters it has seen).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from pocketlm.errors import PocketLMError

UNK = "<|unk|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
KINDS = ("char", "bpe")
CHAR_PATTERN = r"[\s\S]"  # one token per character, newlines included


class Tok:
    """A loaded tokenizer: thin over `tokenizers.Tokenizer`, with the end-of-text id at hand."""

    def __init__(self, tk: Tokenizer, eot_token: str | None) -> None:
        self.tk = tk
        self.eot_token = eot_token
        self.eot_id = tk.token_to_id(eot_token) if eot_token else None
        self.specials = [t.content for t in tk.get_added_tokens_decoder().values()]
        self.lut = _char_lut(tk)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]] | list[np.ndarray]:
        if self.lut is not None and not any(sp in t for t in texts for sp in self.specials):
            return [self._encode_chars(t) for t in texts]
        # parallel in Rust (TOKENIZERS_PARALLELISM); the GIL is released for the whole batch
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def _encode_chars(self, text: str) -> np.ndarray:
        """Char-level fast path: code points through a lookup table (~50x the library's regex split)."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        lut, unk = self.lut
        inside = cps < len(lut)
        return np.where(inside, lut[np.minimum(cps, len(lut) - 1)], unk)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)


def _char_lut(tk: Tokenizer) -> tuple[np.ndarray, int] | None:
    """A code point -> id table when `tk` is one of our char-level tokenizers, else None."""
    model = json.loads(tk.to_str())
    pre = model.get("pre_tokenizer") or {}
    if model["model"]["type"] != "WordLevel" or model.get("normalizer") or pre.get("type") != "Split" \
            or pre.get("pattern", {}).get("Regex") != CHAR_PATTERN:
        return None
    vocab = {k: v for k, v in model["model"]["vocab"].items() if len(k) == 1}
    unk = model["model"]["vocab"][model["model"]["unk_token"]]
    lut = np.full(max(ord(c) for c in vocab) + 1, unk, dtype=np.int64)
    for c, i in vocab.items():
        lut[ord(c)] = i
    return lut, unk


def train_char(texts: Iterable[str], eot_token: str) -> Tokenizer:
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    if not chars:
        raise PocketLMError("no text to build a character vocabulary from: the input is empty")
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    vocab[UNK] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # every character is its own token; [\s\S] matches newlines too
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_PATTERN), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([eot_token])
    return tk


def train_bpe(texts: Iterator[str], vocab_size: int, eot_token: str) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise PocketLMError(
            f"BPE vocab_size {vocab_size} is below the 256-byte alphabet plus special tokens; "
            f"use --vocab-size {len(alphabet) + 1} or more"
        )
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eot_token], initial_alphabet=alphabet, show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return tk


def save(tk: Tokenizer, folder: Path, eot_token: str, model_max_length: int | None = None) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json the way transformers does."""
    from transformers import PreTrainedTokenizerFast

    specials = {"eos_token": eot_token, "bos_token": eot_token}
    if tk.token_to_id(UNK) is not None:
        specials["unk_token"] = UNK
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False,
        **specials,
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    set_max_length(folder, model_max_length)


def set_max_length(folder: Path, model_max_length: int | None) -> None:
    """Record the context length, and name the class every transformers version (and transformers.js) knows."""
    file = folder / "tokenizer_config.json"
    cfg = json.loads(file.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if model_max_length:
        cfg["model_max_length"] = model_max_length
    else:
        cfg.pop("model_max_length", None)
    file.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def copy_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def load(path: str | Path) -> Tok:
    """A folder holding tokenizer.json (a dataset, a checkpoint, a run's best/) or a tokenizer.json file."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise PocketLMError(f"no tokenizer.json in {path}: point at a dataset, checkpoint or tokenizer folder")
    try:
        tk = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust parser's message names the problem
        raise PocketLMError(f"{file} is not a valid tokenizer.json: {e}") from None
    eot = None
    cfg_file = file.parent / "tokenizer_config.json"
    if cfg_file.is_file():
        eot = json.loads(cfg_file.read_text(encoding="utf-8")).get("eos_token")
        if isinstance(eot, dict):  # older transformers wrote AddedToken dicts
            eot = eot.get("content")
    return Tok(tk, eot)
