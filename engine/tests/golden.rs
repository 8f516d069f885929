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
    let g = read_golden(GOLDEN);
    assert_eq!(g.json["generator"], "scripts/reference/golden_cpu.py");
    assert_eq!(g.json["seed"], SEED);
    assert_eq!(
        g.json["input_shape"],
        serde_json::json!([IMAGES, 3, SIZE, SIZE])
    );
    g
}

/// Reads a golden JSON file (the format of `scripts/reference/golden_cpu.py`, which
/// `scripts/bench/pytorch_reference.py golden` shares).
fn read_golden(path: &str) -> Golden {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {path}: {e} (see scripts/reference/README.md)"));
    let json: Value = serde_json::from_str(&text).expect("golden file is valid JSON");
    let shape: Vec<usize> = json["input_shape"]
        .as_array()
        .expect("input_shape is an array")
        .iter()
        .map(|v| v.as_u64().expect("input_shape holds integers") as usize)
        .collect();
    let images = shape[0];
    let rows = json["logits"]
        .as_array()
        .expect("logits is an array of rows");
    assert_eq!(rows.len(), images, "golden file has {} rows", rows.len());
    let mut logits = Vec::with_capacity(images * 1000);
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
    candle_logits_for(tensors, fold, IMAGES, SIZE)
}

fn candle_logits_for(
    tensors: HashMap<String, Tensor>,
    fold: bool,
    images: usize,
    size: usize,
) -> Vec<f32> {
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let model = ResNet18::load(vb, fold).unwrap();
    let x = input_batch(INPUT_SEED, images, size).unwrap();
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

/// An extra golden file, such as `scripts/bench/pytorch_reference.py golden` writes from
/// PyTorch-initialised weights on a GPU (fp32, TF32 off), checked against Candle's CPU model:
///
/// ```sh
/// FLEETMARK_GOLDEN_JSON=golden.json FLEETMARK_GOLDEN_WEIGHTS=w.safetensors \
///     cargo test -p fleetmark-engine --test golden extra_golden -- --nocapture
/// ```
///
/// The golden's input must be Fleetmark's deterministic input (`fleetmark-agent export --input`
/// or `--fleetmark-input B:S`), which is regenerated here. Without the two variables the test
/// only says that it was skipped.
#[test]
fn extra_golden_from_the_environment() {
    let (Ok(json), Ok(weights)) = (
        std::env::var("FLEETMARK_GOLDEN_JSON"),
        std::env::var("FLEETMARK_GOLDEN_WEIGHTS"),
    ) else {
        eprintln!("FLEETMARK_GOLDEN_JSON / FLEETMARK_GOLDEN_WEIGHTS not set: nothing to check");
        return;
    };
    let g = read_golden(&json);
    let w = ModelWeights::from_file(std::path::Path::new(&weights)).unwrap();
    // For a weights file Fleetmark's hash is that of the file's bytes, as the script's.
    assert_eq!(
        g.json["weights_sha256"].as_str(),
        Some(w.info.sha256.as_str()),
        "{json} was computed from other weights than {weights}"
    );
    let shape = g.json["input_shape"].as_array().unwrap();
    let images = shape[0].as_u64().unwrap() as usize;
    let size = shape[2].as_u64().unwrap() as usize;
    for fold in [false, true] {
        let out = candle_logits_for(w.tensors.clone(), fold, images, size);
        let c = compare(&out, &g.logits, BOUND);
        eprintln!(
            "{json} fold={fold}: max rel error {:.3e}, top-1 agreement {}",
            c.max_rel_error, c.top1_agreement
        );
        assert!(c.passed, "fold={fold}: {c:?}");
        assert_eq!(c.top1_agreement, 1.0, "fold={fold}: {c:?}");
    }
}
