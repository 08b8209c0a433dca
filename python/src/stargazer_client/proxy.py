"""A drop-in for the reference platform's ``ProxyPlatformAdapter``.

Worker code written against the reference's adapter keeps its calls; only the
import changes (see ``MIGRATION.md``)::

    from stargazer_client import ProxyPlatformAdapter

    adapter = ProxyPlatformAdapter(redis, "discord")
    await adapter.send(channel_id, "hello")
    history = await adapter.fetch_history(channel_id, limit=20)

Every action is published for the gateways (strict kinds take their channel's
next ``seq``); history, heartbeat checks and delegated tools are gateway RPCs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from redis.asyncio import Redis

from ._keys import DEFAULT_CACHE_PREFIX
from .envelopes import ButtonLike
from .rpc import HistoryMessage, ToolContext
from .worker import Worker


class ProxyPlatformAdapter:
    """The reference's worker-side adapter, publishing through Stargazer.

    ``redis`` is a ``redis.asyncio.Redis``, a URL, or a :class:`Worker` (then
    ``platform`` and the keyword settings come from it). The send methods return
    the message's ``message_key``: the platform id is not known until a gateway
    sent it (it is then written there; :meth:`Worker.message_id` reads it), and an
    edit or delete may name the key instead of the id.
    """

    def __init__(
        self,
        redis: Redis | str | Worker,
        platform: str | None = None,
        *,
        prefix: str = "sg",
        secret: str | bytes | None = None,
        cache_prefix: str = DEFAULT_CACHE_PREFIX,
        rpc_timeout: float = 30.0,
        typing_ttl: float = 10.0,
    ) -> None:
        if isinstance(redis, Worker):
            if platform is not None and platform != redis.platform:
                raise ValueError(f"platform {platform!r} differs from the worker's {redis.platform!r}")
            self.worker = redis
            self._owns_worker = False
        else:
            if platform is None:
                raise ValueError("platform is required unless a Worker is given")
            self.worker = Worker(redis, platform, prefix=prefix, secret=secret, cache_prefix=cache_prefix)
            self._owns_worker = True
        self.name = self.worker.platform
        self.rpc_timeout = rpc_timeout
        self.typing_ttl = typing_ttl

    def __repr__(self) -> str:
        return f"ProxyPlatformAdapter({self.worker!r})"

    async def start(self) -> None:
        """Check that Redis answers (the gateways hold the platform connection)."""
        await self.worker.ping()

    async def stop(self) -> None:
        """Close the connections (those of a Worker passed in stay open)."""
        if self._owns_worker:
            await self.worker.aclose()

    async def __aenter__(self) -> ProxyPlatformAdapter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- actions

    async def send(
        self, channel_id: str, text: str, reply_to: str | None = None, *, message_key: str | None = None
    ) -> str | None:
        """Send a text message; returns its message_key."""
        p = await self.worker.send(channel_id, text, reply_to=reply_to, message_key=message_key)
        return p.message_key

    async def send_file(
        self,
        channel_id: str,
        data: bytes,
        filename: str = "file",
        mimetype: str = "application/octet-stream",
        caption: str | None = None,
    ) -> str | None:
        """Send a file; returns its message_key."""
        p = await self.worker.send_file(channel_id, data, filename, mimetype, text=caption)
        return p.message_key

    async def send_with_buttons(
        self, channel_id: str, text: str, buttons: Sequence[ButtonLike]
    ) -> str | None:
        """Send text with buttons; returns its message_key."""
        p = await self.worker.send_buttons(channel_id, text, buttons)
        return p.message_key

    def _is_key(self, message: str) -> bool:
        return message.startswith(self.worker.cache_prefix)

    async def edit_message(self, channel_id: str, message_id: str, text: str) -> None:
        """Edit a message, named by its platform id or by the key a send returned."""
        if self._is_key(message_id):
            await self.worker.edit(channel_id, text, target_key=message_id)
        else:
            await self.worker.edit(channel_id, text, message_id=message_id)

    async def delete_message(self, channel_id: str, message_id: str) -> None:
        """Delete a message, named by its platform id or by the key a send returned."""
        if self._is_key(message_id):
            await self.worker.delete(channel_id, target_key=message_id)
        else:
            await self.worker.delete(channel_id, message_id=message_id)

    async def start_typing(self, channel_id: str) -> None:
        """Show typing (dropped unsent after ``typing_ttl`` seconds)."""
        await self.worker.start_typing(channel_id, self.typing_ttl)

    async def stop_typing(self, channel_id: str) -> None:
        await self.worker.stop_typing(channel_id)

    async def add_reaction(self, channel_id: str, message_id: str, emoji: str) -> None:
        """React to a message. A key a send returned is first resolved to the
        platform id (waiting up to ``rpc_timeout`` for a gateway to send it)."""
        if self._is_key(message_id):
            resolved = await self.worker.message_id(message_id, wait=self.rpc_timeout)
            if resolved is None:
                raise TimeoutError(f"message {message_id!r} was not sent within {self.rpc_timeout:g} s")
            message_id = resolved
        await self.worker.react(channel_id, message_id, emoji)

    async def set_presence(self, text: str, emoji: str | None = None) -> None:
        await self.worker.set_presence(text, emoji)

    # -- gateway RPCs

    async def fetch_history(self, channel_id: str, limit: int = 10) -> list[HistoryMessage]:
        """The latest ``limit`` messages of the channel, oldest first."""
        return await self.worker.fetch_history(channel_id, limit, timeout=self.rpc_timeout)

    async def should_skip_channel_heartbeat(self, channel_id: str) -> bool:
        return await self.worker.should_skip_channel_heartbeat(channel_id, timeout=self.rpc_timeout)

    async def execute_tool(
        self,
        tool_name: str,
        tool_args: Mapping[str, Any] | None = None,
        tool_ctx: ToolContext | Mapping[str, str] | None = None,
    ) -> Any:
        """Run a delegated tool on a gateway (it runs where the platform connection is)."""
        return await self.worker.execute_tool(
            tool_name, tool_args, tool_ctx=tool_ctx, timeout=self.rpc_timeout
        )

    async def call(self, method: str, **args: Any) -> Any:
        """Any other RPC the platform's gateway adapter offers, e.g.
        ``await adapter.call("delete_egregore_webhook", guild_id=…, webhook_id=…)``."""
        return await self.worker.rpc(method, args, timeout=self.rpc_timeout)
