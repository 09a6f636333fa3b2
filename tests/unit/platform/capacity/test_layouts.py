"""M:N layouts (issue 28): M trunks feeding N expert shards, with and without context parallelism, and the
search over them. The runtime serves M = 1 only; these check the planner's accounting of the others."""

from __future__ import annotations

import json

import pytest

from herd.platform.capacity.cli import load_model_config
from herd.platform.capacity.gpus import gpu_type
from herd.platform.capacity.memory import Workload, kv_bytes, trunk_activation_bytes
from herd.platform.capacity.plan import Plan, plan
from herd.platform.capacity.report import CONTEXT_PARALLEL
from herd.platform.capacity.search import Search, search

H100, H200 = gpu_type("h100"), gpu_type("h200")
TEN_M = 10_485_760  # Scout's max_position_embeddings


def _plan(trunks: int, *, context_parallel: bool = False, context: int = 8192, kv: str = "bf16") -> Plan:
    """Scout, bf16 weights, 8 x H200."""
    config, vision, _ = load_model_config("scout")
    return plan(config.text, vision, weight_format="bf16", gpu=H200, num_gpus=8, trunks=trunks,
                context_parallel=context_parallel, load=Workload(sequences=1, context_tokens=context, kv_dtype=kv))


@pytest.fixture(scope="module")
def ten_million() -> Search:
    config, vision, _ = load_model_config("scout")
    return search(config.text, vision, weight_format="bf16", gpu=H200, num_gpus=8,
                  load=Workload(sequences=1, context_tokens=TEN_M), kv_dtypes=["bf16", "fp8"])


def test_one_trunk_is_todays_plan():
    one = _plan(1)
    assert [g.role for g in one.gpus] == ["trunk"] + [f"shard {s}" for s in range(7)]
    assert (one.largest_context, one.largest_batch, one.tensor_parallel_context) == (1_994_679, 65, 4_292_032)


def test_two_trunks_double_the_batch_and_keep_one_sequences_context():
    one, two = _plan(1), _plan(2)
    assert [g.role for g in two.gpus[:3]] == ["trunk 0", "trunk 1", "shard 0"] and two.shards == 6
    assert two.gpus[0].weights == two.gpus[1].weights == one.gpus[0].weights, "a full copy of the trunk on each"
    assert sorted(e for g in two.gpus for e in g.experts) == list(range(16))
    assert two.largest_context == one.largest_context, "without context parallelism a sequence lives on one trunk"
    assert two.largest_batch == 2 * one.largest_batch


def test_context_parallelism_splits_the_global_layers_kv_over_the_trunks():
    config, _, _ = load_model_config("scout")
    text, block = config.text, 16
    load = Workload(sequences=3, context_tokens=4_000_000)
    quarter = Workload(sequences=3, context_tokens=1_000_000)
    quartered = kv_bytes(text, load, context_parallel=4)
    assert quartered == kv_bytes(text, quarter), "a quarter of the global KV, the windows whole"
    assert quartered < kv_bytes(text, load) / 3.5
    assert trunk_activation_bytes(text, load, context_parallel=4) == trunk_activation_bytes(text, quarter)
    single = _plan(4).largest_context
    spread = _plan(4, context_parallel=True).largest_context
    assert 0.95 * 4 * single <= spread <= 4 * single + 4 * block


def test_scout_bf16_kv_on_8_h200_reaches_past_a_tensor_parallel_engine(ten_million):
    bf16 = [p for p in ten_million.plans if p.load.kv_dtype == "bf16"]
    best = bf16[0]
    assert best.largest_context >= best.tensor_parallel_context == 4_292_032
    assert best.largest_context == TEN_M and best.fits
    assert (best.trunks, best.shards, best.context_parallel) == (6, 2, True)
    assert max(p.largest_context for p in bf16 if not p.context_parallel) == 1_994_679, "one trunk stops at 2.0M"


def test_ten_million_tokens_fit_8_h200_with_fp8_kv_and_context_parallelism(ten_million):
    best = ten_million.best
    assert ten_million.fits and best.fits
    assert (best.trunks, best.shards, best.context_parallel, best.load.kv_dtype) == (5, 3, True, "fp8")
    assert all(not p.fits for p in ten_million.plans if not p.context_parallel)
    contexts = [p.largest_context for p in ten_million.plans]
    assert contexts == sorted(contexts, reverse=True)


def test_herd_plan_search_reports_the_layouts_and_how_far_an_impossible_request_is(capsys):
    from herd.cli import main

    args = ["plan", "--model", "scout", "--weights", "int4", "--gpu", "h100", "--gpus", "2", "--context", str(TEN_M)]
    assert main([*args, "--search", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["fits"] and {(r["trunks"], r["kv_dtype"]) for r in report["layouts"]} == {(1, "bf16"), (1, "fp8")}
    best = report["best"]
    assert best["kv_dtype"] == "fp8" and 0 < best["largest_context"] < TEN_M
    assert main([*args, "--search"]) == 1
    out = capsys.readouterr().out
    assert f"NO LAYOUT FITS 1 x {TEN_M} tokens" in out and CONTEXT_PARALLEL in out
    assert f"({TEN_M - best['largest_context']} tokens short)" in out and "GiB over" in out


def test_herd_plan_trunks_prints_the_layout_and_refuses_a_layout_without_shards(capsys):
    from herd.cli import main

    assert main(["plan", "--model", "scout", "--gpu", "h200", "--gpus", "8", "--trunks", "6", "--context-parallel",
                 "--context", str(TEN_M)]) == 0
    out = capsys.readouterr().out
    assert "layout: 6 trunk(s) : 2 shard(s), context parallel, KV bf16" in out and CONTEXT_PARALLEL in out
    assert "trunk 5" in out and "FITS" in out
    assert main(["plan", "--model", "scout", "--gpus", "8", "--trunks", "8"]) == 2
    assert "trunks must be 1, or fewer than the 8 GPUs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--model", "scout", "--trunks", "2", "--search"])
