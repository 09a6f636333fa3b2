"""M trunks to N shards over one collective group (issue 28's M:N dispatch), on gloo: 2 trunks (threads of this
process, each a tiny model's trunk with its own rank, transport and dispatcher) and 2 shards (threads too), running
different sequences in lockstep. Logits and greedy tokens equal the single-process model's for each trunk, each
shard computes both trunks' rows in one call per layer, an idle trunk keeps its busy peer going, and what M > 1 does
not support is refused."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from herd.model import load_config, load_model
from herd.model.micro_batch import MicroBatch
from herd.model.tiny import make_tiny
from herd.workers import collective_shard
from herd.workers.collective import CollectiveGroup, open_rendezvous
from herd.workers.collective_shard import CollectiveShard
from herd.workers.collective_transport import CollectiveTransport
from herd.workers.dispatch import ExpertDispatcher
from herd.workers.placement import place_experts
from herd.workers.shard_experts import ShardExperts

EXPERTS = {"scout": 16, "maverick": 32}
TRUNKS = SHARDS = 2
WAIT_S = 60.0  # any lockstep call that takes longer has hung


def counting(shard):
    """The shard, its compute calls recorded in `shard.calls`: [(layer, rows)]."""
    compute, shard.calls = shard.compute, []

    def recorded(layer, counts, rows, *args, **kwargs):
        shard.calls.append((layer, rows.shape[0]))
        return compute(layer, counts, rows, *args, **kwargs)

    shard.compute = recorded
    return shard


class MtoN:
    """A replica of TRUNKS trunks and SHARDS shards in this process; `trunks[t]` is (model, transport)."""

    def __init__(self, path: Path, preset: str, *, timeout_s: float = 30.0, processes: bool = False) -> None:
        text = load_config(path).text
        world = TRUNKS + SHARDS
        store, rendezvous = open_rendezvous("127.0.0.1", world, backend="gloo", timeout_s=timeout_s)
        placement = place_experts(EXPERTS[preset], SHARDS)
        self.errors: list[BaseException] = []
        self.procs: list[subprocess.Popen[str]] = []
        self._threads: list[threading.Thread] = []
        if processes:  # `herd expert-shard --collective ... --trunks 2`, as a replica would start them
            self.procs = [subprocess.Popen(
                [sys.executable, "-m", "herd.cli", "expert-shard", "--model", str(path), "--experts",
                 f"{experts[0]}:{experts[-1] + 1}", "--collective", f"127.0.0.1:{rendezvous.port}", "--rank",
                 str(TRUNKS + s), "--world-size", str(world), "--trunks", str(TRUNKS), "--timeout-s", "120"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
                for s, experts in enumerate(placement.shard_experts)]
        else:
            self.shards = [counting(ShardExperts.load(path, experts)) for experts in placement.shard_experts]
            self._threads = [threading.Thread(target=self._serve, args=(rendezvous, TRUNKS + s,
                                                                        text.num_local_experts), daemon=True)
                             for s in range(SHARDS)]
        for thread in self._threads:
            thread.start()

        def trunk(rank: int) -> tuple[Any, CollectiveTransport]:
            group = CollectiveGroup(rendezvous, rank, store=store if rank == 0 else None)
            transport = CollectiveTransport(
                group, num_experts=text.num_local_experts, moe_layers=len(text.moe_layers),
                hidden_size=text.hidden_size, dtype=torch.float32, timeout_s=timeout_s, trunks=TRUNKS,
                layers=text.moe_layers)
            model = load_model(path, experts=(), progress=False)
            ExpertDispatcher(placement, transport).attach(model)
            return model, transport

        self.trunks = both(lambda: trunk(0), lambda: trunk(1))

    def _serve(self, rendezvous: Any, rank: int, num_experts: int) -> None:
        group = CollectiveGroup(rendezvous, rank)
        try:
            CollectiveShard(self.shards[rank - TRUNKS], group, num_experts, trunks=TRUNKS).serve()
        except BaseException as err:  # the test asserts on it
            self.errors.append(err)
        finally:
            group.close()

    def close(self) -> None:
        """Trunk 1 leaves, then trunk 0 tells the shards to stop (control is trunk 0's)."""
        self.trunks[1][1].close()
        self.trunks[0][1].close()
        for thread in self._threads:
            thread.join(timeout=WAIT_S)
        assert not any(thread.is_alive() for thread in self._threads), "every shard left its loop"
        for proc in self.procs:
            try:
                assert proc.wait(timeout=WAIT_S) == 0, "the shard process left when trunk 0 said stop"
            finally:
                if proc.poll() is None:
                    proc.kill()

    def __enter__(self) -> MtoN:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def both(first: Callable[[], Any], second: Callable[[], Any]) -> list[Any]:
    """Run the two trunks' calls at once (lockstep), each on a thread; their results, or the first error. A call
    still running after WAIT_S fails the test (its daemon thread is left behind): never a hang."""
    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    def run(index: int, call: Callable[[], Any]) -> None:
        try:
            results[index] = call()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, call), daemon=True) for i, call in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    assert not any(thread.is_alive() for thread in threads), f"a trunk's call hung past {WAIT_S} s"
    if errors:
        raise errors[0]
    return results


