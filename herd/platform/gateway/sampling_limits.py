"""The sampling limits both doors apply to every request, before any work is done for it.

The limits are the engine's own (herd.engine.sampling_params: stop strings by count and length,
stop_token_ids by count, logprobs, max_tokens, and every field's range): the options are checked by
building the engine's SamplingParams from them, so a door can never accept what a replica would refuse,
and a request that asks too much of the shared engine is refused here, naming the field, rather than
after it was admitted and sent.
"""

from __future__ import annotations

from herd.engine.sampling_params import SamplingError, SamplingParams
from herd.platform.gateway.errors import invalid_request
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.structured_options import structured_output

DOOR_ONLY = frozenset({"echo"})
"""Options the replica applies to the stream, not the engine's SamplingParams (nothing to check there)."""


def check_sampling(options: pb.SamplingOptions) -> None:
    """Refuse (invalid_request, param = the field) options outside the engine's limits; the fields left unset
    take the engine's defaults. A repeated field's count is checked before its items are read."""
    try:
        fields = {field.name: value for field, value in options.ListFields() if field.name not in DOOR_ONLY}
        fields["structured"] = structured_output(options)
        SamplingParams(**fields)
    except SamplingError as err:
        raise invalid_request(str(err), param=err.field) from err


def candidates(options: pb.SamplingOptions) -> int:
    """Sequences the request runs (best_of, else n, else 1): what it holds of the tenant's concurrency and
    reserves of its output tokens (each up to max_tokens)."""
    if options.HasField("best_of"):
        return options.best_of
    return options.n if options.HasField("n") else 1
