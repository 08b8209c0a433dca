"""Python workers for Stargazer.

Stargazer carries a chat bot's outbound actions from its workers to the gateway
nodes that hold the live platform connections, through Redis Streams. This
package is the worker side::

    from stargazer_client import Worker

    async with Worker("redis://127.0.0.1:6379", "discord") as worker:
        sent = await worker.send("42", "thinking…")           # takes channel 42's next seq
        await worker.edit("42", "the answer", target_key=sent.message_key)
        history = await worker.fetch_history("42", limit=5)   # a gateway RPC
        async for event in worker.inbound("bot-1"):          # acknowledged once handled
            ...

One server, a Redis Cluster or a Sentinel-managed primary, with TLS:
:mod:`~stargazer_client.config` (``RedisConfig``, the gateway's ``[redis]`` keys).

The parts: :mod:`~stargazer_client.envelopes` (build and check an action),
:mod:`~stargazer_client.worker` (publish it, call RPCs),
:mod:`~stargazer_client.inbound` (read what users said),
:mod:`~stargazer_client.proxy` (the reference's adapter interface on top).
"""

from ._keys import DEFAULT_CACHE_PREFIX, Keys
from .config import RedisConfig, SentinelConfig
from .envelopes import Button, ButtonLike, Envelope
from .errors import ConfigError, RpcError, RpcTimeout, StargazerError
from .inbound import InboundConsumer, InboundEvent
from .proxy import ProxyPlatformAdapter
from .rpc import HistoryMessage, ToolContext
from .worker import Published, Worker

__all__ = [
    "DEFAULT_CACHE_PREFIX",
    "Button",
    "ButtonLike",
    "ConfigError",
    "Envelope",
    "HistoryMessage",
    "InboundConsumer",
    "InboundEvent",
    "Keys",
    "ProxyPlatformAdapter",
    "Published",
    "RedisConfig",
    "RpcError",
    "RpcTimeout",
    "SentinelConfig",
    "StargazerError",
    "ToolContext",
    "Worker",
]

__version__ = "0.1.0"
