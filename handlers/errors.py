"""The pipeline's one error tree; the edge (streams) maps each branch to ack, retry or dead letter."""

from __future__ import annotations


class PipelineError(Exception):
    """Raised for any failure the pipeline knows how to classify."""


class InvalidMessageError(PipelineError):
    """Raised when a message cannot be decoded, fails its schema or is too large: never retried."""


class FatalError(PipelineError):
    """Raised when handling failed for good and a retry cannot help (e.g. a provider's 4xx)."""


class DeliveryRejectedError(FatalError):
    """Raised when a provider refuses the request itself (HTTP 4xx other than 408/429)."""


class TransientError(PipelineError):
    """Raised when a retry later may succeed (timeouts, 5xx, connection errors, open breaker)."""


class DependencyUnavailableError(TransientError):
    """Raised when a provider times out, cannot be reached or answers 5xx/408/429."""
