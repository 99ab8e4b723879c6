"""Static attention maps with matplotlib (the `plot` extra): PNG or SVG.

    grid(cap, "maps.png")                      every layer x head as thumbnails
    grid(cap, "l2.svg", layer=2)               one layer's heads
    head(cap, "h.png", layer=2, head=5)        one head in full, with its tokens
    head(cap, "x.png", layer="decoder.layers.0.cross_attn", head=0)   a cross-attention

A layer is picked by its index in `cap.layers()` (the order the model ran them) or by its name.
Cross-attention maps are the source x target alignment of an encoder-decoder (Bahdanau et al.
2015, Fig. 3, shows the same picture for a recurrent model).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .capture import Capture

FORMATS = (".png", ".svg")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no window, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("attention maps need matplotlib: pip install 'qkv[plot]'") from None
    return plt


def layer_name(cap: Capture, layer: int | str) -> str:
    names = cap.layers()
    if isinstance(layer, str) and not layer.lstrip("-").isdigit():
        if layer not in names:
            raise InputError(f"no attention layer {layer!r}; the model has {', '.join(names)}")
        return layer
    i = int(layer)
    if not -len(names) <= i < len(names):
        raise InputError(f"layer {i} is outside 0..{len(names) - 1} (this model runs "
                         f"{len(names)} attention layers)")
    return names[i]


def axes_tokens(cap: Capture, name: str) -> tuple[list[str], list[str]]:
    """(query tokens, key tokens) of a map: a cross-attention's queries are the target's."""
    cross = "cross" in name or cap.family in ("alignment", "rnn")
    in_decoder = name.startswith("decoder") and cap.family == "encoder-decoder"
    queries = cap.target_tokens if (cross or in_decoder) else cap.tokens
    keys = cap.tokens if (cross or not in_decoder) else cap.target_tokens
    return queries, keys


def check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise InputError(f"{out}: the map is written as PNG or SVG; name it .png or .svg")
    if not out.parent.exists():
        raise InputError(f"{out.parent} does not exist")
    return out


def grid(cap: Capture, out: str | Path, layer: int | str | None = None) -> Path:
    """Thumbnails: a row per attention layer (or only `layer`), a column per head."""
    out = check_out(out)
    plt = _pyplot()
    names = cap.layers() if layer is None else [layer_name(cap, layer)]
    n_heads = max(cap.attention[n].shape[0] for n in names)
    fig, axes = plt.subplots(len(names), n_heads, squeeze=False,
                             figsize=(1.4 * n_heads + 1.5, 1.4 * len(names) + 0.6))
    for r, name in enumerate(names):
        maps = cap.attention[name].numpy()  # (H, Tq, Tk)
        for h in range(n_heads):
            ax = axes[r][h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h < maps.shape[0]:
                ax.imshow(maps[h], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            if r == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(_short(name), fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"attention weights ({len(cap.tokens)} tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def head(cap: Capture, out: str | Path, layer: int | str, head: int) -> Path:
    """One head in full: the query tokens down, the key tokens across, the weights as colour."""
    out = check_out(out)
    plt = _pyplot()
    name = layer_name(cap, layer)
    maps = cap.attention[name]
    if not 0 <= head < maps.shape[0]:
        raise InputError(f"head {head} is outside 0..{maps.shape[0] - 1}")
    queries, keys = axes_tokens(cap, name)
    size = max(4.0, 0.22 * max(len(queries), len(keys)) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(maps[head].numpy(), cmap="viridis", vmin=0, vmax=1,
                      interpolation="nearest")
    if max(len(queries), len(keys)) <= 80:  # beyond that labels are unreadable anyway
        ax.set_xticks(range(len(keys)), [_label(t) for t in keys], rotation=90, fontsize=7)
        ax.set_yticks(range(len(queries)), [_label(t) for t in queries], fontsize=7)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(f"{name}, head {head}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _short(name: str) -> str:
    return name.replace(".layers.", " ").replace("_attn", "").replace("attn", "self")


def _label(token: str) -> str:
    return token.replace("\n", "\\n").replace("$", r"\$")
