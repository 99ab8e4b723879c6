import pytest
import torch

import qkv

# The test models are tiny: one thread is as fast as two, and two processes each spinning two
# threads on a 2-core machine slow each other down by an order of magnitude.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(family: str = "decoder", **overrides) -> qkv.ModelConfig:
    """A model small enough to run hundreds of times in a test."""
    base = dict(family=family, vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=96)
    return qkv.ModelConfig(**{**base, **overrides})
