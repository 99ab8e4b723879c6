"""The import graph of qkv is layered: a module imports only its own layer and the ones below.

    io, errors, _version, batching, hardware   files, errors, devices: no qkv model code
    config, tokenizer, hub, chat               what a model is made from
    layers                                     the boxes of the diagram
    model, quantize                            the Transformer
    hf/ and generate; then checkpoint          weights in and out (checkpoint dispatches to hf/)
    data                                       corpora, batches, labelled text
    train                                      the loop; it knows no task
    tasks, embeddings                          objectives and jobs built on the loop
    pipelines                                  one call per task
    explain                                    capture, maps, the web explainer
    commands, cli                              the command line
    qkv (the package root)                     re-exports; nothing imports it

Every import counts: at the top of a file, inside a function, or under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: list[tuple[str, ...]] = [
    ("qkv.io", "qkv.errors", "qkv._version", "qkv.batching", "qkv.hardware"),
    ("qkv.config", "qkv.tokenizer", "qkv.vocabulary", "qkv.hub", "qkv.presets", "qkv.chat"),
    ("qkv.layers",),
    ("qkv.model", "qkv.quantize", "qkv.baselines"),
    ("qkv.hf", "qkv.generate", "qkv.seq2seq", "qkv.ensemble"),
    ("qkv.lora",),
    ("qkv.checkpoint",),
    ("qkv.data",),
    ("qkv.train",),
    ("qkv.tasks", "qkv.embeddings"),
    ("qkv.pipelines",),
    ("qkv.explain",),
    ("qkv.commands", "qkv.cli", "qkv.serve", "qkv.__main__"),
]


def level(module: str) -> float:
    """The layer of a qkv module (a package's modules share its layer); the root is the top."""
    if module == "qkv":
        return len(LAYERS)
    for number, names in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in names):
            return number
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layering.py")


def module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def qkv_imports(path: Path, src: Path = SRC) -> list[tuple[int, str]]:
    """(line, module) of every qkv module that `path` imports, wherever the import is."""
    here = module_name(path, src)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "qkv"]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qkv":
                continue
            for alias in node.names:  # `from . import presets` imports the module qkv.presets
                sub = f"{target}.{alias.name}"
                is_module = (src / Path(*sub.split("."))).is_dir() or \
                    (src / Path(*sub.split("."))).with_suffix(".py").is_file()
                found.append((node.lineno, sub if is_module else target))
    return found


FILES = sorted((SRC / "qkv").rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[module_name(p) for p in FILES])
def test_a_module_imports_only_its_own_layer_and_those_below(path):
    here = module_name(path)
    upward = [f"line {line}: {target}" for line, target in qkv_imports(path)
              if level(target) > level(here)]
    assert not upward, f"{here} (layer {level(here)}) imports a higher layer: {upward}"


def test_the_layer_test_sees_function_local_and_relative_imports(tmp_path):
    (tmp_path / "qkv" / "train").mkdir(parents=True)
    (tmp_path / "qkv" / "pipelines.py").write_text("")
    low = tmp_path / "qkv" / "io.py"  # a low module reaching up from inside a function
    low.write_text("def f():\n    from .train import loop\n    from . import pipelines\n"
                   "    import qkv.tasks.mlm\n")
    targets = [t for _, t in qkv_imports(low, tmp_path)]
    assert targets == ["qkv.train", "qkv.pipelines", "qkv.tasks.mlm"]
    assert all(level(t) > level(module_name(low, tmp_path)) for t in targets)


def test_the_training_loop_knows_no_task():
    for path in (SRC / "qkv" / "train").rglob("*.py"):
        assert not [t for _, t in qkv_imports(path) if t.startswith("qkv.tasks")], path


def test_a_layer_knows_sizes_not_the_model_config():
    """layers/ receive sizes and sub-modules; only the model builds them from a ModelConfig."""
    for path in (SRC / "qkv" / "layers").rglob("*.py"):
        assert not [t for _, t in qkv_imports(path) if t == "qkv.config"], path
