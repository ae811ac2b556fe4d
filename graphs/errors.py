"""kvgraph's own error types: user errors that the CLI prints without a traceback."""

from __future__ import annotations


class KvgraphError(ValueError):
    """A user-facing error: bad input, a bad file, a failed check. The message names the culprit."""


class ManifestError(KvgraphError):
    """kvgraph.json is missing, unreadable, from a newer format, or disagrees with its graphs."""


class ValidationError(KvgraphError):
    """The exported graphs do not match PyTorch within tolerance."""
