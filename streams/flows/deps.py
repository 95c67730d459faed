"""Side-effect adapters chosen by settings, handed to subscribers through FastStream `Depends`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import httpx
from faststream import Depends

from handlers.mailers import HttpMailer, LogMailer
from handlers.models import EchoModel, OpenAIModel
from handlers.ports import CompletionModel, Mailer
from streams.core.settings import Settings

HTTP_CONNECTIONS = 100  # per worker, shared by the mailer and the model
HTTP_KEEPALIVE = 20


@dataclass
class Adapters:
    """The process's mailer and completion model, and the HTTP client they share."""

    mailer: Mailer = field(default_factory=LogMailer)
    model: CompletionModel = field(default_factory=EchoModel)
    client: httpx.AsyncClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Adapters:
        """Build the adapters the settings name; HTTP ones share one pooled client."""
        adapters = cls()
        if settings.mailer == "http" or settings.llm == "openai":
            adapters.client = httpx.AsyncClient(
                timeout=httpx.Timeout(max(settings.mailer_timeout, settings.llm_timeout), connect=5.0),
                # httpcore scans its whole pool to place each request: a smaller pool costs less per
                # call than one connection for every message in flight (bench/io, pool shapes).
                limits=httpx.Limits(max_connections=HTTP_CONNECTIONS, max_keepalive_connections=HTTP_KEEPALIVE),
            )
        if settings.mailer == "http" and adapters.client is not None:
            key = settings.mailer_api_key.get_secret_value() if settings.mailer_api_key else None
            adapters.mailer = HttpMailer(adapters.client, str(settings.mailer_url), key)
        if settings.llm == "openai" and adapters.client is not None:
            key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
            adapters.model = OpenAIModel(adapters.client, str(settings.llm_url), key)
        return adapters

    async def close(self) -> None:
        """Close the shared HTTP client."""
        if self.client is not None:
            await self.client.aclose()


ADAPTERS = Adapters()


def install(adapters: Adapters) -> None:
    """Make `adapters` the ones subscribers receive (tests install fakes the same way)."""
    ADAPTERS.mailer = adapters.mailer
    ADAPTERS.model = adapters.model
    ADAPTERS.client = adapters.client


# `async def`: FastDepends runs a plain `def` dependency in a worker thread, once per message.
async def get_mailer() -> Mailer:
    """The configured mailer."""
    return ADAPTERS.mailer


async def get_model() -> CompletionModel:
    """The configured completion model."""
    return ADAPTERS.model


MailerDep = Annotated[Mailer, Depends(get_mailer)]
ModelDep = Annotated[CompletionModel, Depends(get_model)]
