"""llmc targets: code generators from the optimized IR to runnable artifacts."""
