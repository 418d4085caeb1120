"""GEMMA workflows: pure helpers for BIMBAM files, LOCO kinship, merging, permutations."""
