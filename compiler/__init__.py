"""llmc front end: model files to llmc's IR."""
