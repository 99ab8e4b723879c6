"""`qkv serve`: an OpenAI-compatible HTTP server for a qkv model (see docs/serve.md).

    from qkv.serve import create_app, load_served
    app = create_app(lambda: load_served("runs/gpt"), api_key="secret")   # a FastAPI app
"""

from .app import ApiError, Served, create_app, load_served
from .engine import Engine, QueueFull, Sampling, Sequence

__all__ = ["ApiError", "Engine", "QueueFull", "Sampling", "Sequence", "Served", "create_app",
           "load_served"]
