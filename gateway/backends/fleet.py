"""Every configured backend, built from ``backends:``, started and stopped with the gateway, and the routes the
pipeline reads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from gateway.backends.client import BackendClient
from gateway.backends.route import Backend, Routes
from gateway.config import BackendSettings, ConfigError


class Fleet:
    """The backends of one gateway process."""

    def __init__(
        self,
        settings: Mapping[str, BackendSettings],
        *,
        max_elements: int,
        max_bytes_elements: int,
        metered: bool,
    ) -> None:
        self.clients = [
            BackendClient(
                name, backend, max_elements=max_elements, max_bytes_elements=max_bytes_elements, metered=metered
            )
            for name, backend in settings.items()
        ]
        explicit: dict[str, Backend] = {}
        for client in self.clients:
            for model in client.settings.models:
                explicit[model] = client
        patterns: list[Backend] = [client for client in self.clients if client.settings.model_patterns]
        self.routes = Routes(self.clients, explicit, patterns)

    def check_local(self, is_local: Callable[[str], bool]) -> None:
        """A name routed to a backend and also served from the model repository is a configuration error."""
        for client in self.clients:
            for model in client.settings.models:
                if is_local(model):
                    raise ConfigError(
                        f"backends.{client.name}.models.{model}: also served from models.repository; a model name "
                        "is served locally or by one backend, never both"
                    )

    async def start(self) -> None:
        """Open every backend's channels and poll each once (a backend down does not stop the start); a start that
        fails cancels the others' before the error goes on."""
        starts = [asyncio.ensure_future(client.start()) for client in self.clients]
        try:
            await asyncio.gather(*starts)
        except BaseException:
            for start in starts:
                start.cancel()
            await asyncio.gather(*starts, return_exceptions=True)
            raise

    async def close(self) -> None:
        """Stop polling and close every channel."""
        await asyncio.gather(*(client.close() for client in self.clients))

    def ready(self) -> bool:
        """Every backend marked ``required`` is up."""
        return all(client.up for client in self.clients if client.required)
