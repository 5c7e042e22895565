"""The reference target: llmc's NumPy interpreter behind the executor contract (the oracle of target tests)."""
