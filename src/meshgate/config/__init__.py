"""Config: the YAML schema (`schema`), the loader that names file, line and
field in its errors (`loader`), and the compiled, immutable `Runtime`."""
