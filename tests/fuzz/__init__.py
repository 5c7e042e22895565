"""Fuzz suite (issue 19): structured mutations of every input llmc reads, each case run in a worker
process under an address-space limit and a per-case time limit (see :mod:`tests.fuzz.sandbox`)."""
