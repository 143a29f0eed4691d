"""Speed paths against their plain references: the one-token decode step against the module forward,
the Llama layout against transformers' LlamaForCausalLM, Muon and AdamW, compiled against eager."""

import json
from pathlib import Path

import pytest
import torch

from pocketlm import checkpoint as ckpt
from pocketlm.errors import ConfigError
from pocketlm.model import GPT, GPTConfig, KVCache

LLAMA = dict(pos_emb="rotary", norm="rmsnorm", mlp="swiglu")


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=37, block_size=24, n_layer=2, n_head=2, n_embd=16, **kw)).eval()
    with torch.no_grad():  # non-zero biases and norm gains, so a mapping that drops them is caught
        for name, p in m.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("kw", [dict(bias=True), dict(bias=False), dict(LLAMA, bias=False), dict(LLAMA, bias=True)],
                         ids=["gpt2-bias", "gpt2", "llama", "llama-bias"])
def test_decode_step_equals_module_forward(kw: dict) -> None:
    m = tiny(**kw)
    x = torch.randint(0, 37, (3, 20))
    full, _ = m(x)
    cache = KVCache(m.config, 3, 24, "cpu", torch.float32)
    m(x[:, :5], cache=cache)
    steps = [m.decode(x[:, t:t + 1], cache) for t in range(5, 20)]
    assert cache.pos == 20
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 5:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds block_size"):
        cache.pos = 24
        m.decode(x[:, :1], cache)


@pytest.mark.parametrize("kw", [dict(bias=True), dict(LLAMA, bias=False)], ids=["gpt2", "llama"])
def test_fixed_shape_decode_step_equals_the_plain_one(kw: dict) -> None:
    """`decode(at=)`, the step a CUDA graph captures: same logits and cache contents as the plain step, with
    stale keys beyond `at` masked out (the cache is filled with garbage first, as after a window refill)."""
    m = tiny(**kw)
    x = torch.randint(0, 37, (3, 20))
    plain, fixed = (KVCache(m.config, 3, 24, "cpu", torch.float32) for _ in range(2))
    fixed.k.normal_(), fixed.v.normal_()
    m(x[:, :5], cache=plain)
    m(x[:, :5], cache=fixed)
    at = torch.zeros(1, dtype=torch.long)
    for t in range(5, 20):
        want = m.decode(x[:, t:t + 1], plain)
        at.fill_(fixed.pos)
        got = m.decode(x[:, t:t + 1], fixed, at=at)
        assert fixed.pos == t  # the caller advances it
        fixed.pos += 1
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fixed.k[:, :, :, :20], plain.k[:, :, :, :20], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(bias=True), dict(LLAMA, bias=False)], ids=["gpt2", "llama"])
def test_stream_layout_keeps_values_and_logits(kw: dict) -> None:
    m = tiny(**kw)
    x = torch.randint(0, 37, (2, 20))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    full, _ = m(x)
    m.stream_layout()
    wte = m.transformer.wte.weight
    assert not wte.is_contiguous() and wte.t().is_contiguous() and m.lm_head.weight is wte  # still tied
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(m(x)[0], full, atol=1e-5, rtol=1e-5)
    cache = KVCache(m.config, 2, 24, "cpu", torch.float32)
    m(x[:, :5], cache=cache)
    plan = m.decode_plan()
    steps = [m.decode(x[:, t:t + 1], cache, plan) for t in range(5, 20)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 5:], atol=1e-5, rtol=1e-5)


def test_decodable_refuses_wrapped_layers() -> None:
    m = tiny()
    assert m.decodable()

    class Wrapped(torch.nn.Linear):  # a LoRA-style subclass with its own forward
        pass

    old = m.transformer.h[0].attn.c_attn
    m.transformer.h[0].attn.c_attn = Wrapped(old.in_features, old.out_features)
    assert not m.decodable()


@pytest.mark.parametrize("bias", [False, True])
def test_llama_layout_saves_as_hf_llama_with_identical_logits(tmp_path: Path, bias: bool) -> None:
    from transformers import AutoModelForCausalLM

    m = tiny(bias=bias, **LLAMA)
    ckpt.save_model(m, tmp_path, None, eot_id=0)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, 37, (2, 24))
    with torch.no_grad():
        ours, theirs = m(x)[0], hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    back, _ = ckpt.load_model(tmp_path)  # and the folder loads back into pocketlm unchanged
    assert back.config == m.config
    torch.testing.assert_close(back(x)[0], ours, atol=0, rtol=0)


def test_mixed_layouts_are_refused() -> None:
    from pocketlm import config

    with pytest.raises(ConfigError, match="no Hugging Face layout"):
        config.load(overrides={"model.pos_emb": "rotary"})
    cfg = config.load(overrides={"model.pos_emb": "rotary", "model.norm": "rmsnorm", "model.mlp": "swiglu"})
    assert cfg.model.mlp == "swiglu"


