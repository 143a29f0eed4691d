"""`--init-from`: a Hugging Face model (hub id or folder), a pocketlm run or checkpoint, or a nanoGPT ckpt.pt.

Each becomes a `Start`: the model in the loop's interface (pocketlm's GPT, or `hf.HFModel` for any other
architecture) and its tokenizer as a `transformers` fast tokenizer. Then `align_vocab` makes the model's
vocabulary agree with the dataset's (refusing a different tokenizer), and `add_tokens` grows the embeddings
for new special tokens, each new row the mean of the existing ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pocketlm import checkpoint as ckpt
from pocketlm.errors import PocketLMError
from pocketlm.finetune import hf as hflib
from pocketlm.model import GPT, GPTConfig

NANOGPT = "nanogpt:"


@dataclass
class Start:
    model: nn.Module  # GPT or hf.HFModel
    tokenizer: Any  # transformers PreTrainedTokenizerFast, or None (a nanoGPT checkpoint carries none)
    kind: str  # "pocketlm", "hf" or "nanogpt"
    source: str

    @property
    def arch(self) -> str:
        return "pocketlm" if isinstance(self.model, GPT) else self.model.model_type


def load(spec: str, device: str | torch.device = "cpu") -> Start:
    if spec.startswith(NANOGPT):
        return Start(load_nanogpt(Path(spec[len(NANOGPT):])).to(device), None, "nanogpt", spec)
    p = Path(spec)
    if p.exists():
        folder = ckpt.resolve(p)
        if not (folder / "config.json").is_file():
            raise PocketLMError(f"{spec} is neither a run folder nor a model folder (no config.json)")
        if ckpt.is_pocketlm(folder):
            from transformers import AutoTokenizer

            model, _ = ckpt.load_model(folder, device)
            return Start(model.train(), AutoTokenizer.from_pretrained(str(folder)), "pocketlm", str(folder))
        spec = str(folder)
    model, tok = hflib.load(spec, device)
    return Start(model.train(), tok, "hf", spec)


def load_nanogpt(path: Path) -> GPT:
    """nanoGPT's ckpt.pt ({"model": state, "model_args": {...}}) -> pocketlm's GPT (the same names and layout)."""
    if not path.is_file():
        raise PocketLMError(f"no nanoGPT checkpoint at {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise PocketLMError(f"{path} cannot be read as a nanoGPT checkpoint with weights_only=True: "
                            f"{str(e).splitlines()[0][:160]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or not isinstance(raw.get("model_args"), dict):
        raise PocketLMError(f"{path} is not a nanoGPT checkpoint (needs 'model' and 'model_args')")
    args = raw["model_args"]
    try:
        cfg = GPTConfig(vocab_size=int(args["vocab_size"]), block_size=int(args["block_size"]),
                        n_layer=int(args["n_layer"]), n_head=int(args["n_head"]), n_embd=int(args["n_embd"]),
                        dropout=float(args.get("dropout", 0.0)), bias=bool(args.get("bias", True)))
    except (KeyError, TypeError, ValueError):
        raise PocketLMError(f"{path}: model_args lacks vocab_size, block_size, n_layer, n_head or n_embd") from None
    state = {}
    for k, v in raw["model"].items():
        k = k.replace("_orig_mod.", "")  # saved from a torch.compile'd model
        if k.endswith(".attn.bias"):
            continue  # the causal-mask buffer of nanoGPT's non-flash attention
        state[k] = v.float()
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    model = GPT(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise PocketLMError(f"{path}: the weights do not match its model_args: {str(e).splitlines()[0][:200]}") from None
    return model


# ---- vocabulary ----------------------------------------------------------------------------------------

def vocab_of(tokenizer: Any) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


def align_vocab(start: Start, data_vocab: dict[str, int], data_specials: list[str], where: str) -> list[str]:
    """Check the dataset's tokenizer is the model's; its extra special tokens join the model. Returns them."""
    if start.tokenizer is None:  # nanoGPT: no tokenizer to compare; the ids must fit the embeddings
        need = max(data_vocab.values()) + 1
        if need > start.model.config.vocab_size:
            raise PocketLMError(f"{where} has {need} token ids but the nanoGPT model has {start.model.config.vocab_size} "
                                "embeddings: prepare the data with the tokenizer the model was trained with")
        return []
    model_vocab = vocab_of(start.tokenizer)
    for token, i in sorted(model_vocab.items(), key=lambda kv: kv[1]):
        if data_vocab.get(token) != i:
            there = data_vocab.get(token)
            raise PocketLMError(
                f"{where} was prepared with a different tokenizer than {start.source} (token {token!r} is id "
                f"{there} there, {i} in the model): prepare it again with --tokenizer set to the model's folder")
    extra = sorted((t for t in data_vocab if t not in model_vocab), key=data_vocab.get)
    unknown = [t for t in extra if t not in data_specials]
    if unknown:
        raise PocketLMError(f"{where}'s tokenizer has {len(unknown)} ordinary tokens the model lacks (e.g. "
                            f"{unknown[0]!r}): prepare it again with --tokenizer set to the model's folder")
    add_tokens(start, extra)
    for t in extra:
        if start.tokenizer.convert_tokens_to_ids(t) != data_vocab[t]:
            raise PocketLMError(f"special token {t!r} gets id {start.tokenizer.convert_tokens_to_ids(t)} in the model "
                                f"but {data_vocab[t]} in {where}: prepare the data from the model's tokenizer")
    return extra


def add_tokens(start: Start, tokens: list[str]) -> list[int]:
    """Add special tokens to the tokenizer and rows to the embeddings (each the mean of the existing rows)."""
    tokens = [t for t in dict.fromkeys(tokens) if t]
    if not tokens:
        return []
    if start.tokenizer is None:
        raise PocketLMError("a nanoGPT checkpoint has no tokenizer to add special tokens to; prepare the data with "
                            "them and pass its tokenizer through the dataset")
    before = len(start.tokenizer)
    start.tokenizer.add_tokens(tokens, special_tokens=True)
    new_ids = [start.tokenizer.convert_tokens_to_ids(t) for t in tokens]
    new_ids = [i for i in new_ids if i >= before]
    if new_ids:
        resize_embeddings(start.model, len(start.tokenizer), new_ids, mean_of=before)
    return new_ids


@torch.no_grad()
def resize_embeddings(model: nn.Module, n: int, new_ids: list[int], mean_of: int) -> None:
    """Grow the (input and output) embeddings to at least n rows; rows new_ids = mean of rows [0, mean_of)."""
    if isinstance(model, GPT):
        wte = model.transformer.wte.weight
        rows = max(n, wte.shape[0])
        if rows > wte.shape[0]:
            grown = nn.Embedding(rows, wte.shape[1], device=wte.device, dtype=wte.dtype)
            grown.weight[:wte.shape[0]] = wte
            model.transformer.wte = grown
            model.lm_head = nn.Linear(wte.shape[1], rows, bias=False, device=wte.device, dtype=wte.dtype)
            model.lm_head.weight = grown.weight  # tied, as always in pocketlm's GPT
            model.config.vocab_size = rows
        emb = model.transformer.wte.weight
        emb[new_ids] = emb[:mean_of].mean(0)
        return
    hf = model.hf
    if n > hf.get_input_embeddings().weight.shape[0]:
        hf.resize_token_embeddings(n, mean_resizing=False)
        model.config.vocab_size = n
    emb_in = hf.get_input_embeddings().weight
    emb_in[new_ids] = emb_in[:mean_of].mean(0)
    out = hf.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != emb_in.data_ptr():
        out.weight[new_ids] = out.weight[:mean_of].mean(0)
        if getattr(out, "bias", None) is not None:
            out.bias[new_ids] = out.bias[:mean_of].mean()
