"""TLS, on a private redis-server with a TLS port only, client certificates
required and a password: certificates made by openssl in the test."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis

from servers import TlsServer
from stargazer_client import ConfigError, Envelope, RedisConfig, Worker

ENV = "SG_TEST_REDIS_PASSWORD"


@pytest.fixture(scope="module")
def tls() -> Iterator[TlsServer]:
    s = TlsServer()
    yield s
    s.stop()


def cfg(s: TlsServer, url: str | None = None, **kw: str) -> RedisConfig:
    files = {"tls_ca_file": s.ca, "tls_cert_file": s.cert, "tls_key_file": s.key}
    files.update(kw)
    return RedisConfig(url or s.url, password_env=ENV, **files)


async def test_a_worker_publishes_and_reads_over_tls(tls: TlsServer, platform: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """CA file, client certificate and a password from the environment (which
    wins over a wrong one in the URL); nothing else listens but the TLS port."""
    monkeypatch.setenv(ENV, tls.password)
    url = f"rediss://:wrong@127.0.0.1:{tls.port}"
    async with Worker(cfg(tls, url), platform) as w:
        await w.ping()
        sent = await w.send("c", "over tls")
        await w.publish_many([Envelope.message("c", "batch")])
        plain = tls.client()
        try:
            plain.xadd(w.keys.inbound, {"payload": json.dumps(
                {"type": "message", "channel_id": "c", "text": "hi"}).encode()})
            async for ev in w.inbound("py-bot", block=1.0):
                assert ev.text == "hi"
                break
            got = [json.loads(f[b"payload"]) for _, f in plain.xrange(w.keys.outbound)]
            assert [(g["text"], g["seq"]) for g in got] == [("over tls", 1), ("batch", 2)]
            assert got[0]["message_key"] == sent.message_key
            assert "***" in repr(RedisConfig(url)) and "wrong" not in repr(w)
        finally:
            plain.close()


async def test_a_wrong_ca_is_refused_without_retrying(tls: TlsServer, platform: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, tls.password)
    start = time.monotonic()
    async with Worker(cfg(tls, tls_ca_file=tls.other_ca), platform) as w:
        with pytest.raises(redis.exceptions.ConnectionError, match="(?i)certificate"):
            await w.send("c", "never")
    assert time.monotonic() - start < 10  # not retried for retry_for (30 s)


async def test_without_a_client_certificate_the_server_refuses(tls: TlsServer, platform: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, tls.password)
    config = RedisConfig(tls.url, tls_ca_file=tls.ca, password_env=ENV)
    async with Worker(config, platform, retry_for=1.0) as w:
        with pytest.raises((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            await w.send("c", "never")


async def test_a_wrong_password_is_refused_without_retrying(tls: TlsServer, platform: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "not-it")
    start = time.monotonic()
    async with Worker(cfg(tls), platform) as w:
        with pytest.raises(redis.exceptions.AuthenticationError):
            await w.send("c", "never")
    assert time.monotonic() - start < 10


def test_an_unset_password_env_is_refused_at_connect(tls: TlsServer, platform: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ConfigError, match=f"redis.password_env names `{ENV}`"):
        Worker(cfg(tls), platform)


def test_an_unreadable_tls_file_is_refused_at_connect(tls: TlsServer, platform: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, tls.password)
    with pytest.raises(ConfigError, match="redis.tls_ca_file: cannot read `/nonexistent/ca.pem`"):
        Worker(cfg(tls, tls_ca_file="/nonexistent/ca.pem"), platform)
