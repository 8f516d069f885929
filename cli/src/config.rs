//! The settings file, `~/.config/fleetmark/config.toml` (or under `$XDG_CONFIG_HOME`): where
//! the coordinator is, where the token is kept, and which CA to trust, so that everyday
//! commands need no flags. Flags and `FLEETMARK_*` variables win over it.
//!
//! The binary finds and reads the file; this module only parses it (unknown keys are refused,
//! so a typo is not silently ignored) and merges it under the command line.

use std::path::{Path, PathBuf};

use clap::{parser::ValueSource, ArgMatches};
use serde::Deserialize;

use crate::{Cli, CliError};

/// What the file may hold. Relative paths are taken from the file's own folder.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The coordinator URL, as `--coordinator` takes it.
    pub coordinator: Option<String>,
    /// A file whose first line is the bearer token.
    pub token_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust for `https://` coordinators.
    pub ca_cert: Option<PathBuf>,
}

impl ConfigFile {
    /// Parses the file's text; `path` is for messages and for relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self, CliError> {
        let mut c: ConfigFile = toml::from_str(text).map_err(|e| {
            CliError::Input(format!(
                "{}: {} (allowed keys: coordinator, token_file, ca_cert)",
                path.display(),
                e.message()
            ))
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.token_file, &mut c.ca_cert].into_iter().flatten() {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(c)
    }
}

/// Where the file is by default: `$XDG_CONFIG_HOME/fleetmark/config.toml` when that is set to
/// an absolute path, else `$HOME/.config/fleetmark/config.toml`.
pub fn default_path(xdg_config_home: Option<PathBuf>, home: Option<PathBuf>) -> Option<PathBuf> {
    xdg_config_home
        .filter(|p| p.is_absolute())
        .or_else(|| home.map(|h| h.join(".config")))
        .map(|d| d.join("fleetmark").join("config.toml"))
}

/// True when the argument was given as a flag or through its environment variable.
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Fills in from the file what neither a flag nor the environment gave.
pub fn apply(cli: &mut Cli, matches: &ArgMatches, file: &ConfigFile) {
    if !given(matches, "coordinator") {
        if let Some(c) = &file.coordinator {
            cli.conn.coordinator = c.clone();
        }
    }
    if !given(matches, "token") && !given(matches, "token_file") {
        if let Some(t) = &file.token_file {
            cli.conn.token_file = Some(t.clone());
        }
    }
    if !given(matches, "ca_cert") {
        if let Some(ca) = &file.ca_cert {
            cli.conn.ca_cert = Some(ca.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    fn cli(args: &[&str]) -> (Cli, ArgMatches) {
        let m = Cli::command()
            .try_get_matches_from(std::iter::once("fleetmark").chain(args.iter().copied()))
            .expect("valid arguments");
        (Cli::from_arg_matches(&m).expect("matches"), m)
    }

    #[test]
    fn the_file_fills_in_what_flags_do_not_give() {
        let file = ConfigFile::parse(
            Path::new("/etc/fm/config.toml"),
            "coordinator = \"https://fm.example:7070\"\ntoken_file = \"token\"\nca_cert = \"/x/ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(file.token_file, Some(PathBuf::from("/etc/fm/token")));
        assert_eq!(file.ca_cert, Some(PathBuf::from("/x/ca.pem")));

        let (mut c, m) = cli(&["sweeps"]);
        apply(&mut c, &m, &file);
        assert_eq!(c.conn.coordinator, "https://fm.example:7070");
        assert_eq!(c.conn.token_file, Some(PathBuf::from("/etc/fm/token")));
        assert_eq!(c.conn.ca_cert, Some(PathBuf::from("/x/ca.pem")));

        let (mut c, m) = cli(&[
            "--coordinator",
            "http://127.0.0.1:1",
            "--token",
            "t",
            "sweeps",
        ]);
        apply(&mut c, &m, &file);
        assert_eq!(c.conn.coordinator, "http://127.0.0.1:1");
        assert_eq!(c.conn.token_file, None);

        let (mut c, m) = cli(&["--ca-cert", "/flag/ca.pem", "sweeps"]);
        apply(&mut c, &m, &file);
        assert_eq!(c.conn.ca_cert, Some(PathBuf::from("/flag/ca.pem")));
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_clearly() {
        let e = ConfigFile::parse(Path::new("c.toml"), "coordinatr = \"x\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("c.toml") && msg.contains("coordinatr"),
            "{msg}"
        );
        assert!(msg.contains("allowed keys"), "{msg}");
        assert_eq!(e.exit_code(), crate::exit::BAD_INPUT);
        let e = ConfigFile::parse(Path::new("c.toml"), "coordinator = 7\n").unwrap_err();
        assert!(e.to_string().contains("string"), "{e}");
    }

    #[test]
    fn xdg_config_home_wins_when_absolute() {
        assert_eq!(
            default_path(Some("/xdg".into()), Some("/home/u".into())),
            Some(PathBuf::from("/xdg/fleetmark/config.toml"))
        );
        assert_eq!(
            default_path(Some("rel".into()), Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.config/fleetmark/config.toml"))
        );
        assert_eq!(default_path(None, None), None);
    }
}
