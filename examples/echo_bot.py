"""A whole bot in a few lines, in Python: answer every inbound message through
the gateways, with typing first and a reaction after (the twin of echo_bot.rs).

    pip install ./python
    python examples/echo_bot.py redis://127.0.0.1:6379 console
"""

import asyncio
import sys

from stargazer_client import Worker


async def main(url: str, platform: str) -> None:
    async with Worker(url, platform) as worker:
        async for event in worker.inbound("echo-bot"):
            if event.type != "message" or event.text is None:
                continue
            await worker.start_typing(event.channel_id, ttl=5)
            await worker.send(event.channel_id, f"{event.user_name} said: {event.text}")
            if event.message_id:
                await worker.react(event.channel_id, event.message_id, "👀")
            # the event is acknowledged when the loop asks for the next one


if __name__ == "__main__":
    args = sys.argv[1:]
    try:
        asyncio.run(main(args[0] if args else "redis://127.0.0.1:6379",
                         args[1] if len(args) > 1 else "console"))
    except KeyboardInterrupt:
        pass
