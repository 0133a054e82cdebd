"""Timing and memory measurement."""
