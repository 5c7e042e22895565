"""llmc passes: verified, timed, dumpable rewrites of the IR."""
