"""Inference engine: sequences, scheduler, KV cache, sampler, model runner. No Ray, no gRPC."""
