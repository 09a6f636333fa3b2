"""A request whose replica died, continued on another: what to re-send, and the stream the client keeps seeing.

When a replica dies (or cannot be reached) mid-stream, the gateway sends the request again (Serve routes it to a
live replica) as a continuation: the prompt followed by the tokens already streamed, max_tokens (and min_tokens)
less those, under a new request id (`<id>-r<attempt>`, so it cannot collide with the dead one's), without echo or
prompt logprobs (both were sent). The client sees one stream: no token repeated, none lost, billed once.

The new replica's text is not trusted at the boundary: its detokenizer starts after the streamed tokens (a
character split over them would be lost) and its stop strings see only its own text (one spanning the boundary
would be missed, and text the dead replica held back as a possible stop string start would be lost). So a
continued stream's text is recomputed here from all its tokens (herd.engine's incremental detokenizer and stop
strings, as the replica runs them), and a stop string is cut where the replica would have cut it.

Which requests can continue (`migratable`): one choice (n 1, best_of at most 1; several interleaved choices fail
as before), no output constraint (a grammar would start again from the beginning on the new replica), no
presence or frequency penalty (those count generated tokens, and the streamed ones would arrive as prompt).
Greedy decoding continues with exactly the tokens of an undisturbed run, and so does seeded sampling: a seeded draw
is a function of the seed and the output position, and the continuation says how many outputs came before
(`output_offset`). A request that has streamed nothing is simply sent again, whatever it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from herd.engine.detokenizer import IncrementalDetokenizer
from herd.engine.errors import Code, HerdError
from herd.engine.stop_strings import StopStrings
from herd.model.tokenizer import Tokenizer
from herd.platform.gateway.errors import REPLICA_LOST
from herd.protos.herd.v1 import inference_pb2 as pb


def replica_lost(err: HerdError) -> bool:
    """Whether `err` says the request's replica is gone (so the request may continue on another)."""
    return err.code is Code.UNAVAILABLE and err.reason == REPLICA_LOST


def migratable(request: pb.GenerateRequest) -> bool:
    """Whether a request that has streamed tokens can continue on another replica with the same output."""
    s = request.sampling
    return (s.n <= 1 and s.best_of <= 1 and not s.HasField("structured") and not s.presence_penalty
            and not s.frequency_penalty)


def continuation(request: pb.GenerateRequest, streamed: list[int], attempt: int) -> pb.GenerateRequest:
    """The request to send on attempt `attempt` (1, 2, ...) after `streamed` output tokens reached the client: the
    prompt followed by them, max_tokens and min_tokens less them, output_offset past them, a request id of its own,
    nothing sent again."""
    out = pb.GenerateRequest()
    out.CopyFrom(request)
    out.request_id = f"{request.request_id}-r{attempt}"
    out.token_ids.ids.extend(streamed)
    s = out.sampling
    s.output_offset = request.sampling.output_offset + len(streamed)
    s.max_tokens = request.sampling.max_tokens - len(streamed)
    if s.HasField("min_tokens"):
        s.min_tokens = max(0, s.min_tokens - len(streamed))
    s.echo = False
    s.ClearField("prompt_logprobs")
    return out