def _ids(vocab: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed))


def _close(got, expected):
    """Equal but for aggregation's rounding: the shards compute both trunks' rows in one GEMM per expert, and the
    BLAS picks kernels by row count that round differently from the single process's smaller GEMMs (seen here: up to
    1.5e-6 in the logits). Wrong rows or outputs differ by far more (the control test)."""
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def _greedy(model: Any, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens of `prompt` with a contiguous KV cache: one forward per token (the prompt's first)."""
    cache = model.new_cache()
    logits = model.forward(prompt, cache=cache)
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps - 1):
        logits = model.forward(torch.tensor([tokens[-1]]), cache=cache)
        tokens.append(int(logits[-1].argmax()))
    return tokens


@pytest.fixture(scope="module", params=["scout", "maverick"])
def replica(request, tmp_path_factory):
    preset = request.param
    path = make_tiny(tmp_path_factory.mktemp(preset), preset=preset, seed=6)
    with MtoN(path, preset) as group:
        yield SimpleNamespace(path=path, preset=preset, full=load_model(path, progress=False), group=group)
    assert not group.errors, "no shard failed"


def test_two_trunks_running_different_sequences_get_the_single_process_logits(replica):
    (one, _), (two, _) = replica.group.trunks
    vocab = replica.full.config.vocab_size
    for seed in (0, 1, 2):
        first, second = _ids(vocab, 37, seed), _ids(vocab, 5, seed + 100)
        got = both(lambda: one.logits(first), lambda: two.logits(second))  # noqa: B023  # run at once, here
        for logits, ids in zip(got, (first, second), strict=True):
            expected = replica.full.logits(ids)
            _close(logits, expected)


def test_each_shard_computes_both_trunks_rows_in_one_call_per_layer_step(replica):
    (one, _), (two, _) = replica.group.trunks
    text = replica.full.config
    for shard in replica.group.shards:
        shard.calls.clear()
    first, second = _ids(text.vocab_size, 37, 7), _ids(text.vocab_size, 5, 8)
    both(lambda: one.logits(first), lambda: two.logits(second))
    layers = list(text.moe_layers)
    for shard in replica.group.shards:
        assert [layer for layer, _ in shard.calls] == layers, "one compute call per MoE layer, not one per trunk"
    routed = sum(rows for shard in replica.group.shards for _, rows in shard.calls)
    # Every routed row of both trunks went through some shard's one call (top-k rows per token and layer).
    assert routed == (37 + 5) * text.num_experts_per_tok * len(layers)


def test_greedy_decoding_in_lockstep_gives_each_trunk_the_single_process_tokens(replica):
    (one, _), (two, _) = replica.group.trunks
    vocab = replica.full.config.vocab_size
    prompts = [_ids(vocab, 23, 3), _ids(vocab, 4, 4)]
    got = both(lambda: _greedy(one, prompts[0], 8), lambda: _greedy(two, prompts[1], 8))
    assert got == [_greedy(replica.full, prompt, 8) for prompt in prompts]


def test_an_idle_trunk_steps_with_empty_headers_and_its_busy_peer_is_exact(replica):
    (one, _), (_, idle) = replica.group.trunks
    ids = _ids(replica.full.config.vocab_size, 29, 11)
    got, _ = both(lambda: one.logits(ids), idle.idle_step)
    # Alone in its steps, trunk 0's rows are computed as in the single process: exact.
    torch.testing.assert_close(got, replica.full.logits(ids), rtol=0, atol=0)
    (one, _), (two, _) = replica.group.trunks  # and the other way round: still in step
    _, got = both(replica.group.trunks[0][1].idle_step, lambda: two.logits(ids))
    torch.testing.assert_close(got, replica.full.logits(ids), rtol=0, atol=0)


def test_rows_beyond_a_header_message_and_a_lora_trunk_beside_a_plain_one(replica, tmp_path):
    """Rows past a header message's room follow in a second message from either trunk; a trunk with LoRA rows
    (LORA_STEP) and one without (STEP) share a step, the plain trunk's rows on the base model. Each trunk's outputs
    are a single shard's compute of its own rows."""
    from herd.model.lora import load_adapter
    from herd.model.tiny_lora import make_tiny_lora
    from herd.workers.collective_protocol import inline_rows
    from herd.workers.shard_experts import AdapterAction
    from herd.workers.transport import ShardWork

    text = replica.full.config
    inline = inline_rows(text.hidden_size, torch.float32)
    (_, zero), (_, one) = replica.group.trunks
    local = [ShardExperts.load(replica.path, experts) for experts in zero.shard_experts()]
    path = make_tiny_lora(tmp_path / "adapter", text, rank=4, seed=0, targets=("experts",))
    zero.load_adapter(0, load_adapter(path, text), slots=1, max_rank=8)
    for shard in local:
        shard.set_adapter(AdapterAction.LOAD, 0, str(path), slots=1, max_rank=8)
    generator = torch.Generator().manual_seed(0)

    def work(sizes, lora):
        items = []
        for experts, size in zip(zero.shard_experts(), sizes, strict=True):
            share = size // len(experts)
            counts = [share] * (len(experts) - 1) + [size - share * (len(experts) - 1)]
            slots = torch.randint(0, 2, (size,), generator=generator) if lora else None  # 0 base, 1 slot 0
            items.append(ShardWork(counts=counts, rows=torch.randn(size, text.hidden_size, generator=generator),
                                   row_slots=slots))
        return items

    layer = text.moe_layers[-1]
    try:
        first, second = work([inline + 37, 3], lora=True), work([0, 2 * inline + 1], lora=False)
        got = both(lambda: zero.run(layer, first), lambda: one.run(layer, second))
    finally:
        zero.unload_adapter(0)
    for items, outputs in zip((first, second), got, strict=True):
        for shard, item, out in zip(local, items, outputs, strict=True):
            want = shard.compute(layer, item.counts, item.rows, row_slots=item.row_slots)
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)  # aggregation's rounding (see _close)
    plain = local[0].compute(layer, first[0].counts, first[0].rows)
    assert not torch.allclose(got[0][0], plain, rtol=1e-3, atol=1e-3), "the adapter moves trunk 0's outputs"


