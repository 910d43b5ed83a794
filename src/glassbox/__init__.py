"""Glassbox: the generative-AI stack, readable top to bottom."""

__version__ = "0.1.0"
