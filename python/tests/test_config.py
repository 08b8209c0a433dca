"""RedisConfig: the gateway's `[redis]` keys, and every contradiction refused
with the keys named (src/config.rs refuses the same), before any connection."""

from __future__ import annotations

from typing import Any

import pytest

from stargazer_client import ConfigError, RedisConfig, SentinelConfig, Worker

S = {"master": "sg", "urls": ["redis://127.0.0.1:26379"]}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "redis://h:1", "cluster": ["redis://h:2"]}, "redis.url and redis.cluster are both set"),
        ({"url": "redis://h:1", "sentinel": S}, "redis.sentinel takes the place of redis.url"),
        ({"cluster": ["redis://h:2"], "sentinel": S}, "redis.sentinel takes the place of redis.url"),
        ({"sentinel": {"master": "sg", "urls": []}}, "redis.sentinel needs `master`"),
        ({"sentinel": {"master": "", "urls": ["redis://h:1"]}}, "redis.sentinel needs `master`"),
        ({"sentinel": {"urls": ["redis://h:1"]}}, "redis.sentinel needs `master`"),
        ({"sentinel": {"master": "sg", "urls": ["redis://h:1"], "password": "x"}},
         r"redis.sentinel: unknown key\(s\) \['password'\]"),
        ({"sentinel": {"master": "sg", "urls": ["rediss://h:1"]}}, "redis.sentinel.urls: .* must start with redis://"),
        ({"sentinel": S, "tls_ca_file": "/ca.pem"}, "not supported with redis.sentinel yet"),
        ({"cluster": ["http://h:1"]}, "redis.cluster: `http://h:1` must start with redis:// or rediss://"),
        ({"cluster": ["unix:///tmp/r.sock"]}, "redis.cluster: .* must start with redis://"),
        ({"cluster": ["redis://h:port"]}, "redis.cluster: .* is not a Redis URL"),
        ({"cluster": ["redis://h:1/3"]}, "names a database"),
        ({"cluster": ["redis://h:1", "rediss://h:2"]}, "mix of redis:// and rediss://"),
        ({"cluster": ["redis://h:1"], "tls_ca_file": "/ca.pem"}, "is not a rediss:// URL"),
        ({"url": "redis://h:1", "tls_ca_file": "/ca.pem"}, "is not a rediss:// URL"),
        ({"url": "http://h:1"}, "redis.url: `http://h:1` must start with redis://"),
        ({"url": "rediss://h:1", "tls_cert_file": "/c.pem"}, "redis.tls_cert_file and redis.tls_key_file go together"),
        ({"url": "rediss://h:1", "tls_key_file": "/k.pem"}, "redis.tls_cert_file and redis.tls_key_file go together"),
        ({"wait_replicas": 1, "wait_timeout_ms": 0}, "redis.wait_timeout_ms must be greater than 0"),
        ({"wait_replicas": -1}, "redis.wait_replicas must be an int >= 0"),
        ({"wait_replicas": True}, "redis.wait_replicas must be an int >= 0"),
        ({"cluster": ["redis://h:1"], "wait_replicas": 1}, "redis.wait_replicas is not supported with redis.cluster"),
        ({"password_env": ""}, "redis.password_env must be a non-empty"),
    ],
)
def test_contradictions_are_refused_naming_the_keys(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RedisConfig(**kwargs)


def test_config_errors_are_value_errors_and_hide_passwords() -> None:
    with pytest.raises(ValueError) as e:
        RedisConfig(cluster=["http://gw:hunter2@h:1"])
    assert "hunter2" not in str(e.value) and "gw:***@h:1" in str(e.value)
    assert "hunter2" not in repr(RedisConfig(cluster=["redis://gw:hunter2@h:1"]))
    assert "hunter2" not in repr(RedisConfig("redis://:hunter2@h:1"))


def test_the_gateway_table_and_its_environment_forms() -> None:
    """`[redis]` as parsed from the gateway's TOML, and the comma-separated
    forms its environment overrides use (STARGAZER_REDIS_CLUSTER=a,b)."""
    c = RedisConfig.from_mapping({"cluster": ["redis://a:7000", "redis://b:7000"]})
    assert c.mode == "cluster" and c.cluster == ("redis://a:7000", "redis://b:7000")
    assert RedisConfig(cluster="redis://a:7000, redis://b:7000").cluster == c.cluster
    s = RedisConfig.from_mapping({"sentinel": S, "password_env": "P", "wait_replicas": 1})
    assert s.mode == "sentinel" and s.sentinel == SentinelConfig("sg", ["redis://127.0.0.1:26379"])
    assert SentinelConfig("sg", "redis://a:1,redis://b:2").urls == ("redis://a:1", "redis://b:2")
    assert RedisConfig().mode == "single" and RedisConfig().server_url == "redis://127.0.0.1:6379"
    with pytest.raises(ConfigError, match=r"\['cache_prefix'\] are not connection settings"):
        RedisConfig.from_mapping({"url": "redis://h:1", "cache_prefix": "sg:msg:"})
    with pytest.raises(ConfigError, match=r"\['bogus'\] are not connection settings"):
        RedisConfig.from_mapping({"bogus": 1})


def test_a_worker_refuses_what_it_cannot_connect_with() -> None:
    with pytest.raises(TypeError, match="redis must be a URL, a RedisConfig"):
        Worker(42, "p")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retry_for"):
        Worker("redis://127.0.0.1:1", "p", retry_for=-1)
