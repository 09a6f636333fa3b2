"""The Llama 4 text model: embeddings, decoder layers, final norm, LM head.

Legend: T tokens, H hidden, V vocab, M image tokens. The module tree mirrors the checkpoint
(`model.embed_tokens`, `model.layers.{i}...`, `model.norm`, `lm_head`), so loading is a walk over named
parameters.

Early fusion: image features (from herd.model.vision, already projected to H) replace the embeddings
of the `<|patch|>` placeholder tokens, in order, before the first decoder layer, as transformers'
masked_scatter does; the decoder then treats them like any other token.

One forward serves every caller: one sequence with the contiguous cache (or none), and the engine's mixed
batch of prefill chunks and decodes over its paged cache. The KV context decides where keys and values live;
the engine also says which rows take image features (a chunk may hold part of an image) and which rows need
logits (the last of each sampling chunk).

Host syncs (issue 20): with float experts held in this process the forward never makes the host wait for the
device. Inputs the caller made on the host move to the device first, without blocking; token ids on the host
are checked there (reading host memory makes no device wait); the MoE layers keep counts and offsets on the
device (herd.model.moe). Where a sync stays, herd.model.moe and herd.kernels.torch_moe say why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from herd.kernels.host_syncs import host_side
from herd.model.config import TextConfig
from herd.model.decoder import DecoderLayer
from herd.model.kv_cache import ContiguousKVCache, KVContext
from herd.model.lora_bank import AdapterBank, ExpertAdapterSink
from herd.model.lora_batch import LoRABatch
from herd.model.lora_config import MAX_RANK
from herd.model.micro_batch import MicroBatch
from herd.model.moe import ExpertsExecutor, MoE
from herd.model.norm import RMSNorm
from herd.model.rope import inv_frequencies, rotations


class TextModel(nn.Module):
    """Everything between token ids and the final hidden states."""

    def __init__(self, config: TextConfig, expert_ids: Sequence[int]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, expert_ids) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama4Model(nn.Module):
    """Llama 4 decoder with an LM head; one code path for Scout and Maverick."""

    def __init__(self, config: TextConfig, *, expert_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.config = config
        held = range(config.num_local_experts) if expert_ids is None else expert_ids
        self.model = TextModel(config, held)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self._inv_freq: torch.Tensor | None = None
        self.adapters: AdapterBank | None = None

    @property
    def device(self) -> torch.device:
        """Where the model's weights (and so its activations) are."""
        return self.lm_head.weight.device

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config says so (again after to_empty)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def logits(self, input_ids: torch.Tensor, *, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Full causal forward of one sequence: ids [T] (and image features [M, H]) -> float logits [T, V]."""
        return self.forward(input_ids, image_embeds=image_embeds).float()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVContext | None = None,
        *,
        image_embeds: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
        logit_rows: torch.Tensor | None = None,
        check_ids: bool = True,
        adapter_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids [T] at positions [T] -> logits [T, V] (or [L, V] for the L `logit_rows`).

        `positions` default to following what a ContiguousKVCache holds. `image_embeds` [M, H]: projected
        image features for M rows: `image_rows` [M], or by default the M placeholder tokens of input_ids, in
        order. `cache`: where attention keeps keys and values (None: these tokens attend to themselves).
        `check_ids`: raise ValueError for an id outside the vocabulary. Free for ids on the host (read there);
        ids already on an accelerator cost a host sync, so a caller whose ids are valid by construction (the
        engine's persistent decode buffers) passes False. Inputs on the host are copied to the device without
        blocking; a caller that passes pinned memory must not write it again before the step's work is done.
        `adapter_slots` [T]: each token's LoRA adapter, a slot of the bank set with set_adapter_bank (-1: the
        base model); checked like the ids (with check_ids). None: no adapter anywhere.
        """
        return self._forward(input_ids, positions, cache, image_embeds=image_embeds, image_rows=image_rows,
                             logit_rows=logit_rows, check_ids=check_ids, adapter_slots=adapter_slots)[0]

    @torch.inference_mode()
    def forward_with_aux(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVContext | None = None,
        *,
        aux_layers: Sequence[int],
        image_embeds: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
        logit_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward's logits, and the hidden states entering each of `aux_layers` (0..L-1, in the order given;
        L: after the last layer, before the final norm) for every row, side by side: [T, len(aux_layers)*H]
        (what an EAGLE-3 draft head reads)."""
        for layer in aux_layers:
            if not 0 <= layer <= self.config.num_hidden_layers:
                raise ValueError(f"aux layer {layer} is outside 0..{self.config.num_hidden_layers}")
        logits, aux = self._forward(input_ids, positions, cache, image_embeds=image_embeds, image_rows=image_rows,
                                    logit_rows=logit_rows, check_ids=True, aux_layers=tuple(aux_layers))
        assert aux is not None
        return logits, aux

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None,
        cache: KVContext | None,
        *,
        image_embeds: torch.Tensor | None,
        image_rows: torch.Tensor | None,
        logit_rows: torch.Tensor | None,
        check_ids: bool,
        aux_layers: tuple[int, ...] = (),
        adapter_slots: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, positions, rot, lora = self._enter(input_ids, positions, cache, image_embeds=image_embeds,
                                              image_rows=image_rows, adapter_slots=adapter_slots, check_ids=check_ids)
        entering: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.model.layers):
            if index in aux_layers:
                entering[index] = x
            x = layer(x, positions, rot, cache, lora)
        if self.config.num_hidden_layers in aux_layers:
            entering[self.config.num_hidden_layers] = x
        aux = torch.cat([entering[i] for i in aux_layers], dim=-1) if aux_layers else None  # [T, A*H]
        return self._logits(x, logit_rows), aux

    def _enter(self, input_ids: torch.Tensor, positions: torch.Tensor | None, cache: KVContext | None, *,
               image_embeds: torch.Tensor | None, image_rows: torch.Tensor | None,
               adapter_slots: torch.Tensor | None, check_ids: bool,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, LoRABatch | None]:
        """Checked inputs on the device, ready for the first layer: the embeddings x [T, H] with the image features
        placed, the positions [T] (by default following what a contiguous cache holds), their rotations [T, D/2],
        and the tokens' LoRA batch."""
        self._check_ids(input_ids, values=check_ids)
        lora = None if adapter_slots is None else self._lora_batch(adapter_slots, input_ids.shape[0], check_ids)
        if image_embeds is not None:
            image_rows = self._image_rows(input_ids, image_embeds, image_rows)  # [T] or [M]
        device = self.device
        # Host inputs go over first and without blocking: a blocking copy waits for all work queued before it.
        input_ids = input_ids.to(device, non_blocking=True)
        if positions is None:
            start = len(cache) if isinstance(cache, ContiguousKVCache) else 0
            positions = torch.arange(start, start + input_ids.shape[0], device=device)
        positions = positions.to(device, non_blocking=True)
        if image_rows is not None and image_embeds is not None:
            image_rows = image_rows.to(device, non_blocking=True)
            image_embeds = image_embeds.to(device, non_blocking=True)
        rot = rotations(positions, self._frequencies(device))  # [T, D/2]
        x = self.model.embed_tokens(input_ids)  # [T, H]
        if image_embeds is not None and image_rows is not None:
            x[image_rows] = image_embeds.to(x.dtype)  # [M, H] into M rows, in order
        return x, positions, rot, lora

    def _logits(self, x: torch.Tensor, logit_rows: torch.Tensor | None) -> torch.Tensor:
        """The last layer's output [T, H] -> logits [T, V], or [L, V] of the L `logit_rows`."""
        if logit_rows is not None:
            x = x[logit_rows.to(x.device, non_blocking=True)]  # [L, H]
        logits: torch.Tensor = self.lm_head(self.model.norm(x))
        return logits

    @torch.inference_mode()
    def forward_micro_batches(self, batches: Sequence[MicroBatch], *, check_ids: bool = True) -> list[torch.Tensor]:
        """forward of each micro-batch, interleaved layer by layer so that one's routed rows are at the expert shards
        while another's attention runs (herd.model.micro_batch): each micro-batch's logits [L, V]."""
        if not batches:
            raise ValueError("forward_micro_batches needs at least one micro-batch")
        states: list[tuple[torch.Tensor, torch.Tensor, KVContext | None, LoRABatch | None] | None] = []
        xs: list[torch.Tensor] = []
        for batch in batches:
            if batch.empty:  # no attention; its MoE layers send the shards no rows (herd.model.micro_batch)
                states.append(None)
                xs.append(self.model.embed_tokens.weight.new_empty(0, self.config.hidden_size))  # [0, H]
                continue
            x, positions, rot, lora = self._enter(batch.input_ids, batch.positions, batch.cache,
                                                  image_embeds=batch.image_embeds, image_rows=batch.image_rows,
                                                  adapter_slots=batch.adapter_slots, check_ids=check_ids)
            states.append((positions, rot, batch.cache, lora))
            xs.append(x)
        finishing: list[Callable[[], torch.Tensor] | None] = [None] * len(batches)
        layers: list[DecoderLayer] = list(self.model.layers)  # type: ignore[arg-type]  # a ModuleList of them
        for layer in layers:
            for i, state in enumerate(states):
                if (finish := finishing[i]) is not None:
                    xs[i] = finish()  # the last layer's rows back from the shards while the others' are out
                finishing[i] = layer.idle(xs[i], batches[i].cache) if state is None else layer.begin(xs[i], *state)
        out = []
        for finish, batch in zip(finishing, batches, strict=True):
            assert finish is not None
            out.append(self._logits(finish(), batch.logit_rows))  # [L, V]
        return out

    def new_cache(self) -> ContiguousKVCache:
        """An empty KV cache for incremental decoding of one sequence."""
        return ContiguousKVCache(self.config.num_hidden_layers)

    def set_experts_executor(self, executor: ExpertsExecutor | None) -> None:
        """Route every MoE layer's rows through `executor` (None: the experts held in this process)."""
        for layer in self.model.layers:
            if isinstance(layer.feed_forward, MoE):
                layer.feed_forward.executor = executor
        if self.adapters is not None:
            self.adapters.set_expert_sink(self._expert_sink())

    def new_adapter_bank(self, *, slots: int, max_rank: int = MAX_RANK) -> AdapterBank:
        """An empty bank of `slots` LoRA adapters for this model (its dtype, device and expert storage), which
        forward's `adapter_slots` then refer to."""
        quantized = any(isinstance(layer.feed_forward, MoE) and layer.feed_forward.experts.scheme is not None
                        for layer in self.model.layers)
        self.adapters = AdapterBank(self.config, slots=slots, max_rank=max_rank, dtype=self.lm_head.weight.dtype,
                                    device=self.device, quantized_experts=quantized, expert_sink=self._expert_sink())
        return self.adapters

    def _expert_sink(self) -> ExpertAdapterSink | None:
        """The experts executor, when it holds the routed-expert parts of adapters itself (expert shards)."""
        executors = {id(layer.feed_forward.executor): layer.feed_forward.executor for layer in self.model.layers
                     if isinstance(layer.feed_forward, MoE)}
        executor = next(iter(executors.values()), None) if len(executors) == 1 else None
        return executor if isinstance(executor, ExpertAdapterSink) else None

    def drop_adapter_bank(self) -> None:
        """Forget the adapter bank (its memory goes with it)."""
        self.adapters = None

    def _lora_batch(self, slots: torch.Tensor, tokens: int, check: bool) -> LoRABatch:
        if self.adapters is None:
            raise ValueError("adapter_slots given, but the model has no adapter bank (new_adapter_bank)")
        if not isinstance(slots, torch.Tensor) or slots.shape != (tokens,) or slots.dtype.is_floating_point:
            shape = tuple(slots.shape) if isinstance(slots, torch.Tensor) else type(slots).__name__
            raise ValueError(f"adapter_slots must be an integer tensor [{tokens}] (one per token), got {shape}")
        if check:
            with _reading(slots):
                low, high = int(slots.min()), int(slots.max())
            if low < -1 or high >= self.adapters.slots:
                raise ValueError(f"adapter_slots hold {low}..{high}; valid: -1 (the base model) and "
                                 f"0..{self.adapters.slots - 1} (the bank's slots)")
        return LoRABatch.of(self.adapters, slots)

    def _frequencies(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = inv_frequencies(self.config.rope, self.config.head_dim).to(device)
        return self._inv_freq

    def _check_ids(self, input_ids: torch.Tensor, *, values: bool) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a 1-D tensor of token ids, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integers, got dtype {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty: at least one token is needed")
        if not values:
            return
        with _reading(input_ids):
            low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary 0..{self.config.vocab_size - 1}")

    def _image_rows(self, input_ids: torch.Tensor, image_embeds: torch.Tensor,
                    image_rows: torch.Tensor | None) -> torch.Tensor:
        """Check the image features; the rows they go to: `image_rows` [M], or the placeholder mask [T]."""
        placeholder = self.config.image_token_id
        if placeholder is None:
            raise ValueError("image_embeds given, but this model has no image placeholder token (text-only config)")
        hidden = self.config.hidden_size
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 2 or image_embeds.shape[1] != hidden:
            shape = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
            raise ValueError(f"image_embeds must be [image tokens, {hidden}] (the text hidden size), got {shape}")
        if not image_embeds.dtype.is_floating_point:
            raise ValueError(f"image_embeds must be floating point, got dtype {image_embeds.dtype}")
        if image_rows is not None:
            if image_rows.shape != (image_embeds.shape[0],):
                raise ValueError(f"image_rows must be [{image_embeds.shape[0]}] (one per image_embeds row), "
                                 f"got {tuple(image_rows.shape)}")
            return image_rows
        mask = input_ids.eq(placeholder)  # [T]
        with _reading(mask):
            count = int(mask.sum())
        if count != image_embeds.shape[0]:
            raise ValueError(
                f"input_ids hold {count} image placeholder tokens (id {placeholder}) "
                f"but image_embeds has {image_embeds.shape[0]} rows"
            )
        return mask


def _reading(t: torch.Tensor) -> AbstractContextManager[None]:
    """Where the host reads `t`'s values: a tensor on the host is host data (herd.kernels.host_syncs.host_side);
    one on an accelerator is a sync, which a HostSyncGuard counts."""
    return host_side() if t.device.type == "cpu" else nullcontext()
