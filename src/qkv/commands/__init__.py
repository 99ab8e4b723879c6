"""Subcommands of the `qkv` command line, one module each (see qkv/cli.py)."""
