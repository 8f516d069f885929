//! Property tests for weights loading: any bytes, and any mutation of a real safetensors file,
//! load or fail with a clear `Weights` error; never a panic, never a huge allocation.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use fleetmark_engine::{EngineError, ModelWeights};
use proptest::prelude::*;

fn small_file() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let t = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0], (2, 2), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("fc.bias".to_string(), t)]), &path).unwrap();
    std::fs::read(path).unwrap()
}

fn check(bytes: &[u8]) {
    match ModelWeights::from_bytes(bytes, "fuzz.safetensors") {
        Ok(_) => panic!("a non-resnet file loaded"),
        Err(EngineError::Weights(m)) => assert!(m.len() < 1000, "{m}"),
        Err(other) => panic!("not a weights error: {other}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1024,
        max_shrink_iters: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_bytes_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check(&bytes);
    }

    #[test]
    fn mutated_files_fail_cleanly(at in any::<usize>(), byte in any::<u8>(), cut in any::<usize>(),
                                  header_len in any::<u64>()) {
        let good = small_file();
        let mut bytes = good.clone();
        let at = at % bytes.len();
        bytes[at] = byte;
        check(&bytes);
        check(&good[..cut % good.len()]);
        // A header length that claims far more than the file holds.
        let mut lying = good;
        lying[..8].copy_from_slice(&header_len.to_le_bytes());
        check(&lying);
    }
}
