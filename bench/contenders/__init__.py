"""The bare consumers (a), (b), (c), (e), (f): each runs alone in its own process and reports a JSON line."""
