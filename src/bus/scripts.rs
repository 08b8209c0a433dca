//! The Lua scripts, each in a file of its own under `lua/`, with the shared
//! prelude (the liveness and channel-state layout, helper functions) in
//! front of each.

use std::sync::OnceLock;

use redis::Script;

/// Every script Stargazer runs.
pub struct Scripts {
    pub register: Script,
    pub beat: Script,
    pub verdict: Script,
    pub leave: Script,
    pub acquire: Script,
    pub release: Script,
    pub handoff: Script,
    pub commit: Script,
    pub fetch: Script,
    pub reap: Script,
    pub rpc_reply: Script,
    /// Dead letter back to the outbound stream (`stargazer dlq replay`).
    pub replay: Script,
}

macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("lua/prelude.lua"),
            "\n",
            include_str!(concat!("lua/", $file))
        ))
    };
}

impl Scripts {
    /// The scripts, built once per process (EVALSHA falls back to EVAL by itself).
    pub fn get() -> &'static Scripts {
        static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
        SCRIPTS.get_or_init(|| Scripts {
            register: script!("register.lua"),
            beat: script!("beat.lua"),
            verdict: script!("verdict.lua"),
            leave: script!("leave.lua"),
            acquire: script!("acquire.lua"),
            release: script!("release.lua"),
            handoff: script!("handoff.lua"),
            commit: script!("commit.lua"),
            fetch: script!("fetch.lua"),
            reap: script!("reap.lua"),
            rpc_reply: script!("rpc_reply.lua"),
            replay: script!("replay.lua"),
        })
    }
}
