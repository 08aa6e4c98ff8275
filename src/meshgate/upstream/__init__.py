"""The upstream layer: clusters of endpoints, load balancers, and a
keep-alive connection pool per endpoint."""
