"""HTTP semantics shared by every role: the route table (`router`) and
RFC 9457 problem responses (`problem`)."""
