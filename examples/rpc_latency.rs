//! RPC round-trip latency on this machine: a private redis-server, one
//! gateway (console adapter, output discarded) and 1,000 sequential calls of
//! `should_skip_channel_heartbeat` from a worker. Prints p50/p99/max.
//!
//! ```sh
//! cargo run --release --example rpc_latency
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use stargazer::adapters::console::ConsoleAdapter;
use stargazer::bus::Bus;
use stargazer::config::ConsumerConfig;
use stargazer::consumer::{Consumer, ConsumerParts};
use stargazer::keys::Keys;
use stargazer::redis_server::RedisServer;
use stargazer::sdk::Worker;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = RedisServer::start(std::env::var("STARGAZER_REDIS_SERVER").ok().as_deref())?;
    let bus = Bus::connect(&server.url(), Keys::new("sg", "lat")).await?;
    let gw = Consumer::start(ConsumerParts {
        bus: bus.clone(),
        adapter: Arc::new(ConsoleAdapter::with_writer(
            "lat",
            Box::new(std::io::sink()),
        )),
        settings: ConsumerConfig::default(),
        consumer_name: "gw".into(),
        cache_prefix: "sg:".into(),
        tools: Vec::new(),
    })
    .await?;
    let worker = Worker::from_bus(bus, "sg:", None);
    let args = serde_json::json!({"channel_id": "c"});
    for _ in 0..50 {
        worker
            .rpc(
                "should_skip_channel_heartbeat",
                args.clone(),
                Duration::from_secs(5),
            )
            .await?;
    }
    let mut lat = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t = Instant::now();
        worker
            .rpc(
                "should_skip_channel_heartbeat",
                args.clone(),
                Duration::from_secs(5),
            )
            .await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "rpc round trip over 1000 calls: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        ms(lat[499]),
        ms(lat[989]),
        ms(lat[999])
    );
    gw.shutdown().await;
    Ok(())
}