def test_control_a_shard_that_misorders_the_trunks_outputs_fails_the_comparison(replica, monkeypatch):
    """The comparisons above can fail: a shard splitting its outputs as if trunk 1's rows came first within each
    expert gives each trunk other rows' outputs."""
    real = collective_shard.split
    monkeypatch.setattr(collective_shard, "split",
                        lambda counts, merged: list(reversed(real(list(reversed(counts)), merged))))
    (one, _), (two, _) = replica.group.trunks
    vocab = replica.full.config.vocab_size
    first, second = _ids(vocab, 37, 0), _ids(vocab, 5, 100)
    got = both(lambda: one.logits(first), lambda: two.logits(second))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got[0], replica.full.logits(first), rtol=1e-4, atol=1e-5)


def test_what_several_trunks_do_not_support_is_refused(replica):
    (_, zero), (_, one) = replica.group.trunks
    placement = place_experts(EXPERTS[replica.preset], SHARDS)
    with pytest.raises(ValueError, match="re-placing experts live is not supported with 2 trunks"):
        zero.replace(placement, placement)
    with pytest.raises(ValueError, match="restarting a shard in place is not supported with 2 trunks"):
        zero.leave([0])
    with pytest.raises(ValueError, match="restarting a shard in place is not supported with 2 trunks"):
        zero.rejoin(zero.group)
    with pytest.raises(ValueError, match="only trunk 0 of 2 controls the shards"):
        one.unload_adapter(0)
    text = replica.full.config
    fake = SimpleNamespace(rank=0, world_size=TRUNKS + SHARDS, device=torch.device("cpu"))
    common = dict(num_experts=text.num_local_experts, moe_layers=len(text.moe_layers), hidden_size=text.hidden_size,
                  dtype=torch.float32, timeout_s=1.0, trunks=TRUNKS)
    with pytest.raises(ValueError, match="restarting a shard in place is not supported with 2 trunks"):
        CollectiveTransport(fake, restartable=True, layers=text.moe_layers, **common)
    with pytest.raises(ValueError, match="need the MoE layers' indexes"):
        CollectiveTransport(fake, **common)
    with pytest.raises(ValueError, match=r"ranks 0\.\.1 of a replica's group are its trunks"):
        CollectiveShard(replica.group.shards[0], SimpleNamespace(rank=1, device="cpu"), 16, trunks=TRUNKS)
    # Still serving after every refusal: nothing was sent.
    ids = _ids(text.vocab_size, 9, 5)
    got = both(lambda: replica.group.trunks[0][0].logits(ids), lambda: replica.group.trunks[1][0].logits(ids))
    for logits in got:
        _close(logits, replica.full.logits(ids))


