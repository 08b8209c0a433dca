//! Delegated tools (`execute_tool` RPCs): a registry loaded lazily from a
//! tools directory, plus tools registered from Rust through [`Tool`].
//!
//! A directory tool is a manifest `<name>.json` beside its executable:
//!
//! ```json
//! {"name": "weather", "description": "Current weather for a city",
//!  "command": "weather.sh", "timeout_ms": 5000,
//!  "parameters": {"type": "object", "required": ["city"],
//!                 "properties": {"city": {"type": "string"}}}}
//! ```
//!
//! It is run with a cleared environment (only `PATH`), its working directory
//! the tools directory, `{"args": …, "context": …}` as JSON on stdin, and must
//! print one JSON value on stdout within its timeout and the output cap.
//! Arguments are validated against `parameters` (JSON Schema) first; only
//! executables inside the tools directory can be run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::adapters::BoxFuture;

/// Most bytes a tool may print on stdout.
pub const OUTPUT_CAP: usize = 1024 * 1024;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Who asked for the tool, passed to it as `context`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ToolContext {
    pub platform: String,
    pub channel_id: String,
    pub user_id: String,
    pub user_name: String,
    pub guild_id: String,
    pub message_id: String,
}

/// Why a tool call failed; the message goes back in the RPC's `{"error": …}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ToolError {
    #[error("no tool named `{0}`")]
    Unknown(String),
    #[error("arguments of `{tool}` do not match its schema: {detail}")]
    BadArguments { tool: String, detail: String },
    #[error("tool `{tool}` did not answer within {timeout_ms} ms")]
    Timeout { tool: String, timeout_ms: u64 },
    #[error("tool `{tool}` printed more than {cap} bytes")]
    TooMuchOutput { tool: String, cap: usize },
    #[error("tool `{tool}` printed something that is not JSON: {snippet}")]
    NotJson { tool: String, snippet: String },
    #[error("tool `{tool}` failed: {detail}")]
    Failed { tool: String, detail: String },
    #[error("tools directory: {0}")]
    Load(String),
}

/// What a tool tells callers about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolManifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// JSON Schema of the arguments.
    #[serde(default = "any_object")]
    pub parameters: Value,
}

fn any_object() -> Value {
    serde_json::json!({"type": "object"})
}

/// A tool callable through `execute_tool`.
pub trait Tool: Send + Sync + std::fmt::Debug {
    fn manifest(&self) -> &ToolManifest;
    fn call<'a>(
        &'a self,
        args: Value,
        ctx: &'a ToolContext,
    ) -> BoxFuture<'a, Result<Value, ToolError>>;
}

struct Registered {
    tool: Arc<dyn Tool>,
    validator: jsonschema::Validator,
}

/// The tools a gateway offers.
#[derive(Default)]
pub struct ToolRegistry {
    tools: HashMap<String, Registered>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tools.keys()).finish()
    }
}

impl ToolRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a tool; its schema must compile.
    pub fn register(&mut self, tool: Arc<dyn Tool>) -> Result<(), ToolError> {
        let m = tool.manifest();
        let validator = jsonschema::validator_for(&m.parameters).map_err(|e| {
            ToolError::Load(format!("tool `{}` has an invalid schema: {e}", m.name))
        })?;
        self.tools
            .insert(m.name.clone(), Registered { tool, validator });
        Ok(())
    }

    /// Load every `*.json` manifest of `dir`.
    pub fn load_dir(&mut self, dir: &Path) -> Result<usize, ToolError> {
        let dir = dir
            .canonicalize()
            .map_err(|e| ToolError::Load(format!("{}: {e}", dir.display())))?;
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| ToolError::Load(format!("{}: {e}", dir.display())))?;
        let mut n = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let tool = ProcessTool::load(&dir, &path)?;
            self.register(Arc::new(tool))?;
            n += 1;
        }
        Ok(n)
    }

    /// Take every tool of `other` (its tools win on a name clash).
    pub fn merge(&mut self, other: ToolRegistry) {
        self.tools.extend(other.tools);
    }

    pub fn manifests(&self) -> Vec<ToolManifest> {
        let mut v: Vec<_> = self
            .tools
            .values()
            .map(|r| r.tool.manifest().clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Validate the arguments, then call the tool.
    pub async fn call(
        &self,
        name: &str,
        args: Value,
        ctx: &ToolContext,
    ) -> Result<Value, ToolError> {
        let r = self
            .tools
            .get(name)
            .ok_or_else(|| ToolError::Unknown(name.to_owned()))?;
        let problems: Vec<String> = r
            .validator
            .iter_errors(&args)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                }
            })
            .collect();
        if !problems.is_empty() {
            return Err(ToolError::BadArguments {
                tool: name.to_owned(),
                detail: problems.join("; "),
            });
        }
        r.tool.call(args, ctx).await
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default = "any_object")]
    parameters: Value,
    /// Executable, relative to the tools directory.
    command: String,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// A tool that is an executable in the tools directory.
