//! # Stargazer
//!
//! Carries a chat bot's outbound actions — messages, files, buttons, typing,
//! reactions, presence, RPC calls — from bot workers to the gateway nodes that
//! hold the live platform connections, through Redis Streams, and never loses,
//! duplicates or reorders one.
//!
//! The path of one envelope, module by module:
//!
//! ```text
//!  worker ── publish ──▶ sg:{P}:outbound ──▶ consumer ──▶ envelope ──▶ dispatch ──▶ adapters ──▶ platform
//!  (publish.rs)          (keys.rs)           (read, sweep,  (parse,      (lanes: order,  (null, console,
//!                                             keep fresh)   validate)    lock, retry)    webhook, matrix)
//!                                                 │                          │
//!                                                 └──────── bus ◀────────────┘  begin / commit + ack / dead-letter
//!                                                          (the only Redis code; Lua in bus/lua/)
//! ```
//!
//! - [`envelope`]: the wire format and a named reason for every bad entry.
//! - [`keys`]: every Redis key name.
//! - [`bus`]: Redis Streams and the atomic scripts (begin, commit, dead-letter, lock).
//! - [`consumer`]: per platform, the reader, the recovery sweep, keep-fresh.
//! - [`dispatch`]: per-channel lanes — sequence gate, fencing, retries — and RPCs.
//! - [`adapters`]: deliver one action to one platform.
//! - [`gateway`]: all platforms of a config, HTTP, shutdown.
//! - [`publish`]: the worker side of the stream.
//! - [`ops`], [`metrics`], [`trim`]: status, dead-letter tools, Prometheus
//!   metrics and stream trimming for operators; [`ui`], the web dashboard.

pub mod adapters;
pub mod bench;
pub mod bench_shards;
pub mod bus;
pub mod circuit;
pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod dispatch;
pub mod envelope;
pub mod gateway;
pub mod http;
pub mod inbound;
pub mod keys;
pub mod metrics;
pub mod ops;
pub mod publish;
pub mod redis_server;
pub mod rpc;
pub mod sdk;
pub mod stats;
pub mod toggles;
pub mod tools;
pub mod trim;
pub mod ui;

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
