"""Tiled I/O: connection and API key, the result writer, the OD store, raw runs and catalog queries."""
