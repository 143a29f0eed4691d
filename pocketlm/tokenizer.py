"""Tokenizers, all stored as a Hugging Face `tokenizer.json` (+ tokenizer_config.json).

Kinds we train:
- char: the corpus's exact character set, one token per character. Unknown characters become `<|unk|>`
  (`unknown="unk"`) or their UTF-8 bytes (`unknown="bytes"`, BPE without merges and with byte fallback), so
  the latter round-trips any text.
- bpe: byte-level BPE trained with the `tokenizers` library, any vocabulary size, with a choice of
  pre-tokenizer (where words may split): `byte-level` (GPT-2's regex), `metaspace` (before each space, as
  SentencePiece does), `metaspace-punctuation` (also around each punctuation mark), `whitespace-punctuation`
  (whitespace runs and punctuation marks are pieces of their own). Tokens are made of bytes, shown in GPT-2's
  alphabet (a space is `Ġ`), so decode(encode(text)) == text for any Unicode text, `▁` included.
Kinds we load: any folder with tokenizer.json (a dataset, checkpoint, pretrained model), a GPT-2 style
`vocab.json`+`merges.txt` or OpenAI `encoder.json`+`vocab.bpe`, a Hugging Face id (`gpt2`), and GPT-2 through
tiktoken's cached files. Special tokens (end-of-text, padding, start tokens) are added tokens: never split,
and `encode_batch(..., ordinary=True)` never produces them from text.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from pocketlm.errors import PocketLMError

UNK = "<|unk|>"
EOT = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
KINDS = ("char", "bpe")  # trained; anything else names a tokenizer to load
CHAR_PATTERN = r"[\s\S]"  # one token per character, newlines included
UNKNOWN_POLICIES = ("unk", "bytes")
# tokenizers' Punctuation pre-tokenizer: Unicode punctuation and every ASCII punctuation mark or symbol
PUNCT = r"\p{P}\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7e"
# every pattern matches all of any text (no gaps), so pieces concatenate back to the text
SPLIT_PATTERNS = {
    "metaspace": r" ?[^ ]+| ",
    "metaspace-punctuation": rf" ?[^ {PUNCT}]+|[{PUNCT}]| ",
    "whitespace-punctuation": rf"\s+|[{PUNCT}]|[^\s{PUNCT}]+",
}
PRE_TOKENIZERS = ("byte-level", *SPLIT_PATTERNS)


class Tok:
    """A loaded tokenizer: thin over `tokenizers.Tokenizer`, with the special tokens at hand and fast paths."""

    def __init__(self, tk: Tokenizer, eot_token: str | None, pad_token: str | None = None) -> None:
        self.tk = tk
        self.eot_token = eot_token
        self.eot_id = tk.token_to_id(eot_token) if eot_token else None
        self.pad_token = pad_token
        self.specials = [t.content for t in tk.get_added_tokens_decoder().values() if t.special]
        self.unk_id = _unk_id(tk)
        self.lut = _char_lut(tk)
        self._words = None  # the word-cache encoder, built on first use
        self._ordinary: Tokenizer | None = None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Encode as the library does: special-token strings in `text` become their special ids."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], ordinary: bool = False) -> list[list[int]] | list[np.ndarray]:
        """Encode many texts; the same ids as the library. `ordinary`: special-token strings are plain text."""
        has_special = not ordinary and self.has_special(texts)
        if self.lut is not None and not has_special:
            fast = [self._encode_chars(t) for t in texts]
            if all(ids is not None for ids in fast):
                return fast
        if not has_special and self.words is not None:
            return self.words.encode_batch(texts, self._library(ordinary=True))
        # parallel in Rust (TOKENIZERS_PARALLELISM); the GIL is released for the whole batch
        return [e.ids for e in self._library(ordinary).encode_batch(texts, add_special_tokens=False)]

    def has_special(self, texts: list[str]) -> bool:
        return any(sp in t for t in texts for sp in self.specials)

    @property
    def words(self):
        """The word-cache encoder when this is a byte-level BPE it reproduces exactly, else None."""
        if self._words is None:
            from pocketlm.fastbpe import WordCacheEncoder

            self._words = WordCacheEncoder.for_tokenizer(self.tk) or False
        return self._words or None

    def _library(self, ordinary: bool) -> Tokenizer:
        if not ordinary or not self.specials:
            return self.tk
        if self._ordinary is None:  # the same tokenizer without its added-token matching
            model = json.loads(self.tk.to_str())
            model["added_tokens"] = [t for t in model.get("added_tokens", []) if not t["special"]]
            self._ordinary = Tokenizer.from_str(json.dumps(model))
        return self._ordinary

    def _encode_chars(self, text: str) -> np.ndarray | None:
        """Char-level fast path: code points through a lookup table (~50x the library's regex split)."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        lut, unk, fallback = self.lut
        ids = np.where(cps < len(lut), lut[np.minimum(cps, len(lut) - 1)], unk)
        if fallback and (ids == unk).any():
            return None  # unknown characters become bytes: the library does that part
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _unk_id(tk: Tokenizer) -> int | None:
    model = json.loads(tk.to_str())["model"]
    return tk.token_to_id(model["unk_token"]) if model.get("unk_token") else None


def _char_lut(tk: Tokenizer) -> tuple[np.ndarray, int, bool] | None:
    """(code point -> id table, unknown id, byte fallback) when `tk` is one of our char-level kinds."""
    model = json.loads(tk.to_str())
    pre = model.get("pre_tokenizer") or {}
    m = model["model"]
    if model.get("normalizer") or pre.get("type") != "Split" or pre.get("pattern", {}).get("Regex") != CHAR_PATTERN:
        return None
    if m["type"] == "WordLevel":
        unk, fallback = m["vocab"][m["unk_token"]], False
    elif m["type"] == "BPE" and m.get("byte_fallback") and not m["merges"]:
        unk, fallback = -1, True
    else:
        return None
    vocab = {k: v for k, v in m["vocab"].items() if len(k) == 1}
    lut = np.full(max(map(ord, vocab), default=0) + 1, unk, dtype=np.int64)
    for c, i in vocab.items():
        lut[ord(c)] = i
    return lut, unk, fallback


def check_specials(specials: Sequence[str]) -> list[str]:
    """Special tokens, deduplicated in order; each must be a non-empty string without whitespace at its ends."""
    out: list[str] = []
    for s in specials:
        if not s or s != s.strip():
            raise PocketLMError(f"special token {s!r} is empty or has spaces around it: use e.g. <|start|>")
        if s not in out:
            out.append(s)
    return out


def train_char(texts: Iterable[str], eot_token: str = EOT, unknown: str = "unk",
               specials: Sequence[str] = ()) -> Tokenizer:
    """One token per character of `texts` (sorted), plus the special tokens and the unknown policy."""
    if unknown not in UNKNOWN_POLICIES:
        raise PocketLMError(f"unknown-character policy {unknown!r}: use one of {', '.join(UNKNOWN_POLICIES)}")
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    if not chars:
        raise PocketLMError("no text to build a character vocabulary from: the input is empty")
    if unknown == "unk":
        vocab = {c: i for i, c in enumerate(sorted(chars))}
        vocab[UNK] = len(vocab)
        tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tk.decoder = decoders.Fuse()
    else:  # the 256 byte tokens first (as Llama's vocabulary), then the characters; no merges
        vocab = {f"<0x{b:02X}>": b for b in range(256)}
        for c in sorted(chars):
            vocab.setdefault(c, len(vocab))
        tk = Tokenizer(models.BPE(vocab, [], byte_fallback=True))
        tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    # every character is its own token; [\s\S] matches newlines too
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_PATTERN), behavior="isolated")
    tk.add_special_tokens(check_specials([eot_token, *specials]))
    return tk


