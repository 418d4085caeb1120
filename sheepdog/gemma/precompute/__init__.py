"""gemma-precompute: every trait of a dataset scanned, stored and served."""
