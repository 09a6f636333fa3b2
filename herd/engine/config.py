"""Engine settings: one typed object, units in the names. It is also the `engine` section of a model's
settings and of what a Serve replica receives (herd.workers.replica_config), so a field added here is a
setting everywhere: the config file, `herd serve --print-config`, the Helm chart's values and the engine."""

from __future__ import annotations

from typing import Annotated, Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, WithJsonSchema, model_validator

from herd.engine import fp8_kv
from herd.engine.kv_cache_manager import CHUNKED, FULL, KVLayout
from herd.engine.paged_kv import bytes_per_block
from herd.engine.scheduler import SchedulerConfig
from herd.engine.speculative.config import SpeculativeConfig
from herd.model.config import TextConfig
from herd.model.dtypes import DTYPES, dtype_name, to_dtype

DEFAULT_CONTEXT_TOKENS = 8192
"""The context limit when neither the engine nor the checkpoint says less (max_model_len unset)."""

TorchDType = Annotated[
    torch.dtype, PlainValidator(to_dtype), PlainSerializer(dtype_name, return_type=str),
    WithJsonSchema({"type": "string", "enum": sorted(DTYPES)}),
]
"""A torch dtype that settings and JSON write by name ("bfloat16")."""

DEFAULT_DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class EngineConfig(BaseModel):
    """How big the engine's batches and KV cache are, and where it computes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    block_size: int = Field(16, ge=1, description="tokens per KV block; must divide the model's attention_chunk_size")
    max_num_seqs: int = Field(64, ge=1, description="sequences holding KV blocks at once")
    max_num_batched_tokens: int = Field(512, ge=1, description="tokens computed per step (prefill chunks and "
                                        "decodes together)")
    max_model_len: int | None = Field(None, ge=2, description="prompt + completion tokens; null: "
                                      f"min(the model's max_position_embeddings, {DEFAULT_CONTEXT_TOKENS})")
    kv_cache_mb: float = Field(256, gt=0, description="memory for KV blocks, both layer groups together, MiB")
    enable_prefix_caching: bool = Field(True, description="reuse cached KV blocks of identical prefixes (per "
                                        "tenant unless a sharing group is set)")
    host_kv_cache_mb: float = Field(0, ge=0, description="host memory for KV blocks evicted from the device prefix "
                                    "cache (pinned on CUDA), restored on a prefix hit instead of recomputed, MiB; "
                                    "0: off (needs enable_prefix_caching)")
    dtype: TorchDType = Field("float32", validate_default=True, description="weights, activations and KV cache")
    kv_cache_dtype: Literal["auto", "fp8"] = Field("auto", description="what the KV cache stores: auto, the "
                                                   "dtype above; fp8, e4m3 with a float32 scale per token and kv "
                                                   "head (as vLLM's kv_cache_dtype=fp8), dequantised on read: about "
                                                   "half the bytes of bfloat16, a quarter of float32")
    device: str = Field("cpu", description="torch device of the model and the cache")
    cuda_graphs: bool | None = Field(None, description="replay pure-decode steps as CUDA graphs, one captured per "
                                     "decode bucket on first use; null: on when device is cuda (true elsewhere "
                                     "is refused)")
    static_decode: bool | None = Field(None, description="run pure-decode steps padded to decode_buckets on "
                                       "persistent input buffers, the shapes a CUDA graph replays; null: as "
                                       "cuda_graphs; on without graphs it runs eagerly (a check, and for debugging)")
    decode_buckets: list[Annotated[int, Field(ge=1)]] = Field(
        list(DEFAULT_DECODE_BUCKETS), min_length=1,
        description="batch sizes a pure-decode step is padded to, ascending; capped at max_num_seqs, and a "
                    "larger batch runs unpadded")
    async_scheduling: bool = Field(False, description="schedule the next step while the current step's forward "
                                   "runs (on a model thread), counting each decode's token as coming; a sequence "
                                   "that then stops wastes its next step's row, and a new request joins a step later")
    max_cuda_graphs: int = Field(64, ge=1, description="CUDA graphs kept at most, one per (batch bucket, "
                                 "key-length bucket); past it a new bucket runs the padded path eagerly")
    grammar_cache_size: int = Field(256, ge=1, description="compiled structured-output constraints kept (per "
                                    "distinct schema, regex or grammar), least recently used dropped first")
    grammar_compile_timeout_s: float = Field(5.0, gt=0, description="longest a request's constraint may take to "
                                             "compile; past it the request is refused (the compilation finishes "
                                             "in the background and is cached)")
    speculative: SpeculativeConfig | None = Field(None, description="speculative decoding: draft tokens proposed "
                                                  "by prompt lookup (ngram) or an EAGLE-3 head (eagle3) and verified "
                                                  "in one forward, the output exactly the model's; null: off")
    max_loras: int = Field(0, ge=0, description="LoRA adapters resident at once (slots of the adapter bank; more "
                           "registered ones are loaded in turn, least recently used evicted first); 0: LoRA off. "
                           "Not with static_decode / CUDA graphs, speculative or async_scheduling (null "
                           "cuda_graphs and static_decode then mean off)")
    max_lora_rank: int = Field(64, ge=1, le=64, description="highest rank of an adapter this engine accepts (the "
                               "bank's factors are this wide)")
    max_cpu_loras: int | None = Field(None, ge=1, description="LoRA adapters a replica keeps registered (loaded on "
                                      "the host, ready to take a slot); past it the least recently used one no "
                                      "request is using is dropped (and loaded again from its path when asked "
                                      "for); null: 4 x max_loras")
    micro_batches: int = Field(1, ge=1, le=8, description="split each step of two or more sequences into this "
                               "many micro-batches that ping-pong with the expert shards: one's attention runs "
                               "while another's routed rows are at the shards (the same tokens come out); 1: off. "
                               "With an EAGLE-3 head steps run whole. Not with static_decode / CUDA graphs (null "
                               "then means off)")
    context_parallel: int = Field(1, ge=1, le=64, description="trunks of the replica whose memory holds the global "
                                  "(NoPE) layers' KV of any one sequence, as one pool: a sequence may be that many "
                                  "times longer than one trunk's cache holds, its attention computed where its "
                                  "blocks are (context parallelism); 1: off. Set by the replica to its trunks; not "
                                  "with a host KV tier")
    fault_hold_s: float = Field(30, ge=0, description="how long the engine holds the sequences of steps that fail "
                                "with a retryable error (an expert shard UNAVAILABLE or past its deadline) waiting "
                                "for the experts to come back: they keep their tokens and are computed again, then "
                                "fail with UNAVAILABLE past it; 0: fail them at once (with async_scheduling a held "
                                "step's sequences are computed again from their tokens, its successor having been "
                                "scheduled on it)")
    fault_retry_interval_s: float = Field(0.2, gt=0, le=10, description="pause between retries of a failing step "
                                          "during a hold, so the engine thread does not spin on a dead shard")

    @model_validator(mode="after")
    def _check_decode_settings(self) -> Self:
        if any(b <= a for a, b in zip(self.decode_buckets, self.decode_buckets[1:], strict=False)):
            raise ValueError(f"decode_buckets must rise strictly, got {self.decode_buckets}")
        if self.cuda_graphs and torch.device(self.device).type != "cuda":
            raise ValueError(f"cuda_graphs is true but device is {self.device!r}: CUDA graphs need a cuda device "
                             "(static_decode: true runs the same padded path eagerly anywhere)")
        if self.cuda_graphs and self.static_decode is False:
            raise ValueError("cuda_graphs is true but static_decode is false: a graph replays the padded path")
        if self.speculative is not None and self.async_scheduling:
            raise ValueError("speculative decoding and async_scheduling do not run together yet: a step's drafts "
                             "come from the tokens the step before verified, which async scheduling has not seen")
        if self.context_parallel > 1 and self.host_kv_cache_bytes:
            raise ValueError("context_parallel > 1 does not run with a host KV tier (host_kv_cache_bytes): the tier "
                             "saves blocks of one trunk's memory, and shared global blocks live in several")
        if self.micro_batches > 1 and self.use_static_decode:
            raise ValueError("micro_batches > 1 does not run with static_decode / CUDA graphs yet (a captured "
                             "graph is one whole step): turn them off (static_decode: false, cuda_graphs: false) or "
                             "set micro_batches to 1")
        if self.max_loras:
            clashes = {"static_decode": self.use_static_decode, "speculative": self.speculative is not None,
                       "async_scheduling": self.async_scheduling}
            if on := [name for name, value in clashes.items() if value]:
                raise ValueError(f"max_loras > 0 (LoRA adapters) does not run with {', '.join(on)} yet (the padded "
                                 "decode path, drafts and overlapped steps do not carry adapter slots): turn them "
                                 "off (static_decode: false, cuda_graphs: false) or set max_loras to 0")
        return self

    @property
    def use_cuda_graphs(self) -> bool:
        """Whether pure-decode steps replay CUDA graphs (the setting, or by default: the device is CUDA, LoRA is off
        and steps run whole)."""
        if self.cuda_graphs is not None:
            return self.cuda_graphs
        return torch.device(self.device).type == "cuda" and not self.max_loras and self.micro_batches == 1

    @property
    def use_static_decode(self) -> bool:
        """Whether pure-decode steps take the padded static path (graphs or not)."""
        return self.static_decode if self.static_decode is not None else self.use_cuda_graphs

    @property
    def decode_batch_sizes(self) -> tuple[int, ...]:
        """decode_buckets capped at max_num_seqs: the buckets below it, then max_num_seqs itself if some
        bucket reaches it (no decode batch is larger)."""
        below = tuple(b for b in self.decode_buckets if b < self.max_num_seqs)
        return below + ((self.max_num_seqs,) if self.decode_buckets[-1] >= self.max_num_seqs else ())

    @property
    def kv_dtype(self) -> torch.dtype:
        """The torch dtype the KV cache stores (float8_e4m3fn for "fp8")."""
        return fp8_kv.FP8 if self.kv_cache_dtype == "fp8" else self.dtype

    @property
    def kv_cache_bytes(self) -> int:
        return round(self.kv_cache_mb * 2**20)

    @property
    def host_kv_cache_bytes(self) -> int:
        return round(self.host_kv_cache_mb * 2**20)

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens)

    def context_limit(self, model: TextConfig) -> int:
        return self.max_model_len or min(model.max_position_embeddings, DEFAULT_CONTEXT_TOKENS)

    def kv_layout(self, model: TextConfig, *, extra_bytes_per_block: dict[str, int] | None = None) -> KVLayout:
        """Split kv_cache_bytes between the groups (`extra_bytes_per_block`: more layers on a group's blocks, as an
        EAGLE-3 head's on the full group).

        A sequence holds as many chunked blocks as global ones until its context passes the attention
        chunk, and then at most one window (chunk/B + 1 blocks). So the chunked pool gets as many blocks
        as the global pool, but never more than every sequence's widest window plus one step's new blocks
        (`chunked_blocks_needed`): beyond that, the bytes go to the global pool. Either way one sequence of
        max_model_len must fit, or the config is refused.
        """
        sizes = bytes_per_block(model, self.block_size, self.kv_dtype)
        for group, extra in (extra_bytes_per_block or {}).items():
            sizes[group] += extra
        chunk = model.attention_chunk_size if CHUNKED in sizes else None
        blocks: dict[str, int] = {}
        context = self.context_limit(model)
        if chunk is not None:
            if chunk % self.block_size:
                raise ValueError(f"block_size {self.block_size} does not divide attention_chunk_size {chunk}")
            least = self.chunked_blocks_needed(model, sequences=1)
            if FULL in sizes:
                even = self.kv_cache_bytes // (sizes[CHUNKED] + sizes[FULL])
                blocks[CHUNKED] = max(least, min(self.chunked_blocks_needed(model, sequences=self.max_num_seqs), even))
            else:
                blocks[CHUNKED] = self.kv_cache_bytes // sizes[CHUNKED]
            if blocks[CHUNKED] * sizes[CHUNKED] > self.kv_cache_bytes or blocks[CHUNKED] < least:
                raise ValueError(f"kv_cache_bytes {self.kv_cache_bytes} is too small for the chunked layers' "
                                 f"windows ({least} blocks of {sizes[CHUNKED]} bytes for one sequence)")
        left = self.kv_cache_bytes - blocks.get(CHUNKED, 0) * sizes.get(CHUNKED, 0)
        if FULL in sizes:
            blocks[FULL] = max(0, left // sizes[FULL])
            needed = -(-context // self.block_size)
            if blocks[FULL] * self.context_parallel < needed:
                shared = f" ({self.context_parallel} trunks: {blocks[FULL] * self.context_parallel})" \
                    if self.context_parallel > 1 else ""
                raise ValueError(
                    f"kv_cache_bytes {self.kv_cache_bytes} holds {blocks[FULL]} global blocks{shared}; one sequence "
                    f"of max_model_len {context} needs {needed}"
                )
        return KVLayout(block_size=self.block_size, chunk_size=chunk, num_blocks=blocks, bytes_per_block=sizes)

    def chunked_blocks_needed(self, model: TextConfig, *, sequences: int, context_tokens: int | None = None) -> int:
        """Chunked-layer blocks that `sequences` sequences of `context_tokens` (default max_model_len) hold at
        most at once: each its widest window (its whole context while that is shorter than the chunk), plus
        the new blocks of one step crossing into a next chunk."""
        assert model.attention_chunk_size is not None
        context = context_tokens if context_tokens is not None else self.context_limit(model)
        window = min(model.attention_chunk_size // self.block_size + 1, -(-context // self.block_size))
        return sequences * window + -(-self.max_num_batched_tokens // self.block_size)
