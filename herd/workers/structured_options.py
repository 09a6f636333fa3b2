"""herd.v1.StructuredOutput (the wire's) as the engine's StructuredOutput, for the gateway's check and the
replica alike, so both refuse the same constraints with the same field name ("structured")."""

from __future__ import annotations

from herd.engine.errors import SamplingError
from herd.engine.structured_output import StructuredOutput
from herd.protos.herd.v1 import inference_pb2 as pb

FIELD = "structured"


def structured_output(options: pb.SamplingOptions) -> StructuredOutput | None:
    """The options' constraint, or None; SamplingError (field "structured") for a malformed one."""
    if not options.HasField("structured"):
        return None
    message = options.structured
    kind = message.WhichOneof("kind")
    if kind == "json_object" and message.json_object:
        return StructuredOutput("json_object", "", FIELD)
    if kind == "choice":
        return StructuredOutput.choice(list(message.choice.choices), field=FIELD)
    if kind in ("json_schema", "regex", "grammar"):
        return StructuredOutput(kind, getattr(message, kind), FIELD)
    raise SamplingError(FIELD, "structured must set one of json_schema, json_object (true), regex, grammar, choice")
