//! Every size limit on what Fleetmark accepts from the outside, in one place.
//!
//! The coordinator faces the internet and stores what it is sent, so every field and every
//! message has a bound sized to real use: a real agent, sweep or result fits with room to
//! spare, and anything past the bound is refused with INVALID_ARGUMENT (or, for whole messages,
//! by the gRPC layer before it is even read). Errors quote at most [`EXCERPT_CHARS`] of the
//! offending input, so an error can never be larger than a few hundred bytes.

use std::fmt;

use thiserror::Error;

/// Longest name (agent, sweep, label key), counted in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Most labels an agent may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label key, in characters.
pub const MAX_LABEL_KEY_CHARS: usize = 64;
/// Longest label value, in characters.
pub const MAX_LABEL_VALUE_CHARS: usize = 256;
/// Most devices one agent may serve (an 8-GPU node plus the CPU, with room to spare).
pub const MAX_DEVICES: usize = 64;
/// Longest inventory, backend or version string (host name, CPU model, driver version, ...).
pub const MAX_TEXT_CHARS: usize = 512;
/// Most entries in a free-form map such as the backend details.
pub const MAX_DETAILS: usize = 64;
/// Longest backend detail value, in characters. Details are what the engine says about how a
/// number was made: a fused plan names every layer's algorithm (about 850 characters for
/// ResNet18), the graph API's notes several per layer (about 2,300). 64 of them at 4 bytes a
/// character is 1 MiB, well inside [`MAX_REQUEST_BYTES`] beside the latencies.
pub const MAX_DETAIL_CHARS: usize = 4096;
/// Most throttle reasons a telemetry record may list.
pub const MAX_THROTTLE_REASONS: usize = 32;
/// Largest sweep TOML text. A real sweep file is well under 4 KiB.
pub const MAX_SWEEP_TOML_BYTES: usize = 64 * 1024;
/// Most raw latencies one result may carry. The measurement loop stops timing when it has
/// this many samples, so a legitimate result never exceeds it; 1,000,000 samples is 8 MB.
pub const MAX_LATENCY_SAMPLES: usize = 1_000_000;
/// Largest request a coordinator reads and a client sends: one result with
/// [`MAX_LATENCY_SAMPLES`] latencies encodes to about 9 MB (measured by
/// `largest_real_result_fits_the_request_limit` in `proto`), so 16 MiB leaves room for the rest
/// of the record. Imports are sent in chunks below this.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Largest response a coordinator sends and a client reads: a listing of results with their
/// raw latencies.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Most characters of a user's input quoted back in an error message.
pub const EXCERPT_CHARS: usize = 80;
/// Most characters of a parser's message (which may itself quote the input) passed on.
pub const MAX_ERROR_CHARS: usize = 300;

/// A string or collection that breaks one of the limits above.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LimitError {
    #[error("{field} is empty")]
    Empty { field: String },
    #[error("{field} is {got} characters long; at most {max} are allowed")]
    TooLong {
        field: String,
        got: usize,
        max: usize,
    },
    #[error("{field} has {got} entries; at most {max} are allowed")]
    TooMany {
        field: String,
        got: usize,
        max: usize,
    },
    #[error("{field} contains a NUL byte")]
    Nul { field: String },
    #[error("{field} '{excerpt}' contains '/', which is reserved for imported agents")]
    Reserved { field: String, excerpt: Excerpt },
}

/// A number as an error message shows it: as written for ordinary sizes, in scientific
/// notation with four significant digits for huge or tiny ones. `{}` on an f64 writes every
/// digit, so a value such as -9e307 from a hostile message would make a 300-character error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Num(pub f64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v.is_finite() && v != 0.0 && !(1e-3..1e6).contains(&v.abs()) {
            write!(f, "{v:.3e}")
        } else {
            write!(f, "{v}")
        }
    }
}

/// At most [`EXCERPT_CHARS`] characters of a string, with "…" when cut, and control characters
/// shown escaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excerpt(String);

impl Excerpt {
    pub fn of(s: &str) -> Self {
        Self::at_most(s, EXCERPT_CHARS)
    }

