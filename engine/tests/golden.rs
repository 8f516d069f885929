//! The Candle model against an independent implementation: PyTorch's torchvision ResNet18.
//!
//! `tests/golden/resnet18_seed0_224.json` holds logits that `scripts/reference/golden_cpu.py`
//! computed (in float64, on the CPU) from the weights `ModelWeights::seeded(0)` generates and the
//! input `input_batch(INPUT_SEED, 2, 224)` generates, both exported by `fleetmark-agent export`.
//! This test regenerates those tensors here, runs the stock and the folded Candle CPU f32 models,
//! and requires both to match the golden logits within the CPU f32 bound (1e-4, normalised by
//! the largest logit) with the same top-1 class. The regeneration commands are in
//! `scripts/reference/README.md`.
//!
//! Unlike `tests/model.rs`, which checks Candle against Candle, this catches a layer that is
//! wrong in both paths (a transposed weight, a missing ReLU, the wrong padding or pooling):
//! `a_wrong_model_fails_the_golden_comparison` shows that such a change does fail.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use fleetmark_engine::{
    correctness::compare,
    input::{input_batch, INPUT_SEED},
    resnet::ResNet18,
    ModelWeights,
};
use serde_json::Value;

const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/resnet18_seed0_224.json"
);
const SEED: u64 = 0;
const IMAGES: usize = 2;
const SIZE: usize = 224;
const BOUND: f64 = 1e-4;

struct Golden {
    logits: Vec<f32>,
    json: Value,
}

fn golden() -> Golden {
    let text = std::fs::read_to_string(GOLDEN)
        .unwrap_or_else(|e| panic!("cannot read {GOLDEN}: {e} (see scripts/reference/README.md)"));
    let json: Value = serde_json::from_str(&text).expect("golden file is valid JSON");
    assert_eq!(json["generator"], "scripts/reference/golden_cpu.py");
    assert_eq!(json["seed"], SEED);
    assert_eq!(
        json["input_shape"],
        serde_json::json!([IMAGES, 3, SIZE, SIZE])
    );
    let rows = json["logits"]
        .as_array()
        .expect("logits is an array of rows");
    assert_eq!(rows.len(), IMAGES, "golden file has {} rows", rows.len());
    let mut logits = Vec::with_capacity(IMAGES * 1000);
    for row in rows {
        let row = row.as_array().expect("each logits row is an array");
        assert_eq!(row.len(), 1000);
        logits.extend(
            row.iter()
                .map(|v| v.as_f64().expect("logit is a number") as f32),
        );
    }
    Golden { logits, json }
}

fn candle_logits(tensors: HashMap<String, Tensor>, fold: bool) -> Vec<f32> {
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let model = ResNet18::load(vb, fold).unwrap();
    let x = input_batch(INPUT_SEED, IMAGES, SIZE).unwrap();
    model
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The golden logits were computed from these exact weights.
///
/// The check uses Fleetmark's content hash (`ModelWeights::info.sha256` for seeded weights:
/// names, shapes and values), which the Python script recomputes from the tensors it loaded and
/// stores as `weights_content_sha256`. It does not use the hash of the safetensors file's bytes
/// (`weights_sha256` in the JSON, kept for provenance): that layout belongs to the safetensors
/// writer and could change with a Candle upgrade while every tensor stays the same, which would
/// fail this test for no reason. The content hash changes exactly when the weights do.
#[test]
fn golden_file_was_made_from_the_seeded_weights() {
    let g = golden();
    let w = ModelWeights::seeded(SEED).unwrap();
    assert_eq!(
        g.json["weights_content_sha256"].as_str(),
        Some(w.info.sha256.as_str()),
        "the golden logits were computed from other weights than ModelWeights::seeded({SEED}): \
         regenerate them (scripts/reference/README.md)"
    );
}

#[test]
fn stock_and_folded_candle_match_pytorch() {
    let g = golden();
    let w = ModelWeights::seeded(SEED).unwrap();
    for fold in [false, true] {
        let out = candle_logits(w.tensors.clone(), fold);
        let c = compare(&out, &g.logits, BOUND);
        eprintln!(
            "fold={fold}: max rel error {:.3e}, max abs error {:.3e}, top-1 agreement {}",
            c.max_rel_error, c.max_abs_error, c.top1_agreement
        );
        assert!(c.passed, "fold={fold}: Candle differs from PyTorch: {c:?}");
        assert_eq!(c.top1_agreement, 1.0, "fold={fold}: {c:?}");
        assert_eq!(c.images_compared as usize, IMAGES);
    }
}

/// The comparison above can fail: a model with one layer wrong is far outside the bound.
#[test]
fn a_wrong_model_fails_the_golden_comparison() {
    let g = golden();
    let mut tensors = ModelWeights::seeded(SEED).unwrap().tensors;
    // One batch norm in the middle of the network with its running variance doubled: the sort
    // of slip (eps or var mixed up, a wrong stride) that a Candle-vs-Candle test cannot see.
    let key = "layer3.0.bn2.running_var";
    let doubled = (tensors[key].clone() * 2.0).unwrap();
    tensors.insert(key.into(), doubled);
    let out = candle_logits(tensors, false);
    let c = compare(&out, &g.logits, BOUND);
    assert!(!c.passed, "a wrong layer went unnoticed: {c:?}");
    assert!(c.max_rel_error > 100.0 * BOUND, "{c:?}");
}