@dataclass
class Progress:
    """What one request (one choice) has streamed to the client over all its attempts, and the chunks of a
    continuation rewritten so that the client's stream reads as one."""

    request: pb.GenerateRequest
    tokenizer: Tokenizer
    tokens: list[int] = field(default_factory=list)  # output tokens sent, all attempts
    chunks: int = 0  # chunks sent
    attempts: int = 0  # continuations sent
    finished: bool = False  # every choice's last chunk relayed (a replica lost after that is moot)
    cut: bool = False  # ended here at a stop string the replica did not see: its stream is to be closed
    _ended: int = 0  # choices whose last chunk was relayed
    _text_chars: int = 0  # characters of generated text sent (the echoed prompt left out)
    _detok: IncrementalDetokenizer | None = None  # set once continued: the text of all tokens
    _stops: StopStrings | None = None

    def can_continue(self) -> bool:
        return not self.chunks or migratable(self.request)

    def next_request(self) -> pb.GenerateRequest:
        """The request of the next attempt (the original one again, under its own id, when nothing was sent)."""
        self.attempts += 1
        if not self.chunks:
            retry = pb.GenerateRequest()
            retry.CopyFrom(self.request)
            retry.request_id = f"{self.request.request_id}-r{self.attempts}"
            return retry
        if self._detok is None:
            self._detok = IncrementalDetokenizer(self.tokenizer)
            self._detok.push(self.tokens)
            self._stops = StopStrings(self.request.sampling.stop)
            self._stops.find(self._detok.text)  # searched already, by the replica that streamed it
        return continuation(self.request, self.tokens, self.attempts)

    def remaining(self) -> int:
        return self.request.sampling.max_tokens - len(self.tokens)

    def relay(self, chunk: pb.GenerateChunk) -> pb.GenerateChunk:
        """`chunk` as the client gets it: as it came on the first attempt; on a continuation with the request's
        id, its text recomputed from all the tokens (cut at a stop string, which may span the attempts: `cut`, the
        stream is to be closed) and its last chunk's usage the whole request's."""
        self.chunks += 1
        if self._detok is None:
            self.tokens += chunk.token_ids
            text = chunk.text
            if self.request.sampling.echo and self.chunks == 1:
                text = text[len(_echo(self.tokenizer, self.request)):]
            self._text_chars += len(text)
            self._ended += bool(chunk.finish_reason)
            self.finished = self._ended >= max(1, self.request.sampling.n)  # every choice's last chunk sent
            if self.attempts:  # sent again as it was, under an id of its own
                chunk = pb.GenerateChunk.FromString(chunk.SerializeToString())
                chunk.request_id = self.request.request_id
            return chunk
        return self._continued(chunk)

    def length_reached(self) -> pb.GenerateChunk:
        """The last chunk of a request that had streamed all its max_tokens when its replica died."""
        assert self._detok is not None
        self._detok.flush(self.tokens)
        return self._last(pb.GenerateChunk(request_id=self.request.request_id), self._detok.text, "length", 0)

    def _continued(self, chunk: pb.GenerateChunk) -> pb.GenerateChunk:
        assert self._detok is not None and self._stops is not None
        new = list(chunk.token_ids)
        kept, cut = len(new), None
        for i, token in enumerate(new):  # one at a time, as the engine does: a stop string ends at its token
            self.tokens.append(token)
            self._detok.push(self.tokens)
            if self._stops.stops and (hit := self._stops.find(self._detok.text)) is not None:
                kept, cut = i + 1, hit[0]
                break
        out = pb.GenerateChunk()
        out.CopyFrom(chunk)
        out.request_id = self.request.request_id
        del out.token_ids[kept:]
        del out.logprobs[kept:]
        if cut is not None:
            self.cut = True
            return self._last(out, self._detok.text[:cut], "stop", chunk.usage.cached_tokens)
        if chunk.finish_reason:
            self._detok.flush(self.tokens)
            return self._last(out, self._detok.text, chunk.finish_reason, chunk.usage.cached_tokens)
        text = self._detok.text
        if self._stops.stops:  # hold back what could still become a stop string, as the replica does
            text = text[: max(self._text_chars, self._stops.releasable(text))]
        out.text = text[self._text_chars:]
        self._text_chars = max(self._text_chars, len(text))
        return out

    def _last(self, out: pb.GenerateChunk, text: str, reason: str, cached: int) -> pb.GenerateChunk:
        """The request's last chunk: the rest of `text`, `reason`, and the usage of the whole request (each token
        once; the cached prompt tokens as the last replica counted them, at most the original prompt)."""
        prompt = len(self.request.token_ids.ids)
        out.text = text[self._text_chars:]
        self._text_chars = len(text)
        out.finish_reason = reason
        out.usage.CopyFrom(pb.Usage(prompt_tokens=prompt, completion_tokens=len(self.tokens),
                                    cached_tokens=min(cached, prompt)))
        self.finished = True
        return out


def _echo(tokenizer: Tokenizer, request: pb.GenerateRequest) -> str:
    """The prompt's text as a replica echoes it (herd.workers.replica_core)."""
    return tokenizer.decode(list(request.token_ids.ids), skip_special_tokens=True)


__all__ = ["Progress", "continuation", "migratable", "replica_lost"]