def bpe_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre == "byte-level":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre not in SPLIT_PATTERNS:
        raise PocketLMError(f"unknown pre-tokenizer {pre!r}: use one of {', '.join(PRE_TOKENIZERS)}")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERNS[pre]), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def train_bpe(texts: Iterator[str], vocab_size: int, eot_token: str = EOT, pre: str = "byte-level",
              specials: Sequence[str] = ()) -> Tokenizer:
    """Byte-level BPE of `vocab_size` tokens in all (special tokens included).

    The alphabet is all 256 bytes when they fit with room for merges, so any text can be encoded; a smaller
    vocabulary (e.g. 256) takes the bytes of the training text only and maps other bytes to `<|unk|>`.
    """
    specials = check_specials([eot_token, *specials])
    pre_tok = bpe_pre_tokenizer(pre)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    full = vocab_size >= len(alphabet) + len(specials) + 1
    tk = Tokenizer(models.BPE() if full else models.BPE(unk_token=UNK))
    tk.pre_tokenizer = pre_tok
    tk.decoder = decoders.ByteLevel()
    all_specials = specials if full else [*specials, UNK]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=all_specials,
                                  initial_alphabet=alphabet if full else [], show_progress=False)
    seen = [False]

    def counted() -> Iterator[str]:
        for t in texts:
            seen[0] = seen[0] or bool(t)
            yield t
    tk.train_from_iterator(counted(), trainer=trainer)
    if not seen[0]:
        raise PocketLMError("no text to train a tokenizer on: the corpus is empty")
    if tk.get_vocab_size(with_added_tokens=True) > vocab_size:
        n_alpha = tk.get_vocab_size(with_added_tokens=True) - len(all_specials)
        raise PocketLMError(f"vocab size {vocab_size} is below the alphabet: the text has {n_alpha} distinct bytes "
                            f"plus {len(all_specials)} special tokens; use --vocab-size "
                            f"{n_alpha + len(all_specials) + 1} or more")
    return tk


