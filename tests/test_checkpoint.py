import json
from pathlib import Path

import pytest
import torch

from pocketlm import atomic
from pocketlm import checkpoint as ckpt
from pocketlm import tokenizer as toklib
from pocketlm.model import GPT, GPTConfig


def save_tiny(folder: Path, bias: bool = True, vocab_text: str = "hello world, ROMEO:\n") -> GPT:
    tk = toklib.train_char([vocab_text], "<|endoftext|>")
    tokdir = folder.parent / "tok"
    toklib.save(tk, tokdir, "<|endoftext|>")
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tk.get_vocab_size(), block_size=32, n_layer=2, n_head=2, n_embd=16, bias=bias))
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mistake shows
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ckpt.save_model(model, folder, tokdir, tk.token_to_id("<|endoftext|>"))
    return model.eval()


@pytest.mark.parametrize("bias", [True, False])
def test_transformers_loads_with_identical_logits(tmp_path: Path, bias: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "ckpt"
    model = save_tiny(folder, bias)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    ours = toklib.load(folder)
    text = "hello ROMEO:\nworld"
    assert hf_tok.encode(text) == ours.encode(text)
    assert hf_tok.decode(ours.encode(text)) == text
    x = torch.tensor([ours.encode(text)])
    with torch.no_grad():
        diff = (model(x)[0] - hf(x).logits).abs().max().item()
    assert diff <= 1e-5


def test_our_loader_round_trips(tmp_path: Path) -> None:
    model = save_tiny(tmp_path / "ckpt", bias=False)
    loaded, folder = ckpt.load_model(tmp_path / "ckpt")
    assert folder == tmp_path / "ckpt"
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["pocketlm"]["bias"] is False


def test_replace_dir_and_recover(tmp_path: Path) -> None:
    dst = tmp_path / "last"
    for version in ("v1", "v2"):
        tmp = tmp_path / ".last.tmp"
        tmp.mkdir()
        (tmp / "f").write_text(version)
        atomic.replace_dir(tmp, dst)
        assert (dst / "f").read_text() == version
    # a crash between the two renames: only .last.old exists -> recover brings it back
    dst.rename(tmp_path / ".last.old")
    atomic.recover(dst)
    assert (dst / "f").read_text() == "v2" and not (tmp_path / ".last.old").exists()


def test_trainer_state_round_trip(tmp_path: Path) -> None:
    from pocketlm import parallel

    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    rng = {"torch": torch.get_rng_state()}
    ckpt.save_trainer_state(tmp_path, {"step": 3, "tokens": 12}, parallel.full_optimizer_state(model, opt), rng)
    meta, opt_state, rng2 = ckpt.load_trainer_state(tmp_path)
    assert meta["step"] == 3 and torch.equal(rng2["torch"], rng["torch"])
    assert "transformer.wte.weight" in opt_state["state"]  # keyed by parameter name, not position
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    parallel.load_full_state(model, opt2, model.state_dict(), opt_state)
    for p in model.parameters():
        a, b = opt.state[p], opt2.state[p]
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_no_pickle_in_checkpoints(tmp_path: Path) -> None:
    save_tiny(tmp_path / "ckpt")
    names = {p.suffix for p in (tmp_path / "ckpt").iterdir()}
    assert names <= {".json", ".safetensors"}
