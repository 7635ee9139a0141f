"""Curate instruction and preference datasets with every record accounted for."""

__version__ = "0.1.0"
