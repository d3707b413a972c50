"""The OpenAI-compatible HTTP server: `tp-engine serve MODEL` (see server.py)."""
