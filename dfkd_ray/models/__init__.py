"""Engines and models: the teacher contract and student construction (transformers imported here)."""
