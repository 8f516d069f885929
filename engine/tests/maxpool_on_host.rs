//! The fused path's own max pool kernel (`engine/kernels/maxpool.cu`) compiled for the host
//! through a small shim (`tests/host/cuda_shim.h`, a loop playing the grid) and checked against
//! a plain max pool over decoded values, in f16, bf16 and f32, at the stem's shape, odd sizes
//! and a capped grid. This runs in every CI run, without a GPU or the CUDA toolkit, so the
//! kernel's indexing and value ordering are tested even where it cannot run; on a GPU the
//! executor also compares its output with cuDNN's before using it.

use std::{path::Path, process::Command};

#[test]
fn the_max_pool_kernel_matches_a_plain_max_pool_on_the_host() {
    // Its 32-bit index loop (what runs) and its 64-bit one (for outputs past 2^31 vectors).
    for wide in [false, true] {
        let out = build_and_run(wide);
        // 5 shapes x 2 grids x 3 precisions.
        let ok = out.lines().filter(|l| l.starts_with("ok ")).count();
        assert_eq!(ok, 30, "wide index {wide}:\n{out}");
    }
}

/// Compiles the check (with the address and undefined-behaviour sanitizers where the compiler
/// has them, so an out-of-bounds index fails it too), runs it and returns what it printed.
fn build_and_run(wide: bool) -> String {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("a scratch folder");
    let exe = dir.path().join("maxpool_check");
    let compile = |cxx: &str, sanitize: bool| {
        let mut c = Command::new(cxx);
        c.args(["-std=c++17", "-O2", "-Wall", "-Wno-unknown-pragmas", "-I"])
            .arg(here.join("tests/host"))
            .arg(here.join("tests/host/maxpool_check.cpp"))
            .arg("-o")
            .arg(&exe);
        if sanitize {
            c.arg("-fsanitize=address,undefined")
                .arg("-fno-sanitize-recover=all");
        }
        if wide {
            c.arg("-DMAXPOOL_WIDE_INDEX");
        }
        c.output()
    };
    let built = ["c++", "g++"]
        .iter()
        .find_map(|cxx| compile(cxx, true).ok())
        .unwrap_or_else(|| {
            panic!("the kernel's host check needs a C++17 compiler (c++ or g++) on PATH")
        });
    let built = if built.status.success() {
        built
    } else {
        eprintln!(
            "no sanitizers here ({}); checking without them",
            String::from_utf8_lossy(&built.stderr)
                .lines()
                .next()
                .unwrap_or("")
        );
        ["c++", "g++"]
            .iter()
            .find_map(|cxx| compile(cxx, false).ok())
            .expect("the compiler ran a moment ago")
    };
    assert!(
        built.status.success(),
        "the kernel did not compile for the host:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe).output().expect("run the host check");
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    println!("{out}");
    assert!(
        run.status.success(),
        "the kernel's output is wrong (wide index {wide}):\n{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    out
}