def save(tk: Tokenizer, folder: Path, eot_token: str | None, model_max_length: int | None = None,
         pad_token: str | None = None) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json the way transformers does.

    Padding uses `pad_token` (default: the end-of-text token, as GPT-2 does); other added special tokens are
    listed as extra special tokens so that transformers keeps them whole.
    """
    from transformers import PreTrainedTokenizerFast

    specials: dict = {}
    if eot_token:
        specials.update(eos_token=eot_token, bos_token=eot_token, pad_token=pad_token or eot_token)
    if tk.token_to_id(UNK) is not None:
        specials["unk_token"] = UNK
    named = set(specials.values())
    extra = [t.content for t in tk.get_added_tokens_decoder().values() if t.special and t.content not in named]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False,
        **specials,
    )
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    set_max_length(folder, model_max_length)


def set_max_length(folder: Path, model_max_length: int | None) -> None:
    """Record the context length, and name the class every transformers version (and transformers.js) knows."""
    file = folder / "tokenizer_config.json"
    cfg = json.loads(file.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_input_names"] = ["input_ids", "attention_mask"]
    if model_max_length:
        cfg["model_max_length"] = model_max_length
    else:
        cfg.pop("model_max_length", None)
    file.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def copy_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def _token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value  # older transformers wrote AddedToken dicts


def load(path: str | Path) -> Tok:
    """A tokenizer from a folder (dataset, checkpoint, tokenizer or model folder), a tokenizer.json, a GPT-2
    vocab.json+merges.txt or encoder.json+vocab.bpe folder, or a Hugging Face id such as `gpt2`."""
    p = Path(path)
    if p.is_file():
        return _from_file(p)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return _from_file(p / "tokenizer.json")
        for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (p / vocab).is_file() and (p / merges).is_file():
                return Tok(gpt2_from_files(p / vocab, p / merges), EOT)
        if any((p / n).is_file() for n in ("tokenizer_config.json", "tokenizer.model", "vocab.txt")):
            return _from_transformers(str(p))
        raise PocketLMError(f"no tokenizer.json in {path} (nor vocab.json+merges.txt, encoder.json+vocab.bpe or a "
                            "transformers tokenizer): point at a dataset, checkpoint, tokenizer or model folder")
    if str(path) in ("char", "bpe"):
        raise PocketLMError(f"{path!r} is a kind to train, not a tokenizer to load: "
                            f"`pocketlm tokenizer train CORPUS --kind {path} --out FOLDER` first")
    if str(path) == "gpt2":
        tk = gpt2_from_tiktoken()
        if tk is not None:
            return Tok(tk, EOT)
    if p.is_absolute() or str(path).startswith((".", "~")) or len(p.parts) > 2:
        raise PocketLMError(f"{path} does not exist: give a tokenizer folder, a tokenizer.json or a Hugging Face id")
    return _from_transformers(str(path))


def _from_file(file: Path) -> Tok:
    try:
        tk = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust parser's message names the problem
        raise PocketLMError(f"{file} is not a valid tokenizer.json: {e}") from None
    eot = pad = None
    cfg_file = file.parent / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        eot, pad = _token_name(cfg.get("eos_token")), _token_name(cfg.get("pad_token"))
    return Tok(tk, eot, pad)


def _from_transformers(name: str) -> Tok:
    """Any pretrained model's tokenizer (a folder or a Hugging Face id), through its fast backend."""
    try:
        from transformers import AutoTokenizer

        try:  # the local cache first: offline, the hub is retried for about a minute
            fast = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:
            # only an `owner/name` id goes to the hub: a bare word is more likely a typo than a legacy id
            if "/" not in name or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
                raise
            print(f"looking up {name!r} on the Hugging Face hub...", file=sys.stderr)
            fast = AutoTokenizer.from_pretrained(name)
        tk = fast.backend_tokenizer
    except Exception as e:
        raise PocketLMError(f"could not load a tokenizer from {name!r} ({type(e).__name__}): give a folder with "
                            "tokenizer.json or vocab.json+merges.txt, or a Hugging Face id (owner/name) that is "
                            "cached or reachable") from None
    return Tok(tk, fast.eos_token, fast.pad_token)


