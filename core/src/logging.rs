//! One logging set-up for the three binaries, so that `--log-format json` and the colour rule
//! behave the same everywhere: logs go to stderr, in colour only when stderr is a terminal and
//! `NO_COLOR` is not set, as text for people or as JSON lines for log collectors.
//!
//! The binaries read the environment (`RUST_LOG`, `NO_COLOR`) and pass what they found here.

use std::{io::IsTerminal, str::FromStr};

use crate::CoreError;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

impl FromStr for LogFormat {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(CoreError::UnknownLogFormat {
                given: s.chars().take(32).collect(),
            }),
        }
    }
}

/// What a binary found out about logging before starting it.
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter such as `info,sqlx=warn` (the binary's `RUST_LOG`, or its default).
    pub filter: String,
    /// The filter used when `filter` does not parse.
    pub fallback_filter: &'static str,
    /// Whether `NO_COLOR` was set to a non-empty value.
    pub no_color: bool,
}

/// True when text logs may carry ANSI colours: stderr is a terminal and NO_COLOR is not set.
pub fn colour_wanted(no_color: bool) -> bool {
    !no_color && std::io::stderr().is_terminal()
}

/// Installs the global subscriber. A filter that does not parse falls back to
/// `fallback_filter`, with a warning saying so.
pub fn init_logging(settings: &LogSettings) {
    use tracing_subscriber::EnvFilter;
    let (filter, bad) = match EnvFilter::try_new(&settings.filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new(settings.fallback_filter), Some(e)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match settings.format {
        LogFormat::Text => builder
            .with_ansi(colour_wanted(settings.no_color))
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
    if installed.is_ok() {
        if let Some(e) = bad {
            tracing::warn!(filter = %settings.filter, error = %e, "ignoring an invalid log filter");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!("TEXT".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert!("xml"
            .parse::<LogFormat>()
            .unwrap_err()
            .to_string()
            .contains("text or json"));
    }
}
