//! Operations: what an operator runs or watches beside the delivery path.
//!
//! - [`status`]: per-platform figures (`stargazer status`).
//! - [`dlq`]: list, show, replay and purge dead letters (`stargazer dlq`).
//! - [`gauges`]: the periodic refresh of the Prometheus gauges in a gateway.
//!
//! The Redis commands themselves live in [`crate::bus::admin`]; stream
//! trimming in [`crate::trim`]; metric names in [`crate::metrics`].

pub mod dlq;
pub mod gauges;
pub mod status;

/// A progress bar for a long operation, drawn only on a terminal.
pub fn progress_bar(total: u64, what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta} left)")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_owned());
    Some(pb)
}
