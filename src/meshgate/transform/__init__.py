"""Body transformation for routes: `jsonmap` maps JSON bodies (a route's
`transform: ... body:` mapping, used for response shaping and API version
mediation)."""
