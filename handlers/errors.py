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


class ThrottledError(TransientError):
    """Raised when a provider says "not so fast" (429 or 503 with `Retry-After`): wait, not a failure.

    The message waits at least `retry_after` seconds on the broker without using an attempt, every
    worker holds the dependency back for as long, and its circuit breaker does not count it.
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
