//! `fleetmark token create|list|revoke`: API token management with an admin token. Secrets are
//! shown once, on stdout, when a token is created; listings never contain them.

use std::{process::ExitCode, time::Duration};

use clap::{Subcommand, ValueEnum};
use fleetmark_proto::{client::token_client_tls, convert::from_timestamp, v1 as pb};
use serde_json::json;

use crate::{emit, output, CliError, Connection, Format};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Agent,
    Reader,
    Submitter,
    Admin,
}

impl From<RoleArg> for pb::Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Agent => pb::Role::Agent,
            RoleArg::Reader => pb::Role::Reader,
            RoleArg::Submitter => pb::Role::Submitter,
            RoleArg::Admin => pb::Role::Admin,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; its secret is printed once, on stdout.
    Create {
        /// What the token may do: agent (register agents), reader, submitter or admin.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// A name for the token, shown by `fleetmark token list` (default: "<role> token").
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, such as 30d or 12h. Without it the token lasts until revoked.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        /// Output format: table prints the secret alone on stdout; json prints it with the
        /// token's details.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Tokens, without their secrets.
    List {
        /// Include revoked tokens.
        #[arg(long)]
        all: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Revoke a token at once (agents registered with it lose their secrets too).
    Revoke {
        /// The token's id, as `fleetmark token list` shows it.
        token_id: String,
    },
}

fn role_name(r: i32) -> &'static str {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Agent) => "agent",
        Ok(pb::Role::Reader) => "reader",
        Ok(pb::Role::Submitter) => "submitter",
        Ok(pb::Role::Admin) => "admin",
        _ => "unknown",
    }
}

fn time(t: Option<prost_types::Timestamp>) -> String {
    t.map(|t| from_timestamp(Some(t)).to_rfc3339())
        .unwrap_or_default()
}

fn info_json(t: &pb::TokenInfo) -> serde_json::Value {
    json!({"token_id": t.token_id, "name": t.name, "role": role_name(t.role),
           "created_at": time(t.created_at), "expires_at": t.expires_at.map(|e| time(Some(e))),
           "revoked_at": t.revoked_at.map(|e| time(Some(e)))})
}

pub fn render(tokens: &[pb::TokenInfo], format: Format) -> String {
    let header = ["token id", "name", "role", "created", "expires", "revoked"];
    let rows = tokens
        .iter()
        .map(|t| {
            vec![
                t.token_id.clone(),
                t.name.clone(),
                role_name(t.role).into(),
                time(t.created_at),
                time(t.expires_at),
                time(t.revoked_at),
            ]
        })
        .collect();
    match format {
        Format::Json => {
            let v: Vec<_> = tokens.iter().map(info_json).collect();
            format!("{}\n", serde_json::to_string_pretty(&v).expect("json"))
        }
        Format::Csv => output::csv(&header, rows),
        Format::Table => output::table(&header, rows, 6),
    }
}

pub async fn run(conn: &Connection, cmd: TokenCommand) -> Result<ExitCode, CliError> {
    let url = conn.coordinator.clone();
    let mut client = token_client_tls(&url, conn.token()?.as_deref(), &conn.tls()?)
        .map_err(|e| CliError::Input(e.to_string()))?;
    let err = |s| CliError::from_status(&url, s);
    match cmd {
        TokenCommand::Create {
            role,
            name,
            expires,
            format,
        } => {
            let role = pb::Role::from(role);
            let resp = client
                .create_token(pb::CreateTokenRequest {
                    name: name.unwrap_or_else(|| format!("{} token", role_name(role as i32))),
                    role: role as i32,
                    expires_in_seconds: expires.map(|d| d.as_secs().max(1)),
                })
                .await
                .map_err(err)?
                .into_inner();
            let info = resp.token.unwrap_or_default();
            if format == Format::Json {
                let mut v = info_json(&info);
                v["secret"] = json!(resp.secret);
                emit(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&v).expect("json")
                ))?;
            } else {
                note!(
                    "created {} token {} ('{}'); its secret is below and is shown only this once",
                    role_name(info.role),
                    info.token_id,
                    info.name
                );
                emit(&format!("{}\n", resp.secret))?;
            }
        }
        TokenCommand::List { all, format } => {
            let tokens = client
                .list_tokens(pb::ListTokensRequest {
                    include_revoked: all,
                })
                .await
                .map_err(err)?
                .into_inner()
                .tokens;
            emit(&render(&tokens, format))?;
        }
        TokenCommand::Revoke { token_id } => {
            let revoked = client
                .revoke_token(pb::RevokeTokenRequest {
                    token_id: token_id.trim().to_string(),
                })
                .await
                .map_err(err)?
                .into_inner()
                .revoked;
            if revoked {
                note!("revoked token {}", token_id.trim());
            } else {
                note!("token {} was already revoked", token_id.trim());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
