"""An EAGLE-3 draft head: one Llama decoder layer fed the target's hidden states, and its loader.

Legend: T rows, H the head's width, Ht the target's width, A aux layers, N query heads, K key/value heads,
D head dim, V the target's vocabulary, Vd the draft vocabulary.

One row of the head predicts the token after the next: at position p it reads the embedding of token p + 1 beside
a hidden state, fc(the target's aux hidden states at p) [A*Ht] -> [H] for a position the target computed, or the
head's own output at p - 1 for a position it drafted itself (chained, width H already: no fc):
    residual = hidden (or hidden_norm(hidden) with norm_before_residual)
    x = cat(input_layernorm(embed), hidden_norm(hidden))                     [T, 2H]
    h = residual + o_proj(attention(q, k, v of x, rotate-half RoPE at p))    [T, H]
    out = h + mlp(post_attention_layernorm(h))                               [T, H]  (fed back when chaining)
    logits = lm_head(norm(out))                                              [T, Vd]; target id = d + d2t[d]
Attention is the caller's (over a cache, or dense): `forward` hands q, k and v to an `attend` it is given.

The checkpoint is the published layout (EAGLE's `midlayer.*`; SpecForge's `model.layers.0.*` and `model.` prefix
are read as the same names): fc.weight, midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight,
midlayer.self_attn.{q,k,v,o}_proj.weight, midlayer.mlp.{gate,up,down}_proj.weight, norm.weight, lm_head.weight,
d2t [Vd] int64, t2d [V] bool, and embed_tokens.weight when the head does not share the target's embedding.
A head that does not fit its target refuses to load with a ValueError naming what does not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from herd.model.checkpoint import Checkpoint
from herd.model.config import TextConfig, read_config_json
from herd.model.eagle3_config import Eagle3Config
from herd.model.llama4 import Llama4Model
from herd.model.mlp import FeedForward
from herd.model.norm import RMSNorm
from herd.model.rope import inv_frequencies, rotations

_OPTIONAL = ("embed_tokens.weight", "d2t", "t2d")

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""q [T, N, D], k [T, K, D], v [T, K, D] -> attention outputs [T, N, D]."""


class Eagle3Attention(nn.Module):
    """The head's attention projections; q/k/v read [T, 2H] (embedding and hidden side by side)."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(2 * config.hidden_size, heads * dim, bias=False)
        self.k_proj = nn.Linear(2 * config.hidden_size, kv_heads * dim, bias=False)
        self.v_proj = nn.Linear(2 * config.hidden_size, kv_heads * dim, bias=False)
        self.o_proj = nn.Linear(heads * dim, config.hidden_size, bias=False)


class Eagle3Layer(nn.Module):
    """The head's one decoder layer; attribute names match the checkpoint's `midlayer.*` keys."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.mlp = FeedForward(config.hidden_size, config.intermediate_size)


