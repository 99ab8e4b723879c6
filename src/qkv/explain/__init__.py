"""See inside a model: capture every stage on a text, draw attention maps, serve an explainer.

    cap = qkv.explain.capture(model, tokenizer, "a text")   # see capture.py
    qkv.explain.plots.grid(cap, "maps.png")                 # matplotlib (the plot extra)
    qkv explain DIR                                         # the web page (app.py)
"""

from .capture import (
           Capture,
           alignment,
           capture,
           capture_rnn,
           draw_next,
           load_model,
           next_token_probs,
)

__all__ = ["Capture", "alignment", "capture", "capture_rnn", "draw_next", "load_model",
           "next_token_probs"]
