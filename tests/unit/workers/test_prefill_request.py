"""What a prefill replica runs for a request: its prompt and tenant for one greedy token, nothing of its sampling."""

from __future__ import annotations

from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.prefill_request import colocated_reason, prefill_request


def _request(**extra) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="scout", token_ids=pb.TokenIds(ids=[5, 6, 7]), request_id="r1",
                              tenant=pb.TenantContext(tenant_id="t", weight=2, sharing_group="g"),
                              trace_context={"traceparent": "00-1-2-01"}, **extra)


def test_the_prefill_keeps_prompt_tenant_and_trace_and_drops_sampling():
    sampling = pb.SamplingOptions(max_tokens=200, temperature=0.7, seed=9, n=3, logprobs=2, stop=["x"])
    prefill = prefill_request(_request(sampling=sampling))
    assert list(prefill.token_ids.ids) == [5, 6, 7] and prefill.tenant.sharing_group == "g"
    assert prefill.tenant.tenant_id == "t" and dict(prefill.trace_context) == {"traceparent": "00-1-2-01"}
    assert prefill.request_id == "r1-prefill"
    assert prefill.sampling == pb.SamplingOptions(max_tokens=1, temperature=0, ignore_eos=True, speculative=False)


def test_what_runs_on_the_decode_pool_alone():
    assert colocated_reason(_request()) is None
    assert colocated_reason(_request(images=[b"png"])) == "images"
    assert colocated_reason(_request(sampling=pb.SamplingOptions(prompt_logprobs=1))) == "prompt logprobs"
    assert colocated_reason(pb.GenerateRequest(text="hello")) == "a text prompt"
    adapter = pb.LoraAdapter(name="bot@1", path="/adapters/bot")
    assert colocated_reason(_request(adapter=adapter)) == "a LoRA adapter"