def _gpt2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    tk = Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([EOT])
    return tk


def gpt2_from_files(vocab_file: Path, merges_file: Path) -> Tokenizer:
    """GPT-2's byte-level BPE from vocab.json+merges.txt (HF) or encoder.json+vocab.bpe (OpenAI): same content."""
    try:
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    except (OSError, ValueError) as e:
        raise PocketLMError(f"cannot read GPT-2 vocabulary files {vocab_file}, {merges_file}: {e}") from None
    if EOT not in vocab or any(len(m) != 2 for m in merges):
        raise PocketLMError(f"{vocab_file} / {merges_file} are not GPT-2 style vocabulary and merges files")
    return _gpt2_tokenizer(vocab, merges)


def gpt2_from_tiktoken() -> Tokenizer | None:
    """GPT-2 rebuilt from tiktoken's `gpt2` encoding when tiktoken can load it (cached files or network)."""
    try:
        import tiktoken

        enc = tiktoken.get_encoding("gpt2")
        ranks: dict[bytes, int] = enc._mergeable_ranks  # the only way tiktoken exposes its vocabulary
    except Exception:
        return None
    b2u = bytes_to_unicode()
    vocab = {"".join(b2u[b] for b in token): rank for token, rank in ranks.items()}
    vocab[EOT] = enc.eot_token
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:  # the merge that made a token: BPE on its bytes with the earlier ranks only
            a, b = _last_merge(token, ranks, rank)
            merges.append(("".join(b2u[x] for x in a), "".join(b2u[x] for x in b)))
    return _gpt2_tokenizer(vocab, merges)


def _last_merge(token: bytes, ranks: dict[bytes, int], limit: int) -> tuple[bytes, bytes]:
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], limit))
        if ranks.get(parts[best] + parts[best + 1], limit) >= limit:
            raise PocketLMError(f"tiktoken's ranks do not build {token!r} by merges: not a BPE vocabulary")
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (the byte-level alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}
