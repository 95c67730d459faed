"""Side-effect adapters chosen by settings, handed to subscribers through FastStream `Depends`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import aiohttp
from faststream import Depends

from handlers.http import new_session
from handlers.mailers import HttpMailer, LogMailer
from handlers.models import EchoModel, OpenAIModel
from handlers.ports import CompletionModel, Mailer
from streams.core.settings import Settings


@dataclass
class Adapters:
    """The process's mailer and completion model, and the HTTP session they share."""

    mailer: Mailer = field(default_factory=LogMailer)
    model: CompletionModel = field(default_factory=EchoModel)
    session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Adapters:
        """Build the adapters the settings name; HTTP ones share one pooled session (call in the running loop)."""
        adapters = cls()
        if settings.mailer == "http" or settings.llm == "openai":
            adapters.session = new_session(max(settings.mailer_timeout, settings.llm_timeout))
        if settings.mailer == "http" and adapters.session is not None:
            key = settings.mailer_api_key.get_secret_value() if settings.mailer_api_key else None
            adapters.mailer = HttpMailer(adapters.session, str(settings.mailer_url), key)
        if settings.llm == "openai" and adapters.session is not None:
            key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
            adapters.model = OpenAIModel(adapters.session, str(settings.llm_url), key)
        return adapters

    async def close(self) -> None:
        """Close the shared HTTP session."""
        if self.session is not None:
            await self.session.close()


ADAPTERS = Adapters()


def install(adapters: Adapters) -> None:
    """Make `adapters` the ones subscribers receive (tests install fakes the same way)."""
    ADAPTERS.mailer = adapters.mailer
    ADAPTERS.model = adapters.model
    ADAPTERS.session = adapters.session


# `async def`: FastDepends runs a plain `def` dependency in a worker thread, once per message.
async def get_mailer() -> Mailer:
    """The configured mailer."""
    return ADAPTERS.mailer


async def get_model() -> CompletionModel:
    """The configured completion model."""
    return ADAPTERS.model


MailerDep = Annotated[Mailer, Depends(get_mailer)]
ModelDep = Annotated[CompletionModel, Depends(get_model)]
