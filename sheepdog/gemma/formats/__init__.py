"""GEMMA's input formats: BIMBAM, GN .geno, R/qtl2, trait tables by id."""
