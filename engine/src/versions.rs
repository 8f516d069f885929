//! Versions recorded at build time (see `build.rs`), for inventories and result fingerprints.

pub const RUSTC_VERSION: &str = env!("FLEETMARK_RUSTC_VERSION");
pub const CANDLE_VERSION: &str = env!("FLEETMARK_CANDLE_VERSION");
pub const GIT_COMMIT: &str = env!("FLEETMARK_GIT_COMMIT");
/// The compute capability the CUDA kernels were built for ("90"), empty when unset.
pub const CUDA_COMPUTE_CAP: &str = env!("FLEETMARK_CUDA_COMPUTE_CAP");
/// The CUDA toolkit version the agent was built with ("13.0"), empty for CPU-only builds.
pub const CUDA_BUILD_VERSION: &str = env!("FLEETMARK_CUDA_BUILD_VERSION");

/// "CUDA 13.0, sm_90" for CUDA builds, empty otherwise.
pub fn cuda_build() -> String {
    if CUDA_BUILD_VERSION.is_empty() {
        String::new()
    } else {
        format!("CUDA {CUDA_BUILD_VERSION}, sm_{CUDA_COMPUTE_CAP}")
    }
}

pub fn fingerprint() -> fleetmark_core::Fingerprint {
    fleetmark_core::Fingerprint {
        fleetmark_version: fleetmark_core::FLEETMARK_VERSION.into(),
        git_commit: GIT_COMMIT.into(),
        candle_version: CANDLE_VERSION.into(),
        rustc_version: RUSTC_VERSION.into(),
        cuda_driver_version: String::new(),
        cudnn_version: String::new(),
    }
}
