"""The version of qkv, in a module of its own so that any module may read it without importing
the package root (which imports everything)."""

__version__ = "0.1.0"
