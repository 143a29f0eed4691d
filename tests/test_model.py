import pytest
import torch

from pocketlm.model import GPT, GPTConfig, KVCache


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=37, block_size=24, n_layer=2, n_head=2, n_embd=16, **kw)).eval()


def test_forward_shapes_and_loss() -> None:
    m = tiny()
    x = torch.randint(0, 37, (3, 10))
    logits, loss = m(x, x)
    assert logits.shape == (3, 10, 37)
    assert abs(loss.item() - torch.log(torch.tensor(37.0)).item()) < 0.5  # near uniform at init
    assert m(x, last_only=True)[0].shape == (3, 1, 37)


def test_ignore_index_masks_targets() -> None:
    m = tiny()
    x = torch.randint(0, 37, (2, 8))
    y = x.clone()
    y[:, :4] = -100
    logits, loss = m(x, y)
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 37), y[:, 4:].reshape(-1))
    assert torch.allclose(loss, ref)


def test_weights_are_tied() -> None:
    m = tiny()
    assert m.lm_head.weight is m.transformer.wte.weight


@pytest.mark.parametrize("bias", [True, False])
def test_kv_cache_matches_full_forward(bias: bool) -> None:
    """Prefill, then single tokens, then a chunk: every position's logits equal the uncached forward."""
    m = tiny(bias=bias)
    x = torch.randint(0, 37, (2, 20))
    full, _ = m(x)
    cache = KVCache(m.config, 2, 24, "cpu", torch.float32)
    parts = [m(x[:, :7], cache=cache)[0]]
    for t in range(7, 12):
        parts.append(m(x[:, t:t + 1], cache=cache)[0])
    parts.append(m(x[:, 12:], cache=cache)[0])
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_too_long_input_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny()(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("kw", [{}, dict(pos_emb="rotary", norm="rmsnorm", mlp="swiglu", bias=False)],
                         ids=["gpt2", "llama"])
def test_packed_rows_compute_each_example_alone(kw: dict) -> None:
    m = tiny(**kw)
    a, b = torch.randint(0, 37, (1, 9)), torch.randint(0, 37, (1, 11))
    pos = torch.cat([torch.arange(9), torch.arange(11)])[None]
    packed, _ = m(torch.cat([a, b], 1), position_ids=pos)
    torch.testing.assert_close(packed, torch.cat([m(a)[0], m(b)[0]], 1), atol=1e-5, rtol=1e-5)
    x = torch.cat([a, b], 1)  # plain positions are the unpacked forward, exactly
    torch.testing.assert_close(m(x, position_ids=torch.arange(20)[None])[0], m(x)[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="not for decoding"):
        m(a, cache=KVCache(m.config, 1, 24, "cpu", torch.float32), position_ids=pos[:, :9])
