//! A whole bot in a few lines: answer every inbound message through the
//! gateways, with typing first and a reaction after.
//!
//! ```sh
//! cargo run --example echo_bot -- redis://127.0.0.1:6379 console
//! ```

use std::time::Duration;

use stargazer::inbound::InboundEvent;
use stargazer::sdk::Worker;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let platform = args.next().unwrap_or_else(|| "console".into());
    let worker = Worker::connect(&url, "sg", &platform).await?;
    let out = worker.proxy();
    let stop = CancellationToken::new();
    let on_ctrl_c = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_ctrl_c.cancel();
    });
    worker
        .inbound("echo-bot")
        .run(
            |ev: InboundEvent| {
                let out = out.clone();
                async move {
                    let Some(text) = ev.text.filter(|_| ev.kind == "message") else {
                        return Ok(());
                    };
                    out.start_typing(&ev.channel_id, Duration::from_secs(5))
                        .await?;
                    out.send(&ev.channel_id, &format!("{} said: {text}", ev.user_name))
                        .await?;
                    if let Some(m) = &ev.message_id {
                        out.react(&ev.channel_id, m, "👀").await?;
                    }
                    Ok::<(), stargazer::adapters::AdapterError>(())
                }
            },
            stop,
        )
        .await?;
    Ok(())
}
