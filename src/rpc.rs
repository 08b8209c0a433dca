//! The gateway's RPC server (G9): what an `rpc_request` envelope may ask,
//! and how it is answered. Built-in methods come first; anything else is
//! passed to the adapter's own RPC methods (e.g. deleting a webhook).
//!
//! | method | args | result |
//! |---|---|---|
//! | `fetch_channel_history` | `limit` (default 10, capped at 100) | list of messages |
//! | `should_skip_channel_heartbeat` | — | boolean |
//! | `execute_tool` | `tool_name`, `tool_args`, `tool_ctx` | the tool's JSON |
//! | `list_tools` | — | the tools' manifests |

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::adapters::SharedAdapter;
use crate::tools::{Tool, ToolContext, ToolRegistry};

/// Most history messages one call returns.
pub const HISTORY_CAP: usize = 100;

/// Answers one platform's RPC requests.
pub struct RpcServer {
    platform: String,
    adapter: SharedAdapter,
    tools_dir: Option<PathBuf>,
    builtin: Vec<Arc<dyn Tool>>,
    /// Built on first use (tools are loaded lazily).
    registry: OnceCell<Result<ToolRegistry, String>>,
}

impl std::fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcServer")
            .field("platform", &self.platform)
            .field("tools_dir", &self.tools_dir)
            .finish_non_exhaustive()
    }
}

impl RpcServer {
    pub fn new(
        platform: &str,
        adapter: SharedAdapter,
        tools_dir: Option<PathBuf>,
        builtin: Vec<Arc<dyn Tool>>,
    ) -> Self {
        RpcServer {
            platform: platform.to_owned(),
            adapter,
            tools_dir,
            builtin,
            registry: OnceCell::new(),
        }
    }

    async fn registry(&self) -> Result<&ToolRegistry, String> {
        let r = self
            .registry
            .get_or_init(|| async {
                let mut reg = ToolRegistry::new();
                for t in &self.builtin {
                    reg.register(t.clone()).map_err(|e| e.to_string())?;
                }
                if let Some(dir) = self.tools_dir.clone() {
                    let loaded = tokio::task::spawn_blocking(move || {
                        let mut r = ToolRegistry::new();
                        r.load_dir(&dir).map(|n| (r, n))
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                    let (dir_reg, n) = loaded.map_err(|e| e.to_string())?;
                    tracing::info!(tools = n, "delegated tools loaded");
                    reg.merge(dir_reg);
                }
                Ok(reg)
            })
            .await;
        r.as_ref().map_err(Clone::clone)
    }

    /// Answer `method`; an error becomes the reply's `{"error": …}`.
    pub async fn answer(
        &self,
        method: &str,
        args: &Value,
        channel: Option<&str>,
    ) -> Result<Value, String> {
        let channel_arg = || {
            args.get("channel_id")
                .and_then(Value::as_str)
                .or(channel)
                .ok_or_else(|| format!("`{method}` needs a channel_id"))
        };
        match method {
            "fetch_channel_history" => {
                let limit = args.get("limit").and_then(Value::as_u64).unwrap_or(10) as usize;
                let msgs = self
                    .adapter
                    .fetch_history(channel_arg()?, limit.min(HISTORY_CAP))
                    .await
                    .map_err(|e| e.message)?;
                serde_json::to_value(msgs).map_err(|e| e.to_string())
            }
            "should_skip_channel_heartbeat" => self
                .adapter
                .should_skip_channel_heartbeat(channel_arg()?)
                .await
                .map(Value::Bool)
                .map_err(|e| e.message),
            "execute_tool" => {
                let name = args
                    .get("tool_name")
                    .and_then(Value::as_str)
                    .ok_or("`execute_tool` needs `tool_name`")?;
                let tool_args = args.get("tool_args").cloned().unwrap_or_else(|| json!({}));
                let mut ctx: ToolContext = args
                    .get("tool_ctx")
                    .cloned()
                    .map(serde_json::from_value)
                    .transpose()
                    .map_err(|e| format!("`tool_ctx` is malformed: {e}"))?
                    .unwrap_or_default();
                if ctx.platform.is_empty() {
                    ctx.platform = self.platform.clone();
                }
                if ctx.channel_id.is_empty() {
                    ctx.channel_id = channel.unwrap_or_default().to_owned();
                }
                let reg = self.registry().await?;
                reg.call(name, tool_args, &ctx)
                    .await
                    .map_err(|e| e.to_string())
            }
            "list_tools" => {
                let reg = self.registry().await?;
                serde_json::to_value(reg.manifests()).map_err(|e| e.to_string())
            }
            other => self.adapter.call(other, args).await.map_err(|e| e.message),
        }
    }
}
