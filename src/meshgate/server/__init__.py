"""Processes: listeners and workers sharing a port (SO_REUSEPORT), signals,
graceful drain and atomic reload."""
