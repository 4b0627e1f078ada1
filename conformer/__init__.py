"""Conformer on MindSpore."""
