"""Loading int4 and FP8 checkpoints: every layout, experts by slices, ignore lists, and checkpoints that lie."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from herd.kernels import QuantizedTensor
from herd.kernels.fp8 import E4M3, quantize_fp8
from herd.model import CheckpointError, MissingExpertsError, load_config, load_experts, load_model
from herd.model.checkpoint import Checkpoint, canonical_name
from herd.model.quant.convert import quantize_checkpoint
from herd.model.quant.linear import QuantizedLinear
from herd.model.tiny import make_tiny

IDS = torch.arange(3, 19)
EXPERTS = "model.layers.{}.feed_forward.experts"
H, INTER, I_MLP, E = 128, 64, 256, 32  # the tiny maverick: hidden, expert and dense-MLP widths, experts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantised")
    source = make_tiny(root / "float", preset="maverick", seed=4)
    return {"float": source, **{s: quantize_checkpoint(source, root / s, s, progress=False) for s in ("int4", "fp8")}}


def _tensors(directory):
    """Every tensor of a checkpoint, by canonical name (the files spell them language_model.model...)."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update({canonical_name(k): v for k, v in load_file(file).items()})
    return out


def _rewrite(source, dest, tensors, config=None):
    """A copy of checkpoint `source` with these tensors (one file) and, if given, this config.json."""
    shutil.copytree(source, dest)
    for file in dest.glob("*.safetensors"):
        file.unlink()
    (dest / "model.safetensors.index.json").unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / "model.safetensors"))
    if config is not None:
        (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_converter_writes_the_published_fp8_layout_and_herds_int4(tiny):
    fp8 = Checkpoint(tiny["fp8"])
    prefix = EXPERTS.format(1)  # maverick: layer 1 is MoE
    assert f"{prefix}.gate_up_proj" not in fp8
    assert fp8.shape(f"{prefix}.5.gate_proj.weight") == (INTER, H)  # nn.Linear's [out, in]
    assert fp8.tensor(f"{prefix}.5.down_proj.weight").dtype == E4M3
    assert fp8.shape(f"{prefix}.5.down_proj.weight_scale") == (H, 1)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(fp8.tensor(q), Checkpoint(tiny["float"]).tensor(q))  # kept as stored
    int4 = Checkpoint(tiny["int4"])
    assert int4.tensor(f"{prefix}.gate_up_proj_packed").dtype == torch.uint8
    assert int4.shape(f"{prefix}.gate_up_proj_packed") == (E, H // 2, 2 * INTER)
    assert int4.shape("model.layers.0.feed_forward.gate_proj.weight_packed") == (H // 2, I_MLP)  # dense MLP
    assert load_config(tiny["fp8"]).quantization.scheme == "fp8"
    with pytest.raises(ValueError, match="already quantised"):
        quantize_checkpoint(tiny["int4"], tiny["int4"].parent / "again", "fp8", progress=False)
    with pytest.raises(ValueError, match="not empty"):
        quantize_checkpoint(tiny["float"], tiny["int4"], "fp8", progress=False)


@pytest.mark.parametrize("scheme", ["int4", "fp8"])
def test_feed_forward_weights_stay_quantised_through_a_cast(tiny, scheme):
    model = load_model(tiny[scheme], dtype=torch.bfloat16, progress=False)
    experts = model.model.layers[1].feed_forward.experts
    shared = model.model.layers[1].feed_forward.shared_expert.gate_proj
    dense = model.model.layers[0].feed_forward.down_proj
    assert experts.scheme == scheme and isinstance(shared, QuantizedLinear) and isinstance(dense, QuantizedLinear)
    stored = {torch.uint8, torch.bfloat16} if scheme == "int4" else {E4M3, torch.float32}
    assert {b.dtype for b in experts.buffers()} == stored
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    before = {n: b.clone() for n, b in model.named_buffers()}
    model.to(torch.float32)
    for name, buf in model.named_buffers():
        assert buf.dtype == before[name].dtype and torch.equal(buf.view(torch.uint8), before[name].view(torch.uint8))
    floats = sum(p.nbytes for p in load_model(tiny["float"], dtype=torch.bfloat16, progress=False).parameters())
    quantised = sum(p.nbytes for p in model.parameters()) // 2 + sum(b.nbytes for b in model.buffers())  # bf16
    assert quantised < 0.75 * floats


def test_fused_fp8_experts_load_like_the_per_expert_layout(tiny, tmp_path):
    tensors = _tensors(tiny["fp8"])
    for layer in load_config(tiny["fp8"]).text.moe_layers:
        prefix = EXPERTS.format(layer)
        for fused, projs in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            values = torch.stack([torch.cat([tensors.pop(f"{prefix}.{e}.{p}.weight") for p in projs])
                                  for e in range(E)])
            scales = torch.stack([torch.cat([tensors.pop(f"{prefix}.{e}.{p}.weight_scale") for p in projs])
                                  for e in range(E)])
            tensors[f"{prefix}.{fused}"] = values.transpose(1, 2)  # [E, in, out], as the bf16 checkpoint has it
            tensors[f"{prefix}.{fused}_scale"] = scales.transpose(1, 2)  # [E, 1, out]
    fused = _rewrite(tiny["fp8"], tmp_path / "fused", tensors)
    a = load_model(tiny["fp8"], progress=False)
    b = load_model(fused, progress=False)
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name
    torch.testing.assert_close(b.logits(IDS), a.logits(IDS), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["int4", "fp8"])
def test_experts_load_by_slices_and_compute_what_the_whole_model_does(tiny, scheme):
    full = load_model(tiny[scheme], progress=False)
    ids = [9, 2, 14]
    layers = load_experts(tiny[scheme], ids)
    assert tuple(sorted(layers)) == load_config(tiny[scheme]).text.moe_layers
    for layer, weights in layers.items():
        assert isinstance(weights.gate_up, QuantizedTensor) and weights.gate_up.scheme == scheme
        assert weights.expert_ids == (2, 9, 14) and weights.gate_up.shape == (3, H, 2 * INTER)
        held = full.model.layers[layer].feed_forward.experts
        gate_up, _ = held.weights()
        torch.testing.assert_close(weights.gate_up.dequantize(torch.float32),
                                   gate_up.dequantize(torch.float32)[[2, 9, 14]], rtol=0, atol=0)
    assert layers[1].nbytes < 3 * 3 * H * INTER * 2  # less than bf16 would take

    trunk = load_model(tiny[scheme], experts=(), progress=False)
    half = E // 2
    shards = [load_experts(tiny[scheme], range(0, half)), load_experts(tiny[scheme], range(half, E))]

    def remote(layer, rows, offsets):  # what the expert shards compute, each over its own experts
        from herd import kernels

        out = torch.empty_like(rows)
        bounds = offsets.tolist()
        for shard, first in zip(shards, (0, half), strict=True):
            w = shard[layer]
            start, end = bounds[first], bounds[first + half]
            local = offsets[first:first + half + 1] - start
            out[start:end] = kernels.experts(rows[start:end], local, w.gate_up, w.down)
        return out

    trunk.set_experts_executor(remote)
    torch.testing.assert_close(trunk.logits(IDS), full.logits(IDS), rtol=0, atol=0)
    partial = load_model(tiny[scheme], experts=[0, 1], progress=False)
    with pytest.raises(MissingExpertsError):
        partial.logits(IDS)


def test_ignored_modules_stay_float_and_stray_fp8_weights_are_dequantised(tiny, tmp_path):
    config = json.loads((tiny["fp8"] / "config.json").read_text())
    tensors = _tensors(tiny["fp8"])
    source = _tensors(tiny["float"])
    for name in [n for n in tensors if ".shared_expert." in n]:  # the shared experts kept in float...
        del tensors[name]
    tensors.update({n: t for n, t in source.items() if ".shared_expert." in n})
    config["quantization_config"]["ignore"].append("re:.*shared_expert.*")
    q = "model.layers.0.self_attn.q_proj.weight"  # ...and an attention weight stored FP8 that the list forgets
    values, scales = quantize_fp8(source[q].float().t())
    tensors[q], tensors[q + "_scale"] = values.t().contiguous(), scales.t().contiguous()
    path = _rewrite(tiny["fp8"], tmp_path / "mixed", tensors, config)
    model = load_model(path, progress=False)
    shared = model.model.layers[1].feed_forward.shared_expert.up_proj
    assert isinstance(shared, torch.nn.Linear) and torch.equal(shared.weight, source[shared_name(1)].float())
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, values.t().float() * scales.t(),
                               rtol=0, atol=0)
    assert torch.isfinite(model.logits(IDS)).all()


def shared_name(layer: int) -> str:
    return f"model.layers.{layer}.feed_forward.shared_expert.up_proj.weight"


def test_checkpoints_that_contradict_their_config(tiny, tmp_path):
    int4 = _tensors(tiny["int4"])
    prefix = EXPERTS.format(1)
    wrong_dtype = dict(int4, **{f"{prefix}.gate_up_proj_packed": int4[f"{prefix}.gate_up_proj_packed"].to(torch.int16)})
    with pytest.raises(CheckpointError, match=r"gate_up_proj_packed is torch\.int16"):
        load_model(_rewrite(tiny["int4"], tmp_path / "dtype", wrong_dtype), progress=False)
    fp8 = _tensors(tiny["fp8"])
    del fp8[f"{prefix}.3.up_proj.weight_scale"]
    with pytest.raises(CheckpointError, match=r"no tensor .*3\.up_proj\.weight_scale"):
        load_model(_rewrite(tiny["fp8"], tmp_path / "scale", fp8), progress=False)
    config = json.loads((tiny["fp8"] / "config.json").read_text())
    config["quantization_config"]["ignore"].append(f"{prefix}.3.up_proj")
    with pytest.raises(ValueError, match="some but not all experts"):
        load_model(_rewrite(tiny["fp8"], tmp_path / "mixed", _tensors(tiny["fp8"]), config), progress=False)