#[derive(Debug)]
pub struct ProcessTool {
    manifest: ToolManifest,
    program: PathBuf,
    dir: PathBuf,
    timeout: Duration,
}

impl ProcessTool {
    fn load(dir: &Path, manifest: &Path) -> Result<Self, ToolError> {
        let text = std::fs::read_to_string(manifest)
            .map_err(|e| ToolError::Load(format!("{}: {e}", manifest.display())))?;
        let m: ManifestFile = serde_json::from_str(&text)
            .map_err(|e| ToolError::Load(format!("{}: {e}", manifest.display())))?;
        let program = dir.join(&m.command).canonicalize().map_err(|e| {
            ToolError::Load(format!(
                "{}: command `{}`: {e}",
                manifest.display(),
                m.command
            ))
        })?;
        if !program.starts_with(dir) {
            return Err(ToolError::Load(format!(
                "{}: command `{}` lies outside the tools directory",
                manifest.display(),
                m.command
            )));
        }
        Ok(ProcessTool {
            manifest: ToolManifest {
                name: m.name,
                description: m.description,
                parameters: m.parameters,
            },
            program,
            dir: dir.to_owned(),
            timeout: m
                .timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_TIMEOUT),
        })
    }

    async fn run(&self, args: Value, ctx: &ToolContext) -> Result<Value, ToolError> {
        let name = &self.manifest.name;
        let failed = |detail: String| ToolError::Failed {
            tool: name.clone(),
            detail,
        };
        let mut child = tokio::process::Command::new(&self.program)
            .current_dir(&self.dir)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| failed(format!("cannot start: {e}")))?;
        let input = serde_json::json!({"args": args, "context": ctx}).to_string();
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let work = async {
            // A tool that never reads its input must not block us.
            let _ = stdin.write_all(input.as_bytes()).await;
            drop(stdin);
            let mut out = Vec::new();
            let mut limited = (&mut stdout).take(OUTPUT_CAP as u64 + 1);
            limited
                .read_to_end(&mut out)
                .await
                .map_err(|e| failed(format!("reading its output: {e}")))?;
            if out.len() > OUTPUT_CAP {
                return Err(ToolError::TooMuchOutput {
                    tool: name.clone(),
                    cap: OUTPUT_CAP,
                });
            }
            let mut err = Vec::new();
            let _ = (&mut stderr).take(4096).read_to_end(&mut err).await;
            let status = child.wait().await.map_err(|e| failed(e.to_string()))?;
            Ok((out, err, status))
        };
        let (out, err, status) = match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(ToolError::Timeout {
                    tool: name.clone(),
                    timeout_ms: self.timeout.as_millis() as u64,
                });
            }
        };
        if !status.success() {
            let msg = String::from_utf8_lossy(&err);
            return Err(failed(format!("exited with {status}: {}", msg.trim())));
        }
        serde_json::from_slice(&out).map_err(|_| ToolError::NotJson {
            tool: name.clone(),
            snippet: String::from_utf8_lossy(&out[..out.len().min(200)]).into_owned(),
        })
    }
}

impl Tool for ProcessTool {
    fn manifest(&self) -> &ToolManifest {
        &self.manifest
    }

    fn call<'a>(
        &'a self,
        args: Value,
        ctx: &'a ToolContext,
    ) -> BoxFuture<'a, Result<Value, ToolError>> {
        Box::pin(self.run(args, ctx))
    }
}
