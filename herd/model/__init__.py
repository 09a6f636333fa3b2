"""Llama 4: configuration, checkpoint loading, layers, tokenizer and chat template."""

from herd.model.checkpoint import Checkpoint, CheckpointError
from herd.model.config import ModelConfig, TextConfig, load_config
from herd.model.generate import greedy_decode
from herd.model.llama4 import Llama4Model
from herd.model.loader import ExpertWeights, load_experts, load_model
from herd.model.moe import ExpertsExecutor, MissingExpertsError
from herd.model.vision import VisionTower, load_vision

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ExpertWeights",
    "ExpertsExecutor",
    "Llama4Model",
    "MissingExpertsError",
    "ModelConfig",
    "TextConfig",
    "VisionTower",
    "greedy_decode",
    "load_config",
    "load_experts",
    "load_model",
    "load_vision",
]
