"""The package version (one place; rank 0, imports nothing)."""
__version__ = '0.1.0'
