"""Serving: a continuous-batching engine, an OpenAI-compatible HTTP API, a web chat page and a terminal chat."""
