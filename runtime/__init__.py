"""llmc runtime: load artifacts, schedule and run generation, serve it."""
