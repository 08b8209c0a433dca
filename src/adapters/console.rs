//! The console adapter: prints each action as one readable line (to stdout, or
//! to any writer, so tests can capture it). For trying Stargazer out without a
//! platform.

use std::collections::{HashMap, VecDeque};
use std::fmt::{self, Write as _};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use super::{Adapter, AdapterError, BoxFuture, Capabilities, Delivered, Delivery, HistoryMessage};
use crate::inbound::{InboundEvent, InboundPublisher};

/// Messages kept per channel for `fetch_channel_history`.
const HISTORY_KEPT: usize = 200;
use crate::envelope::{Action, Button, Envelope};

/// Prints one line per action, such as `[hook] #c1 message (seq 3): hello`.
/// Messages, files and buttons get synthetic ids (`console-1`, …).
pub struct ConsoleAdapter {
    platform: String,
    out: Mutex<Box<dyn Write + Send>>,
    next_id: AtomicU64,
    /// What was said in each channel, by the bot and by the console's user.
    history: Mutex<HashMap<String, VecDeque<HistoryMessage>>>,
}

impl fmt::Debug for ConsoleAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleAdapter")
            .field("platform", &self.platform)
            .finish_non_exhaustive()
    }
}

impl ConsoleAdapter {
    /// A console adapter for `platform` printing to stdout.
    pub fn stdout(platform: &str) -> Self {
        Self::with_writer(platform, Box::new(std::io::stdout()))
    }

    /// A console adapter for `platform` printing to `writer`.
    pub fn with_writer(platform: &str, writer: Box<dyn Write + Send>) -> Self {
        Self {
            platform: platform.to_owned(),
            out: Mutex::new(writer),
            next_id: AtomicU64::new(0),
            history: Mutex::new(HashMap::new()),
        }
    }

    fn remember(&self, channel: &str, m: HistoryMessage) {
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let q = h.entry(channel.to_owned()).or_default();
        if q.len() == HISTORY_KEPT {
            q.pop_front();
        }
        q.push_back(m);
    }

    /// Read typed lines as inbound messages from a user: `#channel text`, or
    /// just `text` for channel `console`. Each is published to the platform's
    /// inbound stream and kept in the channel's history. Runs until `input` ends.
    pub async fn read_input(
        self: Arc<Self>,
        input: impl AsyncBufRead + Unpin,
        inbound: InboundPublisher,
    ) {
        let mut lines = input.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (channel, text) = match line.strip_prefix('#').and_then(|r| r.split_once(' ')) {
                Some((c, t)) => (c.to_owned(), t.trim().to_owned()),
                None => ("console".to_owned(), line.to_owned()),
            };
            let n = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
            let mut ev = InboundEvent::message(&self.platform, &channel, "you", &text);
            ev.message_id = Some(format!("console-in-{n}"));
            self.remember(
                &channel,
                HistoryMessage {
                    user_id: "you".into(),
                    user_name: "you".into(),
                    text,
                    timestamp: crate::now_ms() as f64 / 1000.0,
                    message_id: format!("console-in-{n}"),
                    is_bot: false,
                    reply_to_id: None,
                    reactions: Vec::new(),
                },
            );
            if let Err(e) = inbound.publish(&ev).await {
                tracing::warn!(error = %e, "could not publish a typed line to the inbound stream");
            }
        }
    }

    fn write_line(&self, line: &str) -> std::io::Result<()> {
        // A panic while holding the lock leaves the writer usable.
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        out.flush()
    }
}

