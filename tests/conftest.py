import pytest
import torch

import qkv


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(family: str = "decoder", **overrides) -> qkv.ModelConfig:
    """A model small enough to run hundreds of times in a test."""
    base = dict(family=family, vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=96)
    return qkv.ModelConfig(**{**base, **overrides})
