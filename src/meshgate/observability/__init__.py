"""Metrics (and, later, traces and access logs)."""
