"""One stream per request (Envoy's `ActiveStream`): `stream.ProxyStream`
routes the head and runs the route's filters, `exchange.ProxyExchange`
proxies it upstream through `upstream.attempt` (or answers locally), and
`heads` frames what the gateway writes itself. A stream reaches its client
connection only through `protocol.api.StreamSink`."""
