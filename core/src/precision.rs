//! Numeric precisions a job can ask for.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// The storage precision of weights and activations. Whether the matrix units round further
/// (TF32 for f32 convolutions on Ampere and later) is recorded separately, as the result's `math`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::F16, Precision::Bf16];

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }

    /// Bytes per element in storage.
    pub fn size_in_bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::F16 | Precision::Bf16 => 2,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "float" => Ok(Precision::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Precision::F16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(CoreError::UnknownPrecision {
                given: s.to_string(),
            }),
        }
    }
}

impl TryFrom<String> for Precision {
    type Error = CoreError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Precision> for String {
    fn from(p: Precision) -> Self {
        p.as_str().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_aliases_and_rejects_unknown() {
        assert_eq!("FP16".parse::<Precision>().unwrap(), Precision::F16);
        assert_eq!("bfloat16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("f32".parse::<Precision>().unwrap(), Precision::F32);
        let err = "int8".parse::<Precision>().unwrap_err();
        assert!(
            err.to_string().contains("unknown precision 'int8'"),
            "{err}"
        );
    }

    #[test]
    fn round_trips_through_serde() {
        let json = serde_json::to_string(&Precision::Bf16).unwrap();
        assert_eq!(json, "\"bf16\"");
        let back: Precision = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Precision::Bf16);
        assert!(serde_json::from_str::<Precision>("\"f8\"").is_err());
    }
}
