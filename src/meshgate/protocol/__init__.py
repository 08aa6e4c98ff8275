"""Wire protocols: the HTTP/1.1 server side of a client connection (`h1`),
and header tables built once at import (`headers`)."""
