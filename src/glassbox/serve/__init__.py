"""OpenAI-compatible HTTP server and terminal chat."""
