"""A checkpoint's `quantization_config`: which weights are int4 or FP8, read from config.json.

Two forms are understood, and anything else is refused with the reason:
- compressed-tensors FP8, as the published Maverick FP8 checkpoint has it: `format` "float-quantized",
  every config group's weights 8-bit float, per output channel ("channel"), symmetric and static, and
  input activations 8-bit float per token ("token"), dynamic.
- Herd's int4 (`quant_method` "herd", `format` "int4-grouped"), written by `herd quantize --int4`:
  symmetric, one bfloat16 scale per `group_size` inputs, two values a byte (herd.kernels.int4).

`ignore` lists the modules kept in bfloat16, compressed-tensors style: a module name, or `re:` and a
regular expression matched from the start of the name. Names are tried as Herd spells them and with the
multimodal checkpoint's `language_model.` prefix, so either spelling of the published list works.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from herd.kernels.int4 import GROUP

HERD_METHOD = "herd"
HERD_INT4_FORMAT = "int4-grouped"
_TEXT_PREFIX = "language_model."


class QuantizationConfig(BaseModel):
    """What is quantised, and how."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: Literal["int4", "fp8"] = Field(description="int4: W4A16, grouped; fp8: e4m3 W8A8, per channel")
    group_size: int = Field(GROUP, gt=0, description="int4: inputs sharing one scale")
    ignore: tuple[str, ...] = Field((), description="modules kept in bfloat16: names or 're:' patterns")

    def quantizes(self, module: str) -> bool:
        """Whether the weight of `module` (Herd's name, e.g. model.layers.0.feed_forward.shared_expert.up_proj)
        is quantised, i.e. matched by no `ignore` entry."""
        names = (module, _TEXT_PREFIX + module)
        for entry in self.ignore:
            if entry.startswith("re:"):
                if any(re.match(entry[3:], n) for n in names):
                    return False
            elif entry in names:
                return False
        return True

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> QuantizationConfig:
        """Parse config.json's quantization_config; ValueError saying what is not supported."""
        method = raw.get("quant_method")
        ignore = raw.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(e, str) for e in ignore):
            raise ValueError(f"quantization_config.ignore must be a list of module names, got {ignore!r}")
        if method == HERD_METHOD:
            if raw.get("format") != HERD_INT4_FORMAT or raw.get("bits") != 4:
                raise ValueError(f"quantization_config: Herd writes format {HERD_INT4_FORMAT!r} with bits 4, "
                                 f"got format {raw.get('format')!r}, bits {raw.get('bits')!r}")
            group = raw.get("group_size", GROUP)
            if not isinstance(group, int) or group < 2 or group % 2:
                raise ValueError(f"quantization_config.group_size must be an even integer >= 2, got {group!r}")
            return cls(scheme="int4", group_size=group, ignore=tuple(ignore))
        if method == "compressed-tensors":
            _check_fp8_groups(raw)
            return cls(scheme="fp8", ignore=tuple(ignore))
        raise ValueError(
            f"quantization_config: quant_method {method!r} is not supported; Herd loads compressed-tensors FP8 "
            f"(per-channel weights) and its own int4 (herd quantize --int4)"
        )

    def to_hf(self) -> dict[str, Any]:
        """The quantization_config this describes, as `herd quantize` writes it into config.json."""
        if self.scheme == "int4":
            return {"quant_method": HERD_METHOD, "format": HERD_INT4_FORMAT, "bits": 4, "symmetric": True,
                    "group_size": self.group_size, "ignore": list(self.ignore)}
        activations = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
        group = {"targets": ["Linear"], "input_activations": activations, "output_activations": None,
                 "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False,
                             "symmetric": True}}
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "config_groups": {"group_0": group}, "ignore": list(self.ignore)}


def _check_fp8_groups(raw: dict[str, Any]) -> None:
    """ValueError unless every config group is FP8 per-channel weights with dynamic per-token activations."""
    fmt = raw.get("format")
    if fmt != "float-quantized":
        raise ValueError(f"quantization_config: compressed-tensors format {fmt!r} is not supported; Herd loads "
                         f"'float-quantized' (FP8 e4m3)")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("quantization_config: compressed-tensors needs config_groups")
    for name, group in groups.items():
        weights = (group or {}).get("weights") or {}
        wanted = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}
        found = {k: weights.get(k) for k in wanted}
        if found != wanted or weights.get("dynamic"):
            raise ValueError(f"quantization_config: group {name!r} weights {found} are not supported; Herd "
                             f"loads static FP8 weights with one scale per output channel ({wanted})")
        acts = group.get("input_activations") or {}
        want_acts = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
        found_acts = {k: acts.get(k) for k in want_acts}
        if found_acts != want_acts:
            raise ValueError(f"quantization_config: group {name!r} input activations {found_acts} are not "
                             f"supported; Herd scales activations to FP8 per token, dynamically ({want_acts})")
