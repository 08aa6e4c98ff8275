"""The engine assembled from a config: loading that compiles what the schema
only shapes (`load`), and the compiled, immutable `Runtime` (`runtime`).

It sits above both the config layer (which imports nothing of the engine)
and the parts it assembles (http, filters, handlers, transform, upstream)."""
