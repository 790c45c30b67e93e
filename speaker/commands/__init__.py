"""Subcommands of python -m speaker, one per module."""
