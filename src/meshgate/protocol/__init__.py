"""Wire protocols: the HTTP/1.1 server side of a client connection (`h1`)."""
