//! The Lua scripts, each in a file of its own under `lua/`, with the shared
//! prelude (state layout and helper functions) in front of each.

use std::sync::OnceLock;

use redis::Script;

/// Every script Stargazer runs.
pub struct Scripts {
    pub begin: Script,
    pub commit: Script,
    /// Several begin/commit steps in one call (see `lua/batch.lua`).
    pub batch: Script,
    pub dead_letter: Script,
    pub renew: Script,
    pub release: Script,
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
            begin: script!("begin.lua"),
            commit: script!("commit.lua"),
            batch: script!("batch.lua"),
            dead_letter: script!("dead_letter.lua"),
            renew: script!("renew.lua"),
            release: script!("release.lua"),
            replay: script!("replay.lua"),
        })
    }
}
