"""Placeholder: lands with its own issue."""
