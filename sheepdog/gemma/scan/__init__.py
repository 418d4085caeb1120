"""GEMMA scans (LOCO, whole-genome, permutations) and what reads their output."""
