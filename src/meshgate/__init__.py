"""meshgate: an API gateway and a service mesh in one Python data plane."""

__version__ = "0.1.0"
