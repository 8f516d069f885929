//! The start-up rules a CUDA agent applies before accepting jobs, as pure functions so they are
//! tested on machines without a GPU. `cuda::CudaBackend::open` feeds them what the driver says.

/// "13.0" from the driver's 13000.
pub fn cuda_version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// 13000 from "13.0"; `None` for an empty or malformed version.
pub fn parse_cuda_version(s: &str) -> Option<i32> {
    let mut parts = s.split('.');
    let major: i32 = parts.next()?.trim().parse().ok()?;
    let minor: i32 = parts.next().unwrap_or("0").trim().parse().ok()?;
    Some(major * 1000 + minor * 10)
}

/// The driver must support at least the CUDA version the agent was built with: PTX from a newer
/// toolkit does not load on an older driver.
pub fn check_driver(driver: i32, built_with: &str) -> Result<(), String> {
    match parse_cuda_version(built_with) {
        Some(built) if driver < built => Err(format!(
            "the NVIDIA driver supports CUDA {} but this agent was built with CUDA {}: update the \
             driver, or build the agent with a toolkit no newer than CUDA {} (see README)",
            cuda_version_string(driver),
            built_with,
            cuda_version_string(driver)
        )),
        _ => Ok(()),
    }
}

/// `ordinal` must name one of the `count` GPUs.
pub fn check_ordinal(ordinal: usize, count: usize) -> Result<(), String> {
    if count == 0 {
        return Err("no GPU: the NVIDIA driver is installed but reports no device".into());
    }
    if ordinal >= count {
        return Err(format!(
            "cuda:{ordinal} does not exist: this machine has {count} GPU(s), cuda:0 to cuda:{}",
            count - 1
        ));
    }
    Ok(())
}

/// The GPU must be of the generation Candle's kernels were compiled for. sm_90 builds carry
/// sm_90a code that loads only on Hopper; older targets carry PTX that newer GPUs can compile,
/// but not the other way round.
pub fn check_generation(
    (major, minor): (i32, i32),
    built_for: &str,
    ordinal: usize,
    name: &str,
) -> Result<(), String> {
    let Ok(built) = built_for.parse::<i32>() else {
        return Ok(());
    };
    let have = major * 10 + minor;
    let ok = if built == 90 {
        have == 90
    } else {
        have >= built
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "this agent was built for compute capability {}.{} (CUDA_COMPUTE_CAP={built}) but \
             cuda:{ordinal} is {major}.{minor} ({name}): rebuild with CUDA_COMPUTE_CAP={have} \
             (see deploy/build-agents.sh)",
            built / 10,
            built % 10
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_older_than_the_build_is_refused() {
        assert!(check_driver(13000, "13.0").is_ok());
        assert!(check_driver(13010, "13.0").is_ok());
        let e = check_driver(12080, "13.0").unwrap_err();
        assert!(
            e.contains("supports CUDA 12.8 but this agent was built with CUDA 13.0"),
            "{e}"
        );
        // A CPU-only build has no CUDA version and no constraint.
        assert!(check_driver(11000, "").is_ok());
    }

    #[test]
    fn the_wrong_generation_is_refused() {
        assert!(check_generation((9, 0), "90", 0, "H100").is_ok());
        let e = check_generation((7, 5), "90", 1, "Tesla T4").unwrap_err();
        assert!(e.contains("built for compute capability 9.0"), "{e}");
        assert!(e.contains("CUDA_COMPUTE_CAP=75"), "{e}");
        // Hopper-only code does not run on Blackwell either.
        assert!(check_generation((10, 0), "90", 0, "B200").is_err());
        // PTX for 8.0 runs on newer GPUs, not older ones.
        assert!(check_generation((8, 9), "80", 0, "L4").is_ok());
        assert!(check_generation((7, 5), "80", 0, "T4").is_err());
    }

    #[test]
    fn missing_gpus_are_named() {
        assert!(check_ordinal(0, 0).unwrap_err().contains("no GPU"));
        assert!(check_ordinal(2, 2)
            .unwrap_err()
            .contains("cuda:0 to cuda:1"));
        assert!(check_ordinal(1, 2).is_ok());
    }
}
