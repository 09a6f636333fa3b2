"""Safetensors checkpoints: layouts, canonical names, expert slices, and files that are broken."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from herd.model import Checkpoint, CheckpointError
from tests.hf_reference import build, save

EXPERTS = "model.layers.0.feed_forward.experts.gate_up_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The same reference weights saved both ways: multimodal (prefixed, sharded) and causal (flat)."""
    conditional = build("scout", 0, layout="conditional")
    root = tmp_path_factory.mktemp("ckpt")
    save(conditional, root / "conditional")
    save(conditional.language_model, root / "causal", shard_kb=100_000)
    return root


def test_both_layouts_expose_the_same_canonical_tensors(saved):
    conditional, causal = Checkpoint(saved / "conditional"), Checkpoint(saved / "causal")
    assert (saved / "conditional" / "model.safetensors.index.json").is_file()
    assert (saved / "causal" / "model.safetensors").is_file()
    text_names = {n for n in conditional.names() if n.startswith(("model.", "lm_head."))}
    assert text_names == causal.names()
    assert any(n.startswith("vision_model.") for n in conditional.names())
    for name in [*sorted(text_names)[:10], EXPERTS]:
        torch.testing.assert_close(conditional.tensor(name), causal.tensor(name), rtol=0, atol=0)


@pytest.mark.parametrize("ids", [[2, 3, 4], [0, 5, 7], [6, 1]])
def test_expert_rows_equal_the_full_tensor_sliced(saved, ids):
    checkpoint = Checkpoint(saved / "conditional")
    full = checkpoint.tensor(EXPERTS)
    torch.testing.assert_close(checkpoint.expert_rows(EXPERTS, ids), full[ids], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"experts \[8\]"):
        checkpoint.expert_rows(EXPERTS, [1, 8])


def test_missing_shard_names_the_file(saved, tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    shards = sorted((saved / "conditional").glob("*.safetensors"))
    for f in [*shards[1:], saved / "conditional" / "model.safetensors.index.json"]:
        (target / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match=shards[0].name):
        Checkpoint(target)


def test_truncated_shard_names_the_file(saved, tmp_path):
    data = (saved / "causal" / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors") as info:
        Checkpoint(tmp_path)
    assert "not a readable safetensors file" in str(info.value)


def test_index_pointing_at_a_tensor_its_shard_lacks(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "one.safetensors", "b": "one.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lacks tensor 'b'"):
        Checkpoint(tmp_path)


def test_directory_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no safetensors files"):
        Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere")


def test_loading_a_subset_of_experts_reads_only_their_bytes(tmp_path):
    """Peak resident memory grows by the slice, not by the experts tensor (checked in a fresh process).

    Tensors come back memory-mapped, so the check touches every byte of what was loaded: a loader
    that read the whole tensor and sliced it afterwards would show the full size here.
    """
    experts, hidden, inter = 16, 512, 1024  # gate_up alone: 16 * 512 * 2048 * 4 B = 64 MiB
    config = {"model_type": "llama4_text", "vocab_size": 8, "hidden_size": hidden, "intermediate_size": inter,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 128,
              "num_local_experts": experts}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(
        {
            "language_model.model.layers.0.feed_forward.experts.gate_up_proj": torch.randn(experts, hidden, 2 * inter),
            "language_model.model.layers.0.feed_forward.experts.down_proj": torch.randn(experts, inter, hidden),
        },
        str(tmp_path / "model.safetensors"),
    )
    full_bytes = experts * hidden * 3 * inter * 4  # 96 MiB
    script = textwrap.dedent(f"""
        import json, torch
        from herd.model import load_experts
        def peak_bytes():  # this process's own high-water mark (ru_maxrss would carry the parent's over exec)
            return 1024 * int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
        base = peak_bytes()
        layers = load_experts({str(tmp_path)!r}, range(3, 5), dtype=torch.bfloat16)
        weights = layers[0]
        touched = float(weights.gate_up.sum() + weights.down.sum())
        print(json.dumps({{"grew": peak_bytes() - base, "ids": weights.expert_ids,
                          "shapes": [list(weights.gate_up.shape), list(weights.down.shape)]}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["ids"] == [3, 4]
    assert result["shapes"] == [[2, hidden, 2 * inter], [2, inter, hidden]]
    slice_bytes = full_bytes * 2 // experts  # 12 MiB: mapped once, plus its bf16 copy
    assert result["grew"] < full_bytes / 2, f"peak grew {result['grew'] / 2**20:.1f} MiB"
    assert result["grew"] < 3 * slice_bytes, f"peak grew {result['grew'] / 2**20:.1f} MiB"
