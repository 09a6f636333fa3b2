"""Quantised (int4, FP8) weights in the model: one module per job, imported by their own names.

- `config`: config.json's quantization_config, parsed (QuantizationConfig: which weights, which method);
- `layout`: how Herd's modules and checkpoints store int4 / FP8 weights (buffer names, shapes, dtypes);
- `linear`: QuantizedLinear, the feed-forward linear layer whose weight stays quantised;
- `swap`: swap a model's layers for the quantised ones its quantization_config asks for;
- `reader`: read a checkpoint's int4 / FP8 tensors, in any of the layouts published, into Herd's layout;
- `convert`: `herd quantize`, write an int4 or FP8 copy of a float checkpoint.

The numerics and the matmuls are herd.kernels' (int4, fp8, schemes, backend).
"""