class Eagle3Head(nn.Module):
    """The draft head; `embed_tokens` is the target's own module when the checkpoint has none."""

    d2t: torch.Tensor
    """[Vd] int64: target id = draft id + d2t[draft id]."""
    t2d: torch.Tensor
    """[V] bool: the target ids the draft vocabulary holds."""

    def __init__(self, config: Eagle3Config, aux_layers: tuple[int, ...], target_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.aux_layers = aux_layers
        """Target layers whose entering hidden states fc reads, low to high."""
        self.fc = nn.Linear(len(aux_layers) * target_hidden_size, config.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(config.vocab_size, dtype=torch.bool))
        self.shares_embedding = False
        """embed_tokens is the target's (the checkpoint has none of its own)."""
        self._inv_freq: torch.Tensor | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    def forward(self, token_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                attend: Attend) -> torch.Tensor:
        """Rows (token p + 1 [T], hidden [T, H], position p [T]) -> the rows' outputs `out` [T, H] (pre-norm, what a
        chained row reads as its hidden). `attend` is where keys and values live: it takes q [T, N, D], k and v
        [T, K, D] (rotated at p) and returns the attention outputs [T, N, D]."""
        layer = self.midlayer
        embeds = self.embed_tokens(token_ids).to(hidden.dtype)  # [T, H]
        normed = layer.hidden_norm(hidden)
        residual = normed if self.config.norm_before_residual else hidden
        x = torch.cat([layer.input_layernorm(embeds), normed], dim=-1)  # [T, 2H]
        t, dim = x.shape[0], self.head_dim
        q = layer.self_attn.q_proj(x).view(t, -1, dim)
        k = layer.self_attn.k_proj(x).view(t, -1, dim)
        v = layer.self_attn.v_proj(x).view(t, -1, dim)
        rot = rotations(positions, self._frequencies(x.device))  # [T, D/2]
        attended = attend(rotate_half(q, rot), rotate_half(k, rot), v)  # [T, N, D]
        h = residual + layer.self_attn.o_proj(attended.reshape(t, -1))
        out: torch.Tensor = h + layer.mlp(layer.post_attention_layernorm(h))
        return out

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's aux hidden states [T, A*Ht] -> the head's hidden input [T, H]."""
        combined: torch.Tensor = self.fc(aux.to(self.fc.weight.dtype))
        return combined

    def draft_logits(self, out: torch.Tensor) -> torch.Tensor:
        """Outputs [T, H] -> float logits over the draft vocabulary [T, Vd]."""
        logits: torch.Tensor = self.lm_head(self.norm(out))
        return logits.float()

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft vocabulary ids [T] -> the target's ids [T]."""
        return draft_ids + self.d2t[draft_ids]

    def _frequencies(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = inv_frequencies(self.config.rope, self.head_dim).to(device)
        return self._inv_freq


def rotate_half(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Llama 3's RoPE (channels i and i + D/2 form a pair, unlike Llama 4's interleaved pairs): x [T, N, D] turned by
    rot [T, D/2]; computed in float32, returned in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    pairs = torch.complex(xf[..., :half], xf[..., half:]) * rot[:, None, :]  # [T, N, D/2]
    return torch.cat([pairs.real, pairs.imag], dim=-1).type_as(x)


def load_eagle3(path: str | Path, target: TextConfig, *, dtype: torch.dtype, device: str | torch.device = "cpu",
                target_embedding: nn.Embedding | None = None) -> Eagle3Head:
    """The head in `path` (config.json + safetensors), checked against the target it drafts for.

    Without an `embed_tokens.weight` of its own the head shares the target's embedding: `target_embedding` (the
    target's module) when given, else it stays unloaded for the caller to set. ValueError (naming the file and
    what does not fit) for a head of another width, vocabulary or layer count, or tensors missing, unexpected or
    of the wrong shape."""
    raw, source = read_config_json(path)
    config = Eagle3Config.from_hf(raw, source=source)
    aux_layers = _check_fit(config, target, source)
    checkpoint = Checkpoint(path)
    stored = _canonical_names(checkpoint)
    with torch.device("meta"):
        head = Eagle3Head(config, aux_layers, target.hidden_size).to(dtype)
    expected = {name: tuple(p.shape) for name, p in head.named_parameters()}
    expected |= {name: tuple(b.shape) for name, b in head.named_buffers()}
    _check_names(expected, stored, checkpoint.directory, config, target)
    shared = "embed_tokens.weight" not in stored
    if shared:  # never materialised: a vocabulary-sized table (2 GB for Maverick in bf16) the target already holds
        del head.embed_tokens
    head.to_empty(device=device)
    for name, shape in expected.items():
        if name not in stored:
            continue
        got = checkpoint.shape(stored[name])
        if got != shape:
            raise ValueError(f"{checkpoint.directory}: tensor {stored[name]!r} has shape {got}, expected {shape} "
                             f"{_meaning(name, config, target)}")
    tensors = dict(head.named_parameters()) | dict(head.named_buffers())
    with torch.no_grad():
        for name, param in tensors.items():
            if name in stored:
                param.copy_(checkpoint.tensor(stored[name]))
        if "d2t" not in stored:
            head.d2t.zero_()  # the draft vocabulary is the target's (checked in _check_names)
        if "t2d" not in stored:
            head.t2d.fill_(True)
    _check_vocab_map(head, config, checkpoint.directory)
    if shared:
        # Shared: the target's module, or a meta placeholder that fails loudly if run before the caller sets it.
        head.embed_tokens = target_embedding or nn.Embedding(config.vocab_size, config.hidden_size, device="meta")
        head.shares_embedding = True
    return head.eval()


def load_eagle3_for(path: str | Path, target: Llama4Model) -> Eagle3Head:
    """load_eagle3 for a loaded target: its dtype and device, and its embedding when the head has none."""
    return load_eagle3(path, target.config, dtype=target.lm_head.weight.dtype, device=target.device,
                       target_embedding=target.model.embed_tokens)


def _check_fit(config: Eagle3Config, target: TextConfig, source: str) -> tuple[int, ...]:
    """The aux layers, once the config's sizes fit the target's; else ValueError."""
    if config.vocab_size != target.vocab_size:
        raise ValueError(f"{source}: the head's vocab_size {config.vocab_size} does not fit the target's vocabulary "
                         f"of {target.vocab_size}")
    if config.draft_vocab_size > config.vocab_size:
        raise ValueError(f"{source}: draft_vocab_size {config.draft_vocab_size} exceeds the target's vocabulary of "
                         f"{config.vocab_size}")
    if config.target_hidden_size is not None and config.target_hidden_size != target.hidden_size:
        raise ValueError(f"{source}: the head's target_hidden_size {config.target_hidden_size} does not fit the "
                         f"target's hidden size {target.hidden_size}")
    layers = target.num_hidden_layers
    aux = config.aux_layers(layers)
    outside = [i for i in aux if not 0 <= i < layers]
    if outside:
        raise ValueError(f"{source}: aux hidden state layers {outside} are outside the target's layers "
                         f"0..{layers - 1}")
    if len(set(aux)) != len(aux):
        raise ValueError(f"{source}: aux hidden state layers {aux} repeat a layer (the target has {layers} layers; "
                         f"name them in eagle_aux_hidden_state_layer_ids)")
    return aux


def _canonical_names(checkpoint: Checkpoint) -> dict[str, str]:
    """Head parameter name -> stored name, for EAGLE's (`midlayer.*`) and SpecForge's (`model.layers.0.*`) names."""
    names: dict[str, str] = {}
    for raw in checkpoint.names():
        name = raw.removeprefix("model.")
        if name.startswith("layers.0."):
            name = "midlayer." + name.removeprefix("layers.0.")
        names[name] = raw
    return names


def _check_names(expected: dict[str, tuple[int, ...]], stored: dict[str, str], directory: Path,
                 config: Eagle3Config, target: TextConfig) -> None:
    missing = sorted(n for n in expected if n not in stored and n not in _OPTIONAL)
    if missing:
        raise ValueError(f"{directory}: the EAGLE-3 head lacks tensors {missing}")
    unexpected = sorted(stored[n] for n in stored if n not in expected)
    if unexpected:
        raise ValueError(f"{directory}: unexpected tensors {unexpected} (not part of an EAGLE-3 head)")
    if "embed_tokens.weight" not in stored and config.hidden_size != target.hidden_size:
        raise ValueError(f"{directory}: the head has no embed_tokens.weight, so it shares the target's embedding, "
                         f"but its hidden size {config.hidden_size} is not the target's {target.hidden_size}")
    if "d2t" not in stored and config.draft_vocab_size != config.vocab_size:
        raise ValueError(f"{directory}: draft_vocab_size {config.draft_vocab_size} is not the vocabulary of "
                         f"{config.vocab_size}, but the head has no d2t tensor mapping draft ids to target ids")


def _meaning(name: str, config: Eagle3Config, target: TextConfig) -> str:
    """What a tensor's expected shape follows from, for the error that refuses it."""
    if name == "fc.weight":
        return (f"(hidden_size {config.hidden_size} x {len(config.aux_layers(target.num_hidden_layers))} aux layers "
                f"times the target's hidden size {target.hidden_size})")
    if name == "lm_head.weight":
        return f"(draft_vocab_size {config.draft_vocab_size} x hidden_size {config.hidden_size})"
    if name == "d2t":
        return f"(one target offset per draft id: draft_vocab_size {config.draft_vocab_size})"
    if name == "t2d":
        return f"(one flag per target id: the target's vocabulary of {target.vocab_size})"
    if name == "embed_tokens.weight":
        return f"(the target's vocabulary of {target.vocab_size} x hidden_size {config.hidden_size})"
    return "(from the head's config.json)"


def _check_vocab_map(head: Eagle3Head, config: Eagle3Config, directory: Path) -> None:
    targets = torch.arange(config.draft_vocab_size, device=head.d2t.device) + head.d2t  # [Vd]
    outside = (targets < 0) | (targets >= config.vocab_size)
    if bool(outside.any()):
        first = int(torch.nonzero(outside)[0, 0])
        raise ValueError(f"{directory}: d2t maps draft id {first} to target id {int(targets[first])}, outside the "
                         f"target's vocabulary 0..{config.vocab_size - 1}")