    /// At most `max` characters of `s`.
    pub fn at_most(s: &str, max: usize) -> Self {
        let mut out = String::new();
        for c in s.chars().take(max) {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        if s.chars().nth(max).is_some() {
            out.push('…');
        }
        Excerpt(out)
    }
}

impl fmt::Display for Excerpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `s` cut to at most `max` characters, ending in "…" where it was cut: for text the engine
/// writes into a result, so that a long diagnostic never gets the whole result refused.
pub fn clip_text(s: &str, max: usize) -> String {
    if s.chars().nth(max).is_none() {
        return s.to_string();
    }
    let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Checks a free-text field: no NUL byte (Postgres cannot store one) and at most `max`
/// characters.
pub fn check_text(field: &str, s: &str, max: usize) -> Result<(), LimitError> {
    if s.contains('\0') {
        return Err(LimitError::Nul {
            field: field.into(),
        });
    }
    // Count only as far as needed: a 100 MB string is refused after max+1 characters.
    let got = s.chars().take(max + 1).count();
    if got > max {
        return Err(LimitError::TooLong {
            field: field.into(),
            got: s.chars().count(),
            max,
        });
    }
    Ok(())
}

/// A name: non-empty, at most [`MAX_NAME_CHARS`] characters, no NUL.
pub fn check_name(field: &str, s: &str) -> Result<(), LimitError> {
    if s.trim().is_empty() {
        return Err(LimitError::Empty {
            field: field.into(),
        });
    }
    check_text(field, s, MAX_NAME_CHARS)
}

/// A registered agent's name. '/' is reserved: imported agents are named `imported/<name>`,
/// so an import can never borrow a registered agent's name, nor a registered agent an
/// imported one's.
pub fn check_agent_name(s: &str) -> Result<(), LimitError> {
    check_name("agent name", s)?;
    if s.contains('/') {
        return Err(LimitError::Reserved {
            field: "agent name".into(),
            excerpt: Excerpt::of(s),
        });
    }
    Ok(())
}

/// Checks the number of entries of a collection.
pub fn check_count(field: &str, got: usize, max: usize) -> Result<(), LimitError> {
    if got > max {
        return Err(LimitError::TooMany {
            field: field.into(),
            got,
            max,
        });
    }
    Ok(())
}

/// Labels: at most [`MAX_LABELS`], each key and value bounded, no NUL.
pub fn check_labels<'a>(
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), LimitError> {
    check_count("labels", labels.len(), MAX_LABELS)?;
    for (k, v) in labels {
        if k.is_empty() {
            return Err(LimitError::Empty {
                field: "a label key".into(),
            });
        }
        check_text("a label key", k, MAX_LABEL_KEY_CHARS)?;
        check_text(
            &format!("label '{}'", Excerpt::of(k)),
            v,
            MAX_LABEL_VALUE_CHARS,
        )?;
    }
    Ok(())
}

/// Every string of a host inventory, and its number of GPUs.
pub fn check_inventory(h: &crate::HostInventory) -> Result<(), LimitError> {
    for (field, s) in [
        ("hostname", &h.hostname),
        ("os", &h.os),
        ("kernel", &h.kernel),
        ("cpu model", &h.cpu_model),
        ("fleetmark version", &h.fleetmark_version),
        ("candle version", &h.candle_version),
        ("rustc version", &h.rustc_version),
        ("cuda build", &h.cuda_build),
    ] {
        check_text(field, s, MAX_TEXT_CHARS)?;
    }
    check_count("gpus", h.gpus.len(), MAX_DEVICES)?;
    for g in &h.gpus {
        for (field, s) in [
            ("gpu name", &g.name),
            ("gpu uuid", &g.uuid),
            ("compute capability", &g.compute_capability),
            ("driver version", &g.driver_version),
            ("cuda driver version", &g.cuda_driver_version),
        ] {
            check_text(field, s, MAX_TEXT_CHARS)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn clipped_text_fits_and_says_it_was_cut() {
        use super::clip_text;
        assert_eq!(clip_text("short", 10), "short");
        assert_eq!(clip_text("exactly10!", 10), "exactly10!");
        let cut = clip_text(&"é".repeat(50), 10);
        assert_eq!(cut.chars().count(), 10);
        assert!(cut.ends_with('…') && cut.starts_with("ééé"), "{cut}");
        assert!(super::check_text("a backend detail", &cut, 10).is_ok());
    }

    #[test]
    fn numbers_in_errors_stay_short() {
        let shown = |v: f64| super::Num(v).to_string();
        assert_eq!(shown(0.05), "0.05");
        assert_eq!(shown(12.5), "12.5");
        assert_eq!(shown(0.0), "0");
        assert_eq!(shown(-8.988465674311579e307), "-8.988e307");
        assert_eq!(shown(1e-300), "1.000e-300");
        assert_eq!(shown(f64::NAN), "NaN");
        assert_eq!(shown(f64::NEG_INFINITY), "-inf");
        assert!(shown(f64::MAX).len() < 12);
    }

    use super::*;

    #[test]
    fn names_are_counted_in_characters() {
        let two_hundred_e_acute = "é".repeat(200);
        assert!(check_name("name", &two_hundred_e_acute).is_ok());
        let e = check_name("name", &"é".repeat(201))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "name is 201 characters long; at most 200 are allowed");
        assert!(check_name("name", "a\0b")
            .unwrap_err()
            .to_string()
            .contains("NUL"));
        assert!(check_agent_name("imported/x").is_err());
    }

    #[test]
    fn excerpts_are_short() {
        let e = Excerpt::of(&"x".repeat(1_000_000)).to_string();
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
    }
}
