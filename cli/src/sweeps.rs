//! Sweep ids as people type them: a full id, a unique prefix of one (as `fleetmark sweeps`
//! shows), or `latest`. Prefixes are looked up by the coordinator (`FindSweeps`), so any sweep
//! in the database can be named, not only recent ones.

use fleetmark_proto::{convert::parse_uuid, v1 as pb};

use crate::{CliError, Remote};

/// How many candidates an ambiguous prefix lists.
const SHOWN_CANDIDATES: u32 = 10;

/// What the user typed, before asking the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SweepRef {
    Full(String),
    Prefix(String),
    Latest,
}

/// Classifies a typed sweep id; anything that cannot be one is bad input.
pub fn parse(typed: &str) -> Result<SweepRef, CliError> {
    let t = typed.trim();
    if t.eq_ignore_ascii_case("latest") {
        return Ok(SweepRef::Latest);
    }
    if let Ok(id) = parse_uuid("sweep id", t) {
        return Ok(SweepRef::Full(id.to_string()));
    }
    let lower = t.to_ascii_lowercase();
    if !lower.is_empty()
        && lower.len() < 36
        && lower.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
    {
        return Ok(SweepRef::Prefix(lower));
    }
    Err(CliError::Input(format!(
        "'{}' is not a valid sweep id: give a full id, a unique prefix of one, or `latest`",
        t.chars().take(64).collect::<String>()
    )))
}

fn describe(s: &pb::SweepSummary) -> String {
    let created = fleetmark_proto::convert::from_timestamp(s.created_at)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    format!("  {}  {}  {}  {}", s.sweep_id, created, s.state, s.name)
}

/// The full id the user meant. Unknown: NotFound; ambiguous: bad input listing the candidates.
pub async fn resolve(remote: &mut Remote, typed: &str) -> Result<String, CliError> {
    match parse(typed)? {
        SweepRef::Full(id) => Ok(id),
        SweepRef::Latest => {
            let sweeps = remote
                .client
                .list_sweeps(pb::ListSweepsRequest { limit: 1 })
                .await
                .map_err(|s| remote.err(s))?
                .into_inner()
                .sweeps;
            sweeps
                .into_iter()
                .next()
                .map(|s| s.sweep_id)
                .ok_or_else(|| CliError::NotFound("there are no sweeps yet".into()))
        }
        SweepRef::Prefix(prefix) => {
            let found = remote
                .client
                .find_sweeps(pb::FindSweepsRequest {
                    id_prefix: prefix.clone(),
                    limit: SHOWN_CANDIDATES + 1,
                })
                .await
                .map_err(|s| remote.err(s))?
                .into_inner()
                .sweeps;
            match found.as_slice() {
                [] => Err(CliError::NotFound(format!(
                    "no sweep id starts with '{prefix}' (see `fleetmark sweeps`)"
                ))),
                [one] => Ok(one.sweep_id.clone()),
                many => {
                    let shown: Vec<String> = many
                        .iter()
                        .take(SHOWN_CANDIDATES as usize)
                        .map(describe)
                        .collect();
                    let more = if many.len() > SHOWN_CANDIDATES as usize {
                        "\n  and more"
                    } else {
                        ""
                    };
                    Err(CliError::Input(format!(
                        "sweep id prefix '{prefix}' is ambiguous; it starts:\n{}{more}\ngive more characters",
                        shown.join("\n")
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_ids_are_classified() {
        let full = "0b6d1f8e-52a1-4c37-9d0e-2f1e3c4b5a69";
        assert_eq!(parse(full).unwrap(), SweepRef::Full(full.into()));
        assert_eq!(parse(" LATEST ").unwrap(), SweepRef::Latest);
        assert_eq!(parse("0B6D").unwrap(), SweepRef::Prefix("0b6d".into()));
        assert_eq!(
            parse("0b6d1f8e-52").unwrap(),
            SweepRef::Prefix("0b6d1f8e-52".into())
        );
        for bad in ["", "not-a-uuid", "0b6d/..", "g123"] {
            let e = parse(bad).unwrap_err();
            assert!(
                e.to_string().contains("is not a valid sweep id"),
                "{bad}: {e}"
            );
            assert_eq!(e.exit_code(), crate::exit::BAD_INPUT);
        }
    }
}
