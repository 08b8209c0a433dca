//! The HTTP listener (`[http] listen`): `/healthz` answers while the process
//! is alive.

use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serve until `stop` is cancelled. Returns the bound address at once.
pub async fn serve(addr: SocketAddr, stop: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new().route("/healthz", get(|| async { "ok\n" }));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok(local)
}
