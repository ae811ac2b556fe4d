"""Serving: the engines (continuous batching, one request at a time), the OpenAI-compatible HTTP app and its
request parsing, the Ray Serve deployment, the static page server. Stands on the Generator. See README.md here."""
