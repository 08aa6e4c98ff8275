"""The service mesh: control plane (CA, registry, push) and the proxy's side of it."""
