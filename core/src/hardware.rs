//! Hardware kinds (`cpu`, `t4`, `h100`, ...) and the targets a sweep may name.
//!
//! A kind is the short name users type and `compare` groups by. Agents derive theirs from the
//! GPU's marketing name as NVML reports it, so "NVIDIA H100 80GB HBM3" and "NVIDIA H100 PCIe"
//! both land on `h100`.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// Kinds a sweep may target. `cpu` is an agent without a GPU (or one told to use the CPU).
pub const KNOWN_KINDS: &[&str] = &[
    "cpu", "t4", "v100", "a10", "a10g", "a100", "l4", "l40s", "h100", "h200", "b200", "a6000",
    "rtx4090",
];

/// A kind as an agent reported it, in the one spelling every comparison uses: ASCII
/// lowercase, as sweep targets parse and listing filters are read. An agent that says `H100`
/// then claims `h100` jobs, and its results list and compare under `h100`. (The database keeps
/// kinds in this form by a check constraint, migration `20261204000015`.)
pub fn normalize_kind(kind: &str) -> String {
    kind.to_ascii_lowercase()
}

/// A normalised hardware kind, such as `h100` or `cpu`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HardwareKind(String);

impl HardwareKind {
    pub fn cpu() -> Self {
        HardwareKind("cpu".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_cpu(&self) -> bool {
        self.0 == "cpu"
    }

    /// The kind of a GPU from the name its driver reports. Unknown cards keep a sanitised form
    /// of their name, so they still group together in `compare`.
    pub fn from_gpu_name(name: &str) -> Self {
        let lower = name.to_ascii_lowercase();
        let tokens: Vec<&str> = lower
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|t| !t.is_empty())
            .collect();
        let has = |t: &str| tokens.contains(&t);
        let kind = if has("h200") {
            "h200"
        } else if has("h100") {
            "h100"
        } else if has("b200") {
            "b200"
        } else if has("a100") {
            "a100"
        } else if has("a10g") {
            "a10g"
        } else if has("a10") {
            "a10"
        } else if has("l40s") {
            "l40s"
        } else if has("l4") {
            "l4"
        } else if has("t4") {
            "t4"
        } else if has("v100") {
            "v100"
        } else if has("a6000") {
            "a6000"
        } else if lower.contains("4090") {
            "rtx4090"
        } else {
            let sanitized: String = tokens
                .iter()
                .filter(|t| **t != "nvidia")
                .copied()
                .collect::<Vec<_>>()
                .join("-");
            return HardwareKind(if sanitized.is_empty() {
                "unknown-gpu".into()
            } else {
                sanitized
            });
        };
        HardwareKind(kind.into())
    }
}

impl fmt::Display for HardwareKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for HardwareKind {
    type Err = CoreError;

    /// Only the known kinds parse: a typo in a sweep must not queue jobs no agent will take.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        if KNOWN_KINDS.contains(&lower.as_str()) {
            Ok(HardwareKind(lower))
        } else {
            Err(CoreError::UnknownHardware {
                given: s.to_string(),
                known: KNOWN_KINDS.join(", "),
            })
        }
    }
}

/// What hardware a job may run on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum HardwareTarget {
    /// Any agent, CPU or GPU.
    Any,
    /// Any agent device that is a GPU.
    AnyGpu,
    /// Exactly this kind.
    Kind(HardwareKind),
}

impl HardwareTarget {
    pub fn as_string(&self) -> String {
        match self {
            HardwareTarget::Any => "any".into(),
            HardwareTarget::AnyGpu => "gpu".into(),
            HardwareTarget::Kind(k) => k.to_string(),
        }
    }

    pub fn matches(&self, kind: &HardwareKind) -> bool {
        self.matches_name(kind.as_str())
    }

    /// Like [`Self::matches`], for a kind as an agent reported it (which may be an unknown card's
    /// sanitised name).
    pub fn matches_name(&self, kind: &str) -> bool {
        match self {
            HardwareTarget::Any => true,
            HardwareTarget::AnyGpu => kind != "cpu",
            HardwareTarget::Kind(k) => k.as_str() == kind,
        }
    }
}

impl fmt::Display for HardwareTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_string())
    }
}

impl FromStr for HardwareTarget {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "any" | "*" => Ok(HardwareTarget::Any),
            "gpu" => Ok(HardwareTarget::AnyGpu),
            _ => s.parse().map(HardwareTarget::Kind),
        }
    }
}

impl TryFrom<String> for HardwareTarget {
    type Error = CoreError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<HardwareTarget> for String {
    fn from(t: HardwareTarget) -> Self {
        t.as_string()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn reported_kinds_compare_in_lowercase() {
        assert_eq!(super::normalize_kind("H100"), "h100");
        assert_eq!(super::normalize_kind("NVIDIA-RTX-Ä"), "nvidia-rtx-Ä");
        let target: HardwareTarget = "H100".parse().unwrap();
        assert!(target.matches_name(&super::normalize_kind("H100")));
    }

    use super::*;

    #[test]
    fn gpu_names_map_to_kinds() {
        let cases = [
            ("NVIDIA H100 80GB HBM3", "h100"),
            ("NVIDIA H100 PCIe", "h100"),
            ("NVIDIA H200", "h200"),
            ("Tesla T4", "t4"),
            ("NVIDIA A10G", "a10g"),
            ("NVIDIA A10", "a10"),
            ("NVIDIA L4", "l4"),
            ("NVIDIA L40S", "l40s"),
            ("NVIDIA A100-SXM4-40GB", "a100"),
            ("NVIDIA GeForce RTX 4090", "rtx4090"),
            ("NVIDIA Quadro P1000", "quadro-p1000"),
        ];
        for (name, kind) in cases {
            assert_eq!(HardwareKind::from_gpu_name(name).as_str(), kind, "{name}");
        }
    }

    #[test]
    fn targets_parse_and_match() {
        let h100: HardwareTarget = "H100".parse().unwrap();
        assert!(h100.matches(&HardwareKind::from_gpu_name("NVIDIA H100 80GB HBM3")));
        assert!(!h100.matches(&HardwareKind::cpu()));
        let gpu: HardwareTarget = "gpu".parse().unwrap();
        assert!(!gpu.matches(&HardwareKind::cpu()));
        assert!(gpu.matches(&HardwareKind::from_gpu_name("Tesla T4")));
        assert!(HardwareTarget::Any.matches(&HardwareKind::cpu()));
    }

    #[test]
    fn unknown_kind_is_a_clear_error() {
        let err = "h1000".parse::<HardwareTarget>().unwrap_err().to_string();
        assert!(err.contains("unknown GPU kind 'h1000'"), "{err}");
        assert!(err.contains("h100"), "lists the known kinds: {err}");
    }
}
