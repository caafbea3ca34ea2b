"""Causal LMs from transformers, built from a config (no hub download) or loaded from a local directory.

model = build_model(cfg.model, vocab_size=256)   # a tiny Llama by default
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from p2pfed.config import ModelConfig
from p2pfed.errors import ConfigError

__all__ = ["PRESETS", "build_model", "count_parameters"]

# hidden, layers, heads, intermediate (Llama MLP width; GPT-2 uses 4 x hidden)
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 4, 176),
    "small": (256, 4, 4, 688),
    "base": (768, 12, 12, 2048),
    "1b": (2048, 16, 16, 5504),
}


def build_model(cfg: ModelConfig, *, vocab_size: int, seed: int) -> torch.nn.Module:
    """Build the model; the same config and seed give the same initial weights on every peer."""
    torch.manual_seed(seed)
    if cfg.path is not None:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path {cfg.path!r} is not a saved transformers model (no config.json)")
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    hidden, layers, heads, inter = PRESETS[cfg.preset]
    hidden = cfg.hidden_size or hidden
    layers = cfg.num_layers or layers
    heads = cfg.num_heads or heads
    inter = cfg.intermediate_size or inter
    if hidden % heads:
        raise ConfigError(f"model.hidden_size ({hidden}) must be divisible by model.num_heads, got {heads}")
    if cfg.arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=cfg.seq_len,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        return LlamaForCausalLM(config)
    gpt2 = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_inner=4 * hidden,
        n_positions=cfg.seq_len,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(gpt2)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