def test_engine_decode_path_and_batch_agree_with_naive_reference() -> None:
    from pocketlm.generate import Engine, SamplingParams, naive_generate

    for kw in (dict(bias=False), dict(LLAMA, bias=False)):
        m = tiny(**kw)
        engine = Engine(m, None)  # token ids in, token ids out: no tokenizer needed
        ids = [1, 2, 3]
        p = SamplingParams(max_new_tokens=21, temperature=0, stop_at_eot=False)
        want = naive_generate(m, ids, 21)
        fast = [t.tolist() for t in engine.steps(ids, p, n=3)]  # batched: the 3 greedy samples agree
        assert [row[0] for row in fast] == want and all(len(set(row)) == 1 for row in fast)
        engine.cuda_graphs = True  # the fixed-shape step a CUDA graph replays, run eagerly on CPU
        p_long = SamplingParams(max_new_tokens=3 * m.config.block_size, temperature=0, stop_at_eot=False)
        plain = [t.tolist() for t in engine.steps(ids, p_long, n=2)]  # windows fill and are refilled
        engine.cuda_graphs = False
        assert plain == [t.tolist() for t in engine.steps(ids, p_long, n=2)]
        assert [row[0] for row in plain[:21]] == want
        m.decodable = lambda: False  # the module path (what a LoRA-wrapped model runs)
        assert [int(t[0]) for t in engine.steps(ids, p)] == want


def test_a_failed_graph_capture_falls_back_to_the_plain_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from pocketlm import generate
    from pocketlm.generate import Engine, SamplingParams

    def refuse(*a: object) -> None:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(generate, "GraphStep", refuse)
    engine = Engine(tiny(bias=False), None)
    p = SamplingParams(max_new_tokens=20, temperature=0, stop_at_eot=False)
    want = [int(t[0]) for t in engine.steps([1, 2], p)]
    engine.cuda_graphs = True
    with pytest.warns(UserWarning, match="without CUDA graphs: capturing the decode step failed"):
        assert [int(t[0]) for t in engine.steps([1, 2], p)] == want
    assert engine.cuda_graphs is False  # not tried again for every generation


def test_adamw_equals_torch_fused_adamw_and_reloads_its_state() -> None:
    from pocketlm import optim

    def run(make, steps: int = 4) -> tuple[GPT, object]:
        m = tiny(bias=True).train()
        opt = make(optim.param_groups(m, 0.1))
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x = torch.randint(0, 37, (2, 12), generator=g)
            m(x, x)[1].backward()
            opt.step()
            opt.zero_grad()
        return m, opt

    ours, opt = run(lambda groups: optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95)))
    ref, _ = run(lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), fused=True))
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    # the state, saved and loaded into a fresh optimizer, continues as if uninterrupted
    fresh = optim.AdamW(optim.param_groups(ours, 0.1), lr=1e-2, betas=(0.9, 0.95))
    fresh.load_state_dict(opt.state_dict())
    assert all(torch.equal(fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"]) for p in ours.parameters())


def _losses(state) -> list[float]:
    return [r["train/loss"] for r in state.history if "train/loss" in r]


def test_muon_and_adamw_both_decrease_the_loss_and_muon_resumes_exactly(tmp_path: Path, char_data: Path) -> None:
    from pocketlm.train import Trainer, train
    from tests.conftest import tiny_config

    def cfg(name: str, opt: str):
        return tiny_config(char_data, tmp_path / name, **{"train.optimizer": opt, "train.muon_lr": 0.05})

    runs = {opt: train(cfg(opt, opt), verbose=False) for opt in ("adamw", "muon")}
    for opt, st in runs.items():
        losses = _losses(st)
        assert losses[-1] < losses[0] - 0.5, (opt, losses)
        assert all(r["mfu"] > 0 for r in st.history if "train/loss" in r)
    # Muon's momentum buffers travel in the checkpoint like AdamW's moments: a resumed run continues exactly
    trainer = Trainer(cfg("part", "muon"), verbose=False)

    class StopAt15:  # what Ctrl-C does: finish the step, save last/, return
        def on_log(self, step: int, record: dict) -> None:
            trainer.stop_requested = step >= 15

    trainer.callbacks.append(StopAt15())
    assert trainer.fit().step == 15
    rest = _losses(train(cfg("part", "muon"), resume=True, verbose=False))
    assert rest == _losses(runs["muon"])[-len(rest):] and len(rest) == 3


def test_time_budget_sizes_the_run_to_the_clock(tmp_path: Path, char_data: Path) -> None:
    from pocketlm import config
    from pocketlm.train import lr_at, train
    from tests.conftest import tiny_config

    assert [config.seconds(s) for s in ("90s", "10m", "2h", "1.5", "")] == [90, 600, 7200, 1.5, 0]
    with pytest.raises(ConfigError, match="duration"):
        config.load(overrides={"train.time_budget": "ten minutes"})
    t = config.TrainConfig(warmup_steps=0)
    assert lr_at(5, t, 0.0) == t.lr and lr_at(5, t, 1.0) == t.min_lr and lr_at(5, t, 0.5) < t.lr
    st = train(tiny_config(char_data, tmp_path / "run", **{
        "train.time_budget": "5s", "train.max_steps": 1, "train.eval_interval": 10**6, "train.warmup_steps": 0,
        "train.log_interval": 1}), verbose=False)
    wall = [r["wall_s"] for r in st.history if "wall_s" in r]
    assert st.step > 1 and 5.0 <= wall[-1] < 5.0 + 2.0  # max_steps does not apply; the clock stops it
    lrs = [r["lr"] for r in st.history if "lr" in r]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 1e-2  # the cosine follows the clock
    assert any("val/loss" in r for r in st.history)  # a final evaluation when the budget is spent


@pytest.mark.slow
def test_compiled_training_step_equals_eager() -> None:
    """`--train.compile` runs torch.compile (inductor): the same losses and gradients as eager, to float noise."""
    from pocketlm import config, optim

    def run(compiled: bool) -> tuple[list[float], list[torch.Tensor]]:
        m = tiny(bias=False).train()
        fwd = torch.compile(m) if compiled else m
        opt = optim.build(m, config.TrainConfig())
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            x = torch.randint(0, 37, (4, 24), generator=g)
            _, loss = fwd(x, x.roll(-1, dims=1))
            loss.backward()
            grads = [p.grad.clone() for p in m.parameters()]
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, grads

    (eager, g_eager), (compiled, g_compiled) = run(False), run(True)
    assert eager[-1] < eager[0]
    assert compiled == pytest.approx(eager, abs=1e-5)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_on_cpu_computes_what_fp32_does() -> None:
    """Under bf16 autocast on CPU the matmuls run in bf16 and attention in fp32 (CausalSelfAttention): the loss
    and every gradient match the fp32 step to bf16 precision, and Muon's bf16 Newton-Schulz matches fp32's."""
    from pocketlm import optim

    for kw in (dict(bias=True), dict(LLAMA, bias=False)):
        m = tiny(**kw).train()
        x = torch.randint(0, 37, (3, 24), generator=torch.Generator().manual_seed(2))
        fp32 = m(x, x)[1]
        fp32.backward()
        ref = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = m(x, x)
        loss.backward()
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
        assert loss.item() == pytest.approx(fp32.item(), rel=1e-2)
        for n, p in m.named_parameters():
            assert p.grad.dtype == torch.float32
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), ref[n].flatten(), dim=0)
            assert cos > 0.99, (kw, n, cos)
    g = torch.randn(4, 48, 16)
    low, high = optim.orthogonalize(g, dtype=torch.bfloat16), optim.orthogonalize(g, dtype=torch.float32)
    assert low.dtype == torch.float32 and (low - high).abs().max() < 0.05


