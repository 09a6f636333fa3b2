"""Herd: distributed serving of Llama 4 mixture-of-experts models for many tenants."""

__version__ = "0.1.0"
