//! Records, at build time, the versions every result's fingerprint names: rustc, Candle (read
//! from the workspace lock file), the git commit, and for CUDA builds the toolkit and the compute
//! capability the kernels were compiled for.

use std::{path::Path, process::Command};

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FLEETMARK_RUSTC_VERSION={rustc_version}");

    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    let lock = Path::new(&manifest).join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let candle = std::fs::read_to_string(&lock)
        .ok()
        .and_then(|text| {
            let mut lines = text.lines();
            while let Some(line) = lines.next() {
                if line.trim() == "name = \"candle-core\"" {
                    return lines
                        .next()
                        .and_then(|v| v.trim().strip_prefix("version = "))
                        .map(|v| v.trim_matches('"').to_string());
                }
            }
            None
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FLEETMARK_CANDLE_VERSION={candle}");

    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(&manifest)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FLEETMARK_GIT_COMMIT={commit}");
    // HEAD names a branch; a commit changes the branch's ref (or packed-refs), not HEAD. Git
    // resolves the paths: in a linked worktree `.git` is a file, HEAD is in the worktree's own
    // git directory and the refs are in the main repository's.
    let git_path = |p: &str| {
        Command::new("git")
            .args(["rev-parse", "--git-path", p])
            .current_dir(&manifest)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| Path::new(&manifest).join(s.trim()))
    };
    if let Some(head) = git_path("HEAD").filter(|h| h.exists()) {
        println!("cargo:rerun-if-changed={}", head.display());
        if let Some(r) = std::fs::read_to_string(&head)
            .ok()
            .and_then(|h| h.strip_prefix("ref: ").map(|r| r.trim().to_string()))
            .and_then(|r| git_path(&r))
        {
            println!("cargo:rerun-if-changed={}", r.display());
        }
        if let Some(packed) = git_path("packed-refs") {
            println!("cargo:rerun-if-changed={}", packed.display());
        }
    }

    // Only meaningful with the cuda feature; recorded so the agent can refuse to start on a GPU
    // generation or driver its kernels cannot run on.
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_default();
    println!("cargo:rustc-env=FLEETMARK_CUDA_COMPUTE_CAP={cap}");
    let nvcc = std::env::var("CUDA_ROOT")
        .map(|r| Path::new(&r).join("bin/nvcc"))
        .ok()
        .filter(|p| p.exists())
        .map(|p| p.into_os_string())
        .unwrap_or_else(|| "nvcc".into());
    let cuda = if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        Command::new(nvcc)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| {
                s.split("release ")
                    .nth(1)
                    .and_then(|r| r.split(',').next())
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_default()
    } else {
        String::new()
    };
    println!("cargo:rustc-env=FLEETMARK_CUDA_BUILD_VERSION={cuda}");

    #[cfg(feature = "cudnn")]
    kernels::build();
}

/// The fused path's own kernels (`kernels/*.cu`), compiled to PTX for the same compute
/// capability as Candle's (`CUDA_COMPUTE_CAP`, else the local GPU), the way candle-kernels
/// builds its own, and embedded as `&str` constants (`kernels_ptx.rs` in `OUT_DIR`).
#[cfg(feature = "cudnn")]
mod kernels {
    pub fn build() {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let result = cudaforge::KernelBuilder::new()
            .source_files(["kernels/maxpool.cu", "kernels/stem_pool.cu"])
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .and_then(|ptx| ptx.write(out.join("kernels_ptx.rs")));
        if let Err(e) = result {
            panic!("building the fused path's CUDA kernels (engine/kernels) failed: {e}");
        }
    }
}