def test_cpu_dtype_follows_the_width_and_the_measured_bf16_gain(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                char_data: Path) -> None:
    from pocketlm import device
    from pocketlm.train import Trainer, train
    from tests.conftest import tiny_config

    assert device.cpu_dtype(64) == (torch.float32, "float32: at 64 wide bf16 autocast's casts cost more than "
                                                   "its matmuls gain")
    # the rule on measured figures: a CPU with bf16 units (2.2x) and one that emulates them (0.25x)
    wide = {"model.n_embd": 128, "train.optimizer": "muon", "train.max_steps": 12, "train.eval_interval": 6}
    for gain, want in ((2.2, torch.bfloat16), (0.25, torch.float32)):
        bf16_gain(monkeypatch, gain)
        dtype, why = device.cpu_dtype(128)
        assert dtype == want and f"{gain:.1f}x fp32's" in why
        trainer = Trainer(tiny_config(char_data, tmp_path / str(gain), **wide), verbose=False)
        assert trainer.rt.dtype == want and f"{gain:.1f}x" in trainer.rt.reason
        # the optimizer is built after the decision: Muon's Newton-Schulz follows the run's dtype
        assert trainer.optimizer.ns_dtype == (torch.bfloat16 if want == torch.bfloat16 else None)
    # a bf16 run trains, and resumes exactly from its last checkpoint
    bf16_gain(monkeypatch, 2.2)
    whole = _losses(train(tiny_config(char_data, tmp_path / "whole", **wide), verbose=False))
    part = Trainer(tiny_config(char_data, tmp_path / "part", **wide), verbose=False)
    assert part.rt.dtype == torch.bfloat16

    class StopAt5:
        def on_log(self, step: int, record: dict) -> None:
            part.stop_requested = step >= 5

    part.callbacks.append(StopAt5())
    assert part.fit().step == 5
    rest = _losses(train(tiny_config(char_data, tmp_path / "part", **wide), resume=True, verbose=False))
    assert whole[-1] < whole[0] and rest == whole[-len(rest):]
    trainer = Trainer(tiny_config(char_data, tmp_path / "f32", **{"model.n_embd": 128, "train.dtype": "float32"}),
                      verbose=False)
    assert trainer.rt.dtype == torch.float32 and "requested" in trainer.rt.reason


def bf16_gain(monkeypatch: pytest.MonkeyPatch, gain: float) -> None:
    """The matmul peaks a CPU would measure: bf16 `gain` times fp32's."""
    from pocketlm import track

    monkeypatch.setattr(track, "peak_flops", lambda dev, dt, configured=0.0:
                        ((gain if dt == torch.bfloat16 else 1.0) * 1e11, "test"))

