"""HTTP semantics shared by every role: the route table (`router`), the
request paths and path patterns it matches (`paths`), its host and header
conditions (`conditions`) and its load-time overlap checks
(`route_analysis`), RFC 9457 problem responses (`problem`), header tables
built once at import (`headers`), and the write batching both sides'
connections share (`batch`)."""
