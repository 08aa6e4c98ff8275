"""The admin listener: health and readiness, on loopback."""
