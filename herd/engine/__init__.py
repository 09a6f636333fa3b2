"""Inference engine: sequences, scheduler, KV cache, sampler, model runner. No Ray, no gRPC.

    from herd.engine import LLMEngine, SamplingParams
    engine = LLMEngine.from_pretrained(path)
    outputs = engine.generate(["a prompt", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0))
"""

from herd.engine.async_engine import AsyncLLMEngine
from herd.engine.config import EngineConfig
from herd.engine.errors import Code, HerdError
from herd.engine.llm_engine import LLMEngine
from herd.engine.outputs import RequestOutput
from herd.engine.sampler import TokenLogprobs
from herd.engine.sampling_params import SamplingParams

__all__ = [
    "AsyncLLMEngine", "Code", "EngineConfig", "HerdError", "LLMEngine", "RequestOutput", "SamplingParams",
    "TokenLogprobs",
]
