//! What each generation of device can run, as pure functions, so that the rules are tested here
//! with simulated capabilities instead of on cards this project does not own (T4, V100, L4).
//!
//! Three places use them: an agent declares at registration the precisions each of its devices
//! runs ([`precisions_for`]); the engine refuses a job it cannot run with a one-line reason
//! before touching the device ([`check_precision`]); and a sweep that names a kind which can
//! never run a precision (bf16 on a T4) is refused at submit ([`kind_refusal`]).
//!
//! The arithmetic a result reports is a [`MathMode`], chosen here too: TF32 exists from Ampere
//! (sm_80) on, so on a T4 f32 means f32.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{HardwareKind, Precision};

/// A CUDA compute capability, such as 7.5 (T4) or 9.0 (H100).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ComputeCapability {
    pub major: u32,
    pub minor: u32,
}

impl ComputeCapability {
    pub const fn new(major: u32, minor: u32) -> Self {
        ComputeCapability { major, minor }
    }

    /// 75 for 7.5, as `CUDA_COMPUTE_CAP` writes it.
    pub fn as_sm(self) -> u32 {
        self.major * 10 + self.minor
    }

    /// 7.5 from 75.
    pub fn from_sm(sm: u32) -> Self {
        ComputeCapability::new(sm / 10, sm % 10)
    }
}

impl fmt::Display for ComputeCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// Ampere: bf16 tensor cores and TF32.
pub const SM_80: ComputeCapability = ComputeCapability::new(8, 0);
/// Ada: fp8 tensor cores (Hopper, 9.0, has them too).
pub const SM_89: ComputeCapability = ComputeCapability::new(8, 9);

/// What kind of device a job would run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceClass {
    /// Candle's CPU backend: f32 and f16 convolutions, no bf16 convolution.
    Cpu,
    /// A CUDA GPU of this compute capability.
    Cuda(ComputeCapability),
    /// The coordinator-testing backend, which computes nothing and so "runs" everything.
    Simulated,
}

/// The oldest compute capability that runs `p`; `None` when every CUDA GPU does.
pub fn min_capability(p: Precision) -> Option<ComputeCapability> {
    match p {
        Precision::F32 | Precision::F16 => None,
        Precision::Bf16 => Some(SM_80),
    }
}

/// Whether `class` can run `p`; the error is one line that says why not.
pub fn check_precision(class: DeviceClass, p: Precision) -> Result<(), String> {
    match (class, p) {
        (DeviceClass::Simulated, _) => Ok(()),
        (DeviceClass::Cpu, Precision::Bf16) => Err(
            "bf16 is not supported on the CPU: Candle's CPU backend has no bf16 convolution; \
             run bf16 on a GPU of sm_80 or newer"
                .into(),
        ),
        (DeviceClass::Cpu, _) => Ok(()),
        (DeviceClass::Cuda(cc), p) => match min_capability(p) {
            Some(min) if cc < min => Err(format!(
                "{p} needs compute capability {min} or newer; this GPU is {cc}"
            )),
            _ => Ok(()),
        },
    }
}

/// Every precision `class` can run, in [`Precision::ALL`] order. An agent declares this per
/// device when it registers, and never claims a job outside it.
pub fn precisions_for(class: DeviceClass) -> Vec<Precision> {
    Precision::ALL
        .into_iter()
        .filter(|p| check_precision(class, *p).is_ok())
        .collect()
}

/// The compute capability of a known GPU kind; `None` for `cpu` and unknown kinds.
pub fn kind_capability(kind: &HardwareKind) -> Option<ComputeCapability> {
    let cc = match kind.as_str() {
        "v100" => (7, 0),
        "t4" => (7, 5),
        "a100" => (8, 0),
        "a10" | "a10g" | "a6000" => (8, 6),
        "l4" | "l40s" | "rtx4090" => (8, 9),
        "h100" | "h200" => (9, 0),
        "b200" => (10, 0),
        _ => return None,
    };
    Some(ComputeCapability::new(cc.0, cc.1))
}

/// Why a job of precision `p` for exactly `kind` can never run, if it cannot. Used at submit, so
/// such a sweep is refused before it queues jobs no agent will take.
pub fn kind_refusal(kind: &HardwareKind, p: Precision) -> Option<String> {
    let class = if kind.is_cpu() {
        DeviceClass::Cpu
    } else {
        DeviceClass::Cuda(kind_capability(kind)?)
    };
    check_precision(class, p)
        .err()
        .map(|why| format!("{kind} cannot run {p}: {why}"))
}

/// The arithmetic a result actually used. f32 convolutions on Ampere and later run on TF32
/// tensor cores (as PyTorch's do by default) unless that is switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MathMode {
    F32,
    Tf32,
    F16,
    Bf16,
}

impl MathMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MathMode::F32 => "f32",
            MathMode::Tf32 => "tf32",
            MathMode::F16 => "f16",
            MathMode::Bf16 => "bf16",
        }
    }

    /// The math of `p` with no tensor-core rounding beyond the storage type.
    pub fn plain(p: Precision) -> Self {
        match p {
            Precision::F32 => MathMode::F32,
            Precision::F16 => MathMode::F16,
            Precision::Bf16 => MathMode::Bf16,
        }
    }

    /// The largest normalised error (max |out - ref| / max |ref|) against the CPU f32 reference
    /// that this math may show. f32 on a GPU differs from the CPU only by summation order; TF32
    /// keeps 10 mantissa bits, f16 10 and bf16 7, and errors grow through 18 layers. Measured on
    /// an H100 (docs/benchmarks.md): about 5e-7, 4e-4, 1e-3 and 7e-3. The bounds leave headroom
    /// over those but catch real bugs, which give errors of order one.
    pub fn correctness_bound(self) -> f64 {
        match self {
            MathMode::F32 => 1e-4,
            MathMode::Tf32 => 5e-3,
            MathMode::F16 => 1e-2,
            MathMode::Bf16 => 5e-2,
        }
    }
}

