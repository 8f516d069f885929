//! `fleetmark`: parses the command line, reads the config file, and runs the command. The exit
//! status comes from `CliError::exit_code` (see `fleetmark --help`).

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, FromArgMatches};
use fleetmark::{config, note, Cli, CliError};
use fleetmark_core::logging::{init_logging, LogSettings};

fn main() -> ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            // Usage errors exit 2; --help and --version exit 0. Printing ignores a closed pipe.
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(fleetmark::exit::BAD_INPUT);
        }
    };
    init_logging(&LogSettings {
        format: cli.log_format,
        filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        fallback_filter: "warn",
        no_color: std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
    });
    if let Err(e) = load_config(&mut cli, &matches) {
        return fail(e);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            return fail(CliError::Other(format!(
                "cannot start the async runtime: {e}"
            )))
        }
    };
    match rt.block_on(fleetmark::run(cli)) {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

/// Reports an error (unless it is a closed stdout, which ends quietly) and gives its status.
fn fail(e: CliError) -> ExitCode {
    if !matches!(e, CliError::ClosedPipe) {
        note!("error: {e}");
    }
    ExitCode::from(e.exit_code())
}

/// Reads the config file named by --config/FLEETMARK_CONFIG (which must exist), or the default
/// one (which may not), and fills in what flags and the environment left open.
fn load_config(cli: &mut Cli, matches: &clap::ArgMatches) -> Result<(), CliError> {
    let (path, required) = match &cli.conn.config {
        Some(p) => (p.clone(), true),
        None => match config::default_path(
            std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from),
            std::env::var_os("HOME").map(PathBuf::from),
        ) {
            Some(p) => (p, false),
            None => return Ok(()),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(()),
        Err(e) => {
            return Err(CliError::Input(format!(
                "cannot read the config file {}: {e}",
                path.display()
            )))
        }
    };
    let file = config::ConfigFile::parse(&path, &text)?;
    config::apply(cli, matches, &file);
    Ok(())
}
