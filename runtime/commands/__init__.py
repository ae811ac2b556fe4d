"""One module per `kvgraph` verb: each parses its arguments and dispatches, nothing else (main.py is the
dispatcher; the verbs are registered as entry points in pyproject.toml)."""