def test_trunks_out_of_step_are_a_protocol_error_that_fails_both_at_once(tmp_path):
    """Trunk 0 at one MoE layer, trunk 1 at another: each shard logs and leaves, and both trunks' steps fail with
    UNAVAILABLE at once (the shards' pairs close), not after the timeout."""
    import time

    from herd.engine.errors import HerdError
    from herd.workers.transport import ShardWork

    path = make_tiny(tmp_path / "scout", preset="scout", seed=6)
    text = load_config(path).text
    with MtoN(path, "scout", timeout_s=20.0) as group:
        def step(trunk: int, layer: int) -> Callable[[], Any]:
            transport = group.trunks[trunk][1]
            work = [ShardWork(counts=[1] + [0] * (len(experts) - 1), rows=torch.randn(1, text.hidden_size))
                    for experts in transport.shard_experts()]

            def run() -> Any:
                try:
                    return transport.run(layer, work)
                except HerdError as err:
                    return err
            return run

        started = time.monotonic()
        got = both(step(0, text.moe_layers[0]), step(1, text.moe_layers[1]))
        assert time.monotonic() - started < 10.0, "failed at once, not after the 20 s timeout"
        assert all(isinstance(err, HerdError) and err.code == "UNAVAILABLE" for err in got), got
        assert len(group.errors) == SHARDS
        assert all("protocol error" in str(err) and "out of step" in str(err) for err in group.errors)
        assert not group.trunks[0][1].healthy()


def test_shard_processes_started_with_trunks_2_serve_two_trunks(tmp_path):
    """`herd expert-shard --collective ... --trunks 2`: the shard processes a replica would start."""
    path = make_tiny(tmp_path / "maverick", preset="maverick", seed=6)
    full = load_model(path, progress=False)
    with MtoN(path, "maverick", processes=True, timeout_s=120.0) as group:
        first, second = _ids(full.config.vocab_size, 37, 1), _ids(full.config.vocab_size, 5, 2)
        got = both(lambda: group.trunks[0][0].logits(first), lambda: group.trunks[1][0].logits(second))
        for logits, ids in zip(got, (first, second), strict=True):
            _close(logits, full.logits(ids))


def test_the_shard_command_refuses_a_trunks_rank():
    import argparse

    from herd.cli import _collective_shard

    args = argparse.Namespace(collective="127.0.0.1:1", rank=1, world_size=4, trunks=2)
    with pytest.raises(ValueError, match=r"--rank must be in 2\.\.3 \(ranks 0\.\.1 are trunks\)"):
        _collective_shard(args)


def _ping_pong_greedy(model: Any, prompts: list[torch.Tensor], steps: int) -> tuple[list[list[int]], list[Any]]:
    """Greedy tokens of each prompt, the prompts as micro-batches of one forward that ping-pong with the shards
    (each with its own contiguous cache); and the first forward's logits."""
    caches = [model.new_cache() for _ in prompts]
    ids = list(prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    first = None
    for _ in range(steps):
        batches = [MicroBatch(i, torch.arange(len(c), len(c) + i.shape[0]), c) for i, c in zip(ids, caches,
                                                                                               strict=True)]
        logits = model.forward_micro_batches(batches)
        first = first or logits
        for out, row in zip(tokens, logits, strict=True):
            out.append(int(row[-1].argmax()))
        ids = [torch.tensor([out[-1]]) for out in tokens]
    return tokens, first


def test_two_trunks_each_ping_ponging_two_micro_batches_get_the_single_process_logits_and_tokens(replica):
    """Issue 28's exactness with ping-pong: each trunk's step is two micro-batches in flight to the shards at once
    (the shards answer both trunks' first micro-batch in one call, then their second)."""
    (one, _), (two, _) = replica.group.trunks
    vocab = replica.full.config.vocab_size
    prompts = [[_ids(vocab, 29, 11), _ids(vocab, 6, 12)], [_ids(vocab, 17, 13), _ids(vocab, 9, 14)]]
    for shard in replica.group.shards:
        shard.calls.clear()
    got = both(lambda: _ping_pong_greedy(one, prompts[0], 6), lambda: _ping_pong_greedy(two, prompts[1], 6))
    layers = len(replica.full.config.moe_layers)
    for shard in replica.group.shards:  # 6 forwards x 2 micro-batches x MoE layers, both trunks' rows per call
        assert len(shard.calls) == 6 * 2 * layers
    for (tokens, first), trunk_prompts in zip(got, prompts, strict=True):
        for prompt, logits, greedy in zip(trunk_prompts, first, tokens, strict=True):
            _close(logits, replica.full.logits(prompt))
            assert greedy == _greedy(replica.full, prompt, 6)
