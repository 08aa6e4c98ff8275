"""HTTP semantics shared by every role: the route table (`router`), RFC 9457
problem responses (`problem`), header tables built once at import
(`headers`), and the write batching both sides' connections share (`batch`)."""