impl fmt::Display for MathMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MathMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(MathMode::F32),
            "tf32" => Ok(MathMode::Tf32),
            "f16" => Ok(MathMode::F16),
            "bf16" => Ok(MathMode::Bf16),
            _ => Err(format!(
                "unknown math '{s}': expected f32, tf32, f16 or bf16"
            )),
        }
    }
}

/// The math a CUDA convolution of precision `p` uses on `cc`: TF32 for f32 only where it exists
/// (sm_80 and up) and is allowed.
pub fn cuda_math(p: Precision, cc: ComputeCapability, allow_tf32: bool) -> MathMode {
    match p {
        Precision::F32 if allow_tf32 && cc >= SM_80 => MathMode::Tf32,
        p => MathMode::plain(p),
    }
}

/// How a build's kernels reach a GPU: machine code built for it, or PTX the driver compiles at
/// load time for a newer card. Recorded in results so a PTX-JIT number is never mistaken for a
/// native one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelCode {
    Native,
    /// Built for `built`, running on a newer `device` through the driver's PTX compiler.
    PtxJit {
        built: ComputeCapability,
        device: ComputeCapability,
    },
}

impl KernelCode {
    /// From the build's `CUDA_COMPUTE_CAP` and the device's capability.
    pub fn of(built: ComputeCapability, device: ComputeCapability) -> Self {
        if device.as_sm() > built.as_sm() {
            KernelCode::PtxJit { built, device }
        } else {
            KernelCode::Native
        }
    }
}

impl fmt::Display for KernelCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelCode::Native => f.write_str("native"),
            KernelCode::PtxJit { built, device } => {
                write!(f, "ptx-jit ({built} build on a {device} device)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T4: DeviceClass = DeviceClass::Cuda(ComputeCapability::new(7, 5));
    const V100: DeviceClass = DeviceClass::Cuda(ComputeCapability::new(7, 0));
    const A100: DeviceClass = DeviceClass::Cuda(ComputeCapability::new(8, 0));
    const H100: DeviceClass = DeviceClass::Cuda(ComputeCapability::new(9, 0));

    #[test]
    fn bf16_needs_ampere_and_never_runs_on_the_cpu() {
        use Precision::*;
        assert_eq!(precisions_for(T4), vec![F32, F16]);
        assert_eq!(precisions_for(V100), vec![F32, F16]);
        assert_eq!(precisions_for(A100), vec![F32, F16, Bf16]);
        assert_eq!(precisions_for(H100), vec![F32, F16, Bf16]);
        assert_eq!(precisions_for(DeviceClass::Cpu), vec![F32, F16]);
        assert_eq!(
            precisions_for(DeviceClass::Simulated),
            Precision::ALL.to_vec()
        );
        let e = check_precision(T4, Bf16).unwrap_err();
        assert_eq!(
            e,
            "bf16 needs compute capability sm_80 or newer; this GPU is sm_75"
        );
        assert!(!e.contains('\n'));
        let e = check_precision(DeviceClass::Cpu, Bf16).unwrap_err();
        assert!(e.starts_with("bf16 is not supported on the CPU"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn tf32_appears_only_from_sm_80() {
        let t4 = ComputeCapability::new(7, 5);
        let a10 = ComputeCapability::new(8, 6);
        assert_eq!(cuda_math(Precision::F32, t4, true), MathMode::F32);
        assert_eq!(cuda_math(Precision::F32, a10, true), MathMode::Tf32);
        assert_eq!(cuda_math(Precision::F32, a10, false), MathMode::F32);
        assert_eq!(cuda_math(Precision::F16, a10, true), MathMode::F16);
        assert_eq!(cuda_math(Precision::Bf16, a10, true), MathMode::Bf16);
    }

    #[test]
    fn kinds_that_can_never_run_a_precision_are_refused() {
        let k = |s: &str| s.parse::<HardwareKind>().unwrap();
        for kind in ["t4", "v100", "cpu"] {
            let why = kind_refusal(&k(kind), Precision::Bf16).expect(kind);
            assert!(why.starts_with(&format!("{kind} cannot run bf16")), "{why}");
        }
        for kind in ["a100", "a10g", "l4", "h100", "h200", "b200"] {
            assert_eq!(kind_refusal(&k(kind), Precision::Bf16), None, "{kind}");
        }
        assert_eq!(kind_refusal(&k("t4"), Precision::F16), None);
    }

    #[test]
    fn a_build_for_an_older_generation_runs_through_ptx_and_says_so() {
        let sm75 = ComputeCapability::from_sm(75);
        let sm90 = ComputeCapability::from_sm(90);
        assert_eq!(KernelCode::of(sm90, sm90), KernelCode::Native);
        let k = KernelCode::of(sm75, sm90);
        assert_eq!(k.to_string(), "ptx-jit (sm_75 build on a sm_90 device)");
    }

    #[test]
    fn bounds_follow_the_math() {
        assert!(MathMode::F32.correctness_bound() < MathMode::Tf32.correctness_bound());
        assert!(MathMode::F16.correctness_bound() < MathMode::Bf16.correctness_bound());
        for m in [MathMode::F32, MathMode::Tf32, MathMode::F16, MathMode::Bf16] {
            assert_eq!(m.as_str().parse::<MathMode>().unwrap(), m);
        }
        assert!("fp8".parse::<MathMode>().is_err());
    }
}
