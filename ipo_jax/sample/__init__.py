"""Sampling: the generation engine and the instruction sets it reads."""
