"""Imports every built-in pass so that it registers itself."""