/// The one-line description of `envelope` for `platform`.
fn describe(platform: &str, envelope: &Envelope, delivery_target: Option<&str>) -> String {
    let mut line = format!("[{platform}]");
    if let Some(channel) = &envelope.channel_id {
        let _ = write!(line, " #{}", one_line(&channel.0));
    }
    let seq = match envelope.seq {
        Some(n) => format!(" (seq {n})"),
        None => String::new(),
    };
    let _ = match &envelope.action {
        Action::Message {
            text,
            reply_to,
            buttons,
        } => {
            let reply = match reply_to {
                Some(m) => format!(" reply to {}", one_line(m)),
                None => String::new(),
            };
            let buttons = if buttons.is_empty() {
                String::new()
            } else {
                format!(" {}", button_list(buttons))
            };
            write!(line, " message{seq}{reply}: {}{buttons}", one_line(text))
        }
        Action::File {
            data,
            filename,
            mimetype,
            text,
        } => {
            let _ = write!(
                line,
                " file{seq} {} ({}, {} bytes)",
                one_line(filename),
                one_line(mimetype),
                data.len()
            );
            match text {
                Some(t) => write!(line, ": {}", one_line(t)),
                None => Ok(()),
            }
        }
        Action::Buttons { text, buttons } => write!(
            line,
            " buttons{seq}: {} {}",
            one_line(text),
            button_list(buttons)
        ),
        Action::StartTyping => write!(line, " typing…"),
        Action::StopTyping => write!(line, " stopped typing"),
        Action::Reaction { message_id, emoji } => write!(
            line,
            " reaction {} on {}",
            one_line(emoji),
            one_line(message_id)
        ),
        Action::Presence { text, emoji } => match (emoji, text) {
            (None, None) => write!(line, " presence cleared"),
            (Some(e), None) => write!(line, " presence: {}", one_line(e)),
            (None, Some(t)) => write!(line, " presence: {}", one_line(t)),
            (Some(e), Some(t)) => write!(line, " presence: {} {}", one_line(e), one_line(t)),
        },
        Action::Rpc { method, .. } => write!(line, " rpc {}", one_line(method)),
        Action::Edit { text, .. } => write!(
            line,
            " edit{seq} of {}: {}",
            one_line(delivery_target.unwrap_or("?")),
            one_line(text)
        ),
        Action::Delete { .. } => write!(
            line,
            " delete{seq} of {}",
            one_line(delivery_target.unwrap_or("?"))
        ),
        Action::InteractionResponse(r) => write!(
            line,
            " interaction_response {} to {}: {}",
            r.kind.as_str(),
            one_line(&r.interaction_id),
            one_line(r.text.as_deref().unwrap_or(""))
        ),
    };
    line
}

/// `[Yes|No]`; link buttons show their target: `[Docs → https://…]`.
fn button_list(buttons: &[Button]) -> String {
    let labels: Vec<String> = buttons
        .iter()
        .map(|b| match &b.url {
            Some(url) => format!("{} → {}", one_line(&b.label), one_line(url)),
            None => one_line(&b.label),
        })
        .collect();
    format!("[{}]", labels.join("|"))
}

