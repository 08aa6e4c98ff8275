"""The sidecar: meshgate next to one service instance (`meshgate sidecar`)."""
