"""TLS for listeners and upstream pools: contexts (`context`) and the peer's
SPIFFE identity read from a verified session (`identity`)."""