/// `s` with control characters (newlines, tabs, …) escaped, so every action
/// stays on one line.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl Adapter for ConsoleAdapter {
    fn kind(&self) -> &'static str {
        "console"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    fn deliver<'a>(
        &'a self,
        delivery: Delivery<'a>,
    ) -> BoxFuture<'a, Result<Delivered, AdapterError>> {
        Box::pin(async move {
            let line = describe(&self.platform, delivery.envelope, delivery.target);
            self.write_line(&line).map_err(|e| {
                AdapterError::transient(format!("could not write to the console: {e}"))
            })?;
            let message_id = match delivery.envelope.action {
                Action::Message { .. } | Action::File { .. } | Action::Buttons { .. } => {
                    let n = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
                    Some(format!("console-{n}"))
                }
                _ => None,
            };
            if let (Some(id), Some(channel)) = (&message_id, &delivery.envelope.channel_id) {
                let text = match &delivery.envelope.action {
                    Action::Message { text, .. } | Action::Buttons { text, .. } => text.clone(),
                    Action::File { filename, text, .. } => {
                        text.clone().unwrap_or_else(|| filename.clone())
                    }
                    _ => String::new(),
                };
                let reply_to = match &delivery.envelope.action {
                    Action::Message { reply_to, .. } => reply_to.clone(),
                    _ => None,
                };
                self.remember(
                    &channel.0,
                    HistoryMessage {
                        user_id: "bot".into(),
                        user_name: "bot".into(),
                        text,
                        timestamp: crate::now_ms() as f64 / 1000.0,
                        message_id: id.clone(),
                        is_bot: true,
                        reply_to_id: reply_to,
                        reactions: Vec::new(),
                    },
                );
            }
            Ok(Delivered { message_id })
        })
    }

    fn fetch_history<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<HistoryMessage>, AdapterError>> {
        Box::pin(async move {
            let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            let q = h.get(channel).cloned().unwrap_or_default();
            let skip = q.len().saturating_sub(limit);
            Ok(q.into_iter().skip(skip).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::envelope::{ParseRules, StreamId, parse_entry};

    /// A writer whose output the test can read back.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("capture lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("capture lock").clone()).expect("utf-8")
        }
    }

    fn envelope(json: &str) -> Envelope {
        let rules = ParseRules {
            max_payload_bytes: 1 << 16,
            signing_secret: None,
            cache_prefix: "sg:msg:".into(),
            own_prefixes: vec!["sg:{".into(), "sg:gateway:".into()],
            reply_prefix: "sg:{p}:rpc:reply:".into(),
        };
        let mut fields = HashMap::new();
        fields.insert("payload".to_owned(), json.as_bytes().to_vec());
        parse_entry(&fields, &rules).result.expect("valid envelope")
    }

    async fn deliver(adapter: &ConsoleAdapter, json: &str) -> Option<String> {
        let env = envelope(json);
        let id = StreamId("1-0".into());
        adapter
            .deliver(Delivery {
                platform: "hook",
                stream_id: &id,
                envelope: &env,
                idempotency_key: "k",
                attempt: 1,
                resend: false,
                target: None,
            })
            .await
            .expect("console delivery")
            .message_id
    }

    #[tokio::test]
    async fn prints_one_readable_line_per_action() {
        let cap = Capture::default();
        let a = ConsoleAdapter::with_writer("hook", Box::new(cap.clone()));
        let m = deliver(&a, r#"{"channel_id":"c1","text":"hello","seq":3}"#).await;
        assert_eq!(m.as_deref(), Some("console-1"));
        let f = deliver(
            &a,
            r#"{"type":"file","channel_id":"c1","file_data":"aGVsbG8=","filename":"report.pdf","mimetype":"application/pdf"}"#,
        )
        .await;
        assert_eq!(f.as_deref(), Some("console-2"));
        deliver(
            &a,
            r#"{"type":"buttons","channel_id":"c1","text":"pick one","buttons":[{"label":"Yes","custom_id":"y"},{"label":"No","custom_id":"n"}]}"#,
        )
        .await;
        assert_eq!(
            deliver(&a, r#"{"type":"typing","channel_id":"c1"}"#).await,
            None
        );
        deliver(&a, r#"{"type":"stop_typing","channel_id":"c1"}"#).await;
        deliver(
            &a,
            r#"{"type":"reaction","channel_id":"c1","message_id":"m-1","emoji":"👍"}"#,
        )
        .await;
        deliver(&a, r#"{"type":"presence","text":"text"}"#).await;
        deliver(&a, r#"{"type":"presence"}"#).await;
        deliver(
            &a,
            r#"{"channel_id":"c1","text":"two\nlines","reply_to":"m-0"}"#,
        )
        .await;
        let expected = [
            "[hook] #c1 message (seq 3): hello",
            "[hook] #c1 file report.pdf (application/pdf, 5 bytes)",
            "[hook] #c1 buttons: pick one [Yes|No]",
            "[hook] #c1 typing…",
            "[hook] #c1 stopped typing",
            "[hook] #c1 reaction 👍 on m-1",
            "[hook] presence: text",
            "[hook] presence cleared",
            r"[hook] #c1 message reply to m-0: two\nlines",
        ];
        assert_eq!(cap.text(), format!("{}\n", expected.join("\n")));
        assert_eq!(a.kind(), "console");
    }

    #[tokio::test]
    async fn a_failing_writer_is_a_transient_error() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let a = ConsoleAdapter::with_writer("hook", Box::new(Broken));
        let env = envelope(r#"{"channel_id":"c1","text":"hello"}"#);
        let id = StreamId("1-0".into());
        let err = a
            .deliver(Delivery {
                platform: "hook",
                stream_id: &id,
                envelope: &env,
                idempotency_key: "k",
                attempt: 1,
                resend: false,
                target: None,
            })
            .await
            .expect_err("writer fails");
        assert_eq!(err.retry, super::super::Retry::Backoff);
        assert!(err.message.contains("console"), "{}", err.message);
    }
}
