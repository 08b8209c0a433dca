//! The worker side and the RPC bridge: request/reply for every method,
//! delegated tools, the proxy adapter, and inbound events.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Recorder, Rig, fast};
use serde_json::{Value, json};
use stargazer::adapters::console::ConsoleAdapter;
use stargazer::inbound::{InboundEvent, InboundPublisher};
use stargazer::sdk::{RpcError, Worker};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(10);

fn tool(dir: &Path, name: &str, script: &str, manifest: Value) {
    let exe = dir.join(format!("{name}.sh"));
    std::fs::write(&exe, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut m = manifest;
    m["name"] = name.into();
    m["command"] = format!("{name}.sh").into();
    std::fs::write(dir.join(format!("{name}.json")), m.to_string()).unwrap();
}

fn tools_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    tool(
        d.path(),
        "echo",
        "cat",
        json!({"description": "returns its input"}),
    );
    tool(
        d.path(),
        "weather",
        r#"printf '{"city":"%s","home":"%s"}' "$(sed 's/.*"city":"\([^"]*\)".*/\1/')" "$HOME""#,
        json!({"description": "weather for a city", "parameters": {
            "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}),
    );
    tool(
        d.path(),
        "slow",
        "sleep 5; echo '{}'",
        json!({"timeout_ms": 200}),
    );
    tool(d.path(), "garbage", "echo 'this is not json'", json!({}));
    d
}

struct Bridge {
    rig: Rig,
    worker: Worker,
    console: Arc<ConsoleAdapter>,
    gw: stargazer::consumer::Consumer,
    _tools: tempfile::TempDir,
}

async fn bridge() -> Bridge {
    let rig = Rig::new().await;
    let tools = tools_dir();
    let console = Arc::new(ConsoleAdapter::with_writer("t", Box::new(std::io::sink())));
    let mut s = fast();
    s.tools_dir = Some(tools.path().to_string_lossy().into_owned());
    let gw = rig.start("gw", console.clone(), s).await;
    let worker = Worker::from_bus(rig.bus.clone(), "sg:msg:", None);
    Bridge {
        rig,
        worker,
        console,
        gw,
        _tools: tools,
    }
}

#[tokio::test]
async fn history_and_heartbeat_round_trip() {
    let b = bridge().await;
    let out = b.worker.proxy();
    out.send("c1", "first").await.unwrap();
    out.reply("c1", "console-1", "second").await.unwrap();
    b.rig.drained(T).await;
    let h = b
        .worker
        .rpc(
            "fetch_channel_history",
            json!({"channel_id": "c1", "limit": 10}),
            T,
        )
        .await
        .unwrap();
    let h = h.as_array().unwrap();
    assert_eq!(h.len(), 2);
    for field in [
        "user_id",
        "user_name",
        "text",
        "timestamp",
        "message_id",
        "is_bot",
        "reply_to_id",
        "reactions",
    ] {
        assert!(
            h[0].get(field).is_some(),
            "history message lacks `{field}`: {}",
            h[0]
        );
    }
    assert_eq!(h[1]["text"], "second");
    assert_eq!(h[1]["reply_to_id"], "console-1");
    assert_eq!(h[1]["is_bot"], true);
    let one = b
        .worker
        .rpc_on(Some("c1"), "fetch_channel_history", json!({"limit": 1}), T)
        .await
        .unwrap();
    assert_eq!(one.as_array().unwrap().len(), 1, "limit honoured");
    let skip = b
        .worker
        .rpc_on(Some("c1"), "should_skip_channel_heartbeat", json!({}), T)
        .await
        .unwrap();
    assert_eq!(skip, json!(false));
    let _ = &b.console;
    b.gw.shutdown().await;
}

#[tokio::test]
async fn tools_run_with_context_validated_arguments_and_a_cleared_environment() {
    let b = bridge().await;
    let r = b
        .worker
        .rpc(
            "execute_tool",
            json!({"tool_name": "echo", "tool_args": {"x": 1},
                   "tool_ctx": {"channel_id": "c9", "user_id": "u1", "user_name": "ada"}}),
            T,
        )
        .await
        .unwrap();
    assert_eq!(r["args"], json!({"x": 1}));
    assert_eq!(r["context"]["user_name"], "ada");
    assert_eq!(r["context"]["platform"], b.rig.keys.platform());
    let w = b
        .worker
        .rpc(
            "execute_tool",
            json!({"tool_name": "weather", "tool_args": {"city": "Oslo"}}),
            T,
        )
        .await
        .unwrap();
    assert_eq!(
        w,
        json!({"city": "Oslo", "home": ""}),
        "HOME is not passed to tools"
    );
    let listed = b.worker.rpc("list_tools", json!({}), T).await.unwrap();
    let names: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, vec!["echo", "garbage", "slow", "weather"]);
    b.gw.shutdown().await;
}

async fn remote_error(b: &Bridge, method: &str, args: Value) -> String {
    match b.worker.rpc(method, args, T).await {
        Err(RpcError::Remote { message, .. }) => message,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[tokio::test]
async fn tool_failures_come_back_as_errors() {
    let b = bridge().await;
    let e = remote_error(
        &b,
        "execute_tool",
        json!({"tool_name": "weather", "tool_args": {"city": 5}}),
    )
    .await;
    assert!(e.contains("schema") && e.contains("city"), "{e}");
    let e = remote_error(
        &b,
        "execute_tool",
        json!({"tool_name": "weather", "tool_args": {}}),
    )
    .await;
    assert!(e.contains("city"), "{e}");
    let started = Instant::now();
    let e = remote_error(&b, "execute_tool", json!({"tool_name": "slow"})).await;
    assert!(e.contains("did not answer within 200 ms"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the slow tool was killed"
    );
    let e = remote_error(&b, "execute_tool", json!({"tool_name": "garbage"})).await;
    assert!(
        e.contains("not JSON") && e.contains("this is not json"),
        "{e}"
    );
    let e = remote_error(&b, "execute_tool", json!({"tool_name": "../../bin/sh"})).await;
    assert!(e.contains("no tool named"), "{e}");
    let e = remote_error(&b, "no_such_method", json!({})).await;
    assert!(e.contains("no_such_method"), "{e}");
    b.gw.shutdown().await;
}

#[tokio::test]
async fn a_tool_outside_the_directory_is_refused_at_load() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("escape.json"),
        json!({"name": "escape", "command": "../../../bin/sh"}).to_string(),
    )
    .unwrap();
    let mut reg = stargazer::tools::ToolRegistry::new();
    let e = reg.load_dir(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("outside the tools directory") || e.contains("escape"),
        "{e}"
    );
}

#[tokio::test]
async fn a_worker_times_out_clearly_when_no_gateway_runs() {
    let rig = Rig::new().await;
    let worker = Worker::from_bus(rig.bus.clone(), "sg:msg:", None);
    let started = Instant::now();
    let e = worker
        .rpc(
            "fetch_channel_history",
            json!({"channel_id": "c"}),
            Duration::from_millis(300),
        )
        .await;
    let elapsed = started.elapsed();
    match e {
        Err(RpcError::Timeout { method, .. }) => assert_eq!(method, "fetch_channel_history"),
        other => panic!("{other:?}"),
    }
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let msg = worker
        .rpc("x", json!({}), Duration::from_millis(10))
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no gateway answered"), "{msg}");
}

#[tokio::test]
async fn a_missed_deadline_is_dropped_and_a_foreign_reply_key_is_refused() {
    let rig = Rig::new().await;
    // Requests published while no gateway runs; one's deadline passes first.
    rig.publish(json!({"type": "rpc_request", "rpc_method": "list_tools",
        "reply_key": format!("{}late", rig.keys.reply_prefix()), "deadline_ms": stargazer::now_ms() + 50}))
        .await;
    rig.publish(
        json!({"type": "rpc_request", "rpc_method": "list_tools", "reply_key": "sg:victim"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await; // let the deadline pass: the point of the test
    let rec = Recorder::ok();
    let gw = rig.start("gw", rec, fast()).await;
    rig.drained(T).await;
    let late: i64 = rig
        .cmd(&["EXISTS", &format!("{}late", rig.keys.reply_prefix())])
        .await;
    assert_eq!(late, 0);
    let victim: i64 = rig.cmd(&["EXISTS", "sg:victim"]).await;
    assert_eq!(victim, 0, "nothing written outside the reply prefix");
    let dlq = rig.dlq().await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["error_kind"], "forbidden_key");
    assert!(dlq[0]["error"].contains("sg:victim"));
    assert_eq!(gw.stats().snapshot().rpc_expired, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn what_the_proxy_adapter_publishes_is_what_the_gateway_delivers() {
    let rig = Rig::new().await;
    let rec = Recorder::ok();
    let gw = rig.start("gw", rec.clone(), fast()).await;
    let worker = Worker::from_bus(rig.bus.clone(), "sg:msg:", None);
    let out = worker.proxy();
    out.send("c", "hello").await.unwrap();
    out.send_file(
        "c",
        b"\x00\x01bytes",
        "a.bin",
        "application/x-test",
        Some("see"),
    )
    .await
    .unwrap();
    out.send_buttons(
        "c",
        "pick",
        &[("Yes", "yes"), ("Docs", "https://example.org")],
    )
    .await
    .unwrap();
    out.react("c", "m-1", "👍").await.unwrap();
    out.start_typing("d", Duration::from_secs(30))
        .await
        .unwrap();
    out.set_presence("busy", Some("🔭")).await.unwrap();
    rec.wait_sent(6, T).await;
    rig.drained(T).await;
    let mut kinds: Vec<_> = rec.sent().iter().map(|s| s.kind).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            "buttons",
            "file",
            "message",
            "presence",
            "reaction",
            "start_typing"
        ]
    );
    let c: Vec<_> = rec
        .sent()
        .into_iter()
        .filter(|s| s.channel.as_deref() == Some("c"))
        .collect();
    assert_eq!(
        c.iter().map(|s| s.seq.unwrap()).collect::<Vec<_>>(),
        vec![1, 2, 3, 4],
        "in publish order"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn the_inbound_consumer_redelivers_after_a_handler_failure() {
    let rig = Rig::new().await;
    let publisher = InboundPublisher::new(rig.bus.conn(), rig.keys.clone());
    publisher
        .publish(&InboundEvent::message(rig.keys.platform(), "c", "u", "one"))
        .await
        .unwrap();
    publisher
        .publish(&InboundEvent::message(rig.keys.platform(), "c", "u", "two"))
        .await
        .unwrap();
    let _: String = rig
        .cmd(&["XADD", &rig.keys.inbound(), "*", "payload", "{broken"])
        .await;
    let worker = Worker::from_bus(rig.bus.clone(), "sg:msg:", None);
    let consumer = worker
        .inbound("w1")
        .with_retry_after(Duration::from_millis(20));
    let calls = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let fails = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let (c2, f2, s2) = (calls.clone(), fails.clone(), stop.clone());
    let run = tokio::spawn(async move {
        consumer
            .run(
                move |ev: InboundEvent| {
                    let (calls, fails, stop) = (c2.clone(), f2.clone(), s2.clone());
                    async move {
                        let text = ev.text.unwrap_or_default();
                        calls.lock().unwrap().push(text.clone());
                        if text == "one" && fails.fetch_add(1, Ordering::SeqCst) == 0 {
                            return Err("handler failed once".to_owned());
                        }
                        if calls.lock().unwrap().iter().filter(|t| *t == "two").count() >= 1
                            && calls.lock().unwrap().iter().filter(|t| *t == "one").count() >= 2
                        {
                            stop.cancel();
                        }
                        Ok(())
                    }
                },
                stop.clone(),
            )
            .await
    });
    tokio::time::timeout(T, run)
        .await
        .expect("handler saw both")
        .unwrap()
        .unwrap();
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.iter().filter(|t| *t == "one").count(), 2, "{calls:?}");
    let pending: redis::Value = rig
        .cmd(&[
            "XPENDING",
            &rig.keys.inbound(),
            &format!("sg:worker:{}", rig.keys.platform()),
        ])
        .await;
    let redis::Value::Array(p) = pending else {
        panic!()
    };
    assert_eq!(p[0], redis::Value::Int(0), "everything acknowledged");
    let dlq: i64 = rig
        .cmd(&["XLEN", &format!("{}:dlq", rig.keys.inbound())])
        .await;
    assert_eq!(dlq, 1, "the broken entry is set aside, not lost");
}

#[tokio::test]
async fn typed_console_lines_become_inbound_messages_and_history() {
    let rig = Rig::new().await;
    let console = Arc::new(ConsoleAdapter::with_writer(
        rig.keys.platform(),
        Box::new(std::io::sink()),
    ));
    let publisher = InboundPublisher::new(rig.bus.conn(), rig.keys.clone());
    let input: &[u8] = b"#general hello there\nplain line\n\n";
    console.clone().read_input(input, publisher).await;
    let r: redis::streams::StreamRangeReply =
        rig.cmd(&["XRANGE", &rig.keys.inbound(), "-", "+"]).await;
    assert_eq!(r.ids.len(), 2);
    let ev: InboundEvent =
        serde_json::from_str(&r.ids[0].get::<String>("payload").unwrap()).unwrap();
    assert_eq!(
        (ev.kind.as_str(), ev.channel_id.as_str(), ev.text.as_deref()),
        ("message", "general", Some("hello there"))
    );
    use stargazer::adapters::Adapter;
    let h = console.fetch_history("console", 5).await.unwrap();
    assert_eq!(h[0].text, "plain line");
    assert!(!h[0].is_bot);
}
