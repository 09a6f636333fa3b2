"""What a prefill replica runs for a request (prefill/decode disaggregation), and which requests go through one.

A prefill replica runs the request's prompt for one greedy token that it throws away: its only product is the
prompt's KV. So every sampling option is dropped (the decode replica samples the first token itself, seed, penalties
and constraints included), and what decides the KV is kept: the token ids and the tenant (the prefix cache's salt).
Pure functions of the message.
"""

from __future__ import annotations

from herd.protos.herd.v1 import inference_pb2 as pb

PREFILL_SAMPLING = pb.SamplingOptions(max_tokens=1, temperature=0, ignore_eos=True, speculative=False)


def prefill_request(request: pb.GenerateRequest) -> pb.GenerateRequest:
    """The request's prompt, tenant and trace, for one greedy token."""
    return pb.GenerateRequest(model=request.model, token_ids=request.token_ids, sampling=PREFILL_SAMPLING,
                              request_id=f"{request.request_id}-prefill" if request.request_id else "",
                              tenant=request.tenant, trace_context=request.trace_context)


def colocated_reason(request: pb.GenerateRequest) -> str | None:
    """Why a request runs on a decode replica alone (computing its own prompt), or None: it is prefilled apart."""
    if request.WhichOneof("prompt") != "token_ids":
        return "a text prompt"  # a replica refuses it: the decode replica answers why
    if request.images:
        return "images"  # the blocks' keys hash the pixels, which an export by token ids does not carry
    if request.sampling.HasField("prompt_logprobs"):
        return "prompt logprobs"  # scoring the prompt computes it anyway: a hit would be recomputed
    if request.HasField("adapter"):
        return "a LoRA adapter"  # its blocks are salted by the adapter's registration on each replica: no handoff
    return None


__all__ = ["PREFILL_SAMPLING", "colocated_reason", "prefill_request"]
