"""Row shards of a micro-batch on parallel CPU threads (parallel.ThreadShards) against the plain step: the same
loss and gradients, deterministic runs, the thread count given back, and the rules that turn it on."""

from pathlib import Path

import pytest
import torch

from pocketlm import config, parallel
from pocketlm.errors import ConfigError, PocketLMError
from pocketlm.model import GPT, GPTConfig
from pocketlm.train import NextTokenTask


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False, **kw))


def _batch(masked_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 29, (6, 16), generator=g), torch.randint(0, 29, (6, 16), generator=g)
    y[:, :5] = -100  # SFT-style prompt positions: not scored, so shards hold unequal numbers of targets
    y[1, 5:12] = -100
    y[len(y) - masked_rows:] = -100  # rows with nothing scored
    return x, y


def _grads(model: GPT) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("n,masked_rows", [(2, 0), (3, 2), (4, 0)])
def test_shards_compute_the_plain_loss_and_gradients(n: int, masked_rows: int) -> None:
    task, batch = NextTokenTask(), _batch(masked_rows)
    plain = _model()
    loss = task.loss(plain, batch) / 2  # as a micro-step of grad_accum 2
    loss.backward()
    sharded = _model()
    params = list(sharded.parameters())
    parts = task.split(batch, n)
    assert abs(sum(w for _, w in parts) - 1) < 1e-12 and all(len(b[0]) for b, _ in parts)
    if masked_rows == 2:  # the last shard scores nothing: it is left out, not averaged in as NaN
        assert len(parts) == n - 1
    shards = parallel.ThreadShards(n)
    try:
        if n == 2:  # as the loop runs it: the whole step, the optimizer's included, at one thread per thread
            with shards.one_thread():
                total = shards.backward(parts, lambda b: task.loss(sharded, b) / 2, params)
                assert torch.get_num_threads() == 1
        else:
            total = shards.backward(parts, lambda b: task.loss(sharded, b) / 2, params)
        assert torch.get_num_threads() == shards.threads  # given back after the step
    finally:
        shards.close()
    assert torch.allclose(total, loss.detach(), atol=1e-6)
    for a, b in zip(_grads(plain), _grads(sharded)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_shards_are_deterministic_and_accumulate_onto_existing_gradients() -> None:
    task, batch = NextTokenTask(), _batch()
    runs = []
    for _ in range(2):
        model = _model()
        shards = parallel.ThreadShards(3)
        for _ in range(2):  # two micro-steps: the second adds onto the first's gradients
            shards.backward(task.split(batch, 3), lambda b, m=model: task.loss(m, b), list(model.parameters()))
        shards.close()
        runs.append(_grads(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    once = _model()
    task.loss(once, batch).backward()
    assert all(torch.allclose(2 * a, b, atol=1e-6) for a, b in zip(_grads(once), runs[0]))


def test_a_failing_shard_raises_and_gives_the_threads_back() -> None:
    task, batch = NextTokenTask(), _batch()
    model, threads = _model(), torch.get_num_threads()

    def loss_of(b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if b[0].data_ptr() != batch[0].data_ptr():  # every shard but the first
            raise RuntimeError("shard failed")
        return task.loss(model, b)

    shards = parallel.ThreadShards(3)
    with pytest.raises(RuntimeError, match="shard failed"):
        shards.backward(task.split(batch, 3), loss_of, list(model.parameters()))
    shards.close()
    assert torch.get_num_threads() == threads


def test_muon_on_the_threads_updates_as_on_one() -> None:
    from pocketlm import optim

    task, batch = NextTokenTask(), _batch()
    results = []
    for ways in (1, 2, 2, 3):
        model = _model()
        opt = optim.build(model, config.TrainConfig(optimizer="muon"))
        shards = parallel.ThreadShards(ways) if ways > 1 else None
        opt.shards = shards
        for _ in range(2):
            task.loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
        if shards:
            shards.close()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(results[1], results[2]))  # deterministic
    for other in results[1:]:
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(results[0], other))
    assert parallel.ThreadShards(3).map(lambda x: x * 2, list(range(7))) == [0, 2, 4, 6, 8, 10, 12]


def test_a_batch_with_nothing_scored_is_not_split() -> None:
    x, y = _batch()
    y[:] = -100
    assert NextTokenTask().split((x, y), 2) == [((x, y), 1.0)]


def test_auto_shards_only_where_the_run_stays_plain_and_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    pick = parallel.pick_thread_shards
    assert pick(0, cpu, False, False, 12, True, _model(), True) == (2, "2 thread shards per micro-batch")
    assert pick(1, cpu, False, False, 12, True, _model(), True)[0] == 1
    assert pick(0, cpu, False, False, 12, True, _model(dropout=0.1), True)[0] == 1  # one generator, two threads
    assert pick(0, cpu, True, False, 12, True, _model(), True)[0] == 1  # torchrun's processes
    assert pick(0, cpu, False, True, 12, True, _model(), True)[0] == 1  # compiled
    assert pick(0, cpu, False, False, 12, False, _model(), True)[0] == 1  # preference tuning: no split
    assert pick(0, cpu, False, False, 12, True, _model(), False)[0] == 1  # a transformers model
    assert pick(0, cpu, False, False, 1, True, _model(), True)[0] == 1  # one row
    monkeypatch.setattr(parallel, "SHARD_MAX_EXTRA", 3 * sum(p.numel() for p in _model().parameters()))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert pick(0, cpu, False, False, 12, True, _model(), True)[0] == 4  # 3 extra gradient copies: allowed
    monkeypatch.setattr(torch, "get_num_threads", lambda: 5)
    assert pick(0, cpu, False, False, 12, True, _model(), True)[0] == 1  # 4 copies: too much memory
    assert pick(0, torch.device("cuda"), False, False, 12, True, _model(), True)[0] == 1
    assert pick(3, cpu, False, False, 12, True, _model(dropout=0.1), True) == \
        (3, "3 thread shards per micro-batch (requested)")
    for args, msg in (((3, cpu, False, False, 2), "more than the 2 rows"), ((2, cpu, True, False, 12), "torchrun"),
                      ((2, cpu, False, True, 12), "compiled"), ((2, torch.device("cuda"), False, False, 12), "CUDA")):
        with pytest.raises(PocketLMError, match=msg):
            pick(*args, True, _model(), True)
    with pytest.raises(PocketLMError, match="no row-wise loss"):
        pick(2, cpu, False, False, 12, False, _model(), True)
    with pytest.raises(ConfigError, match="thread_shards"):
        config.load(overrides={"train.thread_shards": -1})


def test_sharded_training_runs_resume_exactly_and_track_the_plain_run(tmp_path: Path, char_data: Path) -> None:
    from pocketlm.train import Trainer, train
    from tests.conftest import tiny_config

    def cfg(name: str, n: int):
        return tiny_config(char_data, tmp_path / name, **{"train.thread_shards": n, "train.max_steps": 20})

    threads = torch.get_num_threads()
    plain = [r["train/loss"] for r in train(cfg("plain", 1), verbose=False).history if "train/loss" in r]
    trainer = Trainer(cfg("sharded", 2), verbose=False)
    assert "2 thread shards per micro-batch (requested)" in trainer.rt.reason
    sharded = [r["train/loss"] for r in trainer.fit().history if "train/loss" in r]
    assert torch.get_num_threads() == threads
    assert sharded[-1] < sharded[0] - 0.3
    assert all(abs(a - b) < 1e-4 for a, b in zip(plain, sharded)), (plain, sharded)  # float sums differ, no more
    part = Trainer(cfg("part", 2), verbose=False)

    class StopAt10:
        def on_log(self, step: int, record: dict) -> None:
            part.stop_requested = step >= 10

    part.callbacks.append(StopAt10())
    assert part.fit().step == 10
    rest = [r["train/loss"] for r in train(cfg("part", 2), resume=True, verbose=False).history if "train/loss" in r]
    assert rest == sharded[-len(rest):] and len(rest) == 2
