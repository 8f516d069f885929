//! The correctness gate: before a result's speed is trusted, its output must match a CPU f32
//! forward pass of the same weights on the same input.

use std::sync::Mutex;

use candle_core::{DType, Device, Module};
use candle_nn::VarBuilder;
use fleetmark_core::{Correctness, MathMode};

use crate::{
    input::{input_batch, INPUT_SEED},
    resnet::ResNet18,
    EngineError, ModelWeights,
};

/// How many images of the batch the gate compares: enough to catch indexing across the batch
/// dimension, few enough that the CPU reference stays quick.
pub const GATE_IMAGES: usize = 2;

/// The largest normalised error (max |out - ref| / max |ref|) output computed in `math` may show:
/// the bound follows the arithmetic actually used, not the storage precision asked for (see
/// [`MathMode::correctness_bound`]).
pub fn bound_for(math: MathMode) -> f64 {
    math.correctness_bound()
}

/// CPU f32 logits of the first `images` images of the deterministic input. The last answer is
/// kept, since a sweep asks for the same reference for every batch size.
pub fn reference_logits(
    weights: &ModelWeights,
    images: usize,
    size: usize,
) -> Result<Vec<f32>, EngineError> {
    type Key = (String, usize, usize);
    static LAST: Mutex<Option<(Key, Vec<f32>)>> = Mutex::new(None);
    let key = (weights.info.sha256.clone(), images, size);
    if let Some((k, v)) = LAST.lock().expect("reference cache").as_ref() {
        if *k == key {
            return Ok(v.clone());
        }
    }
    let logits = compute_reference(weights, images, size)?;
    *LAST.lock().expect("reference cache") = Some((key, logits.clone()));
    Ok(logits)
}

fn compute_reference(
    weights: &ModelWeights,
    images: usize,
    size: usize,
) -> Result<Vec<f32>, EngineError> {
    let vb = VarBuilder::from_tensors(weights.tensors.clone(), DType::F32, &Device::Cpu);
    let model = ResNet18::load(vb, false)?;
    let x = input_batch(INPUT_SEED, images, size)?;
    Ok(model.forward(&x)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Compares `candidate` (rows of 1000 logits, at least as many rows as `reference`) with the
/// reference rows.
pub fn compare(candidate: &[f32], reference: &[f32], bound: f64) -> Correctness {
    let images = reference.len() / 1000;
    let candidate = &candidate[..reference.len().min(candidate.len())];
    let ref_max = reference.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let mut max_abs = 0f64;
    let mut finite = candidate.len() == reference.len();
    for (c, r) in candidate.iter().zip(reference) {
        if !c.is_finite() {
            finite = false;
        }
        max_abs = max_abs.max((*c as f64 - *r as f64).abs());
    }
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    let agree = (0..images)
        .filter(|i| {
            let s = i * 1000..(i + 1) * 1000;
            candidate.len() >= s.end && argmax(&candidate[s.clone()]) == argmax(&reference[s])
        })
        .count();
    let max_rel = if ref_max > 0.0 {
        max_abs / ref_max
    } else {
        max_abs
    };
    let max_rel = if finite { max_rel } else { f64::INFINITY };
    Correctness {
        reference: "candle-cpu f32, batch norm unfolded".into(),
        images_compared: images as u32,
        max_rel_error: max_rel,
        max_abs_error: max_abs,
        top1_agreement: if images > 0 {
            agree as f64 / images as f64
        } else {
            0.0
        },
        bound,
        passed: finite && max_rel <= bound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_outputs_pass_and_garbage_fails() {
        let r: Vec<f32> = (0..2000).map(|i| (i as f32 * 0.37).sin()).collect();
        let ok = compare(&r, &r, 1e-4);
        assert!(ok.passed);
        assert_eq!(ok.top1_agreement, 1.0);
        assert_eq!(ok.max_rel_error, 0.0);

        let mut bad = r.clone();
        bad[1500] += 0.5;
        let c = compare(&bad, &r, 1e-2);
        assert!(!c.passed);
        assert!((c.max_abs_error - 0.5).abs() < 1e-6);

        let mut nan = r.clone();
        nan[3] = f32::NAN;
        assert!(!compare(&nan, &r, 1.0).passed, "NaN never passes");
        assert!(
            !compare(&r[..1000], &r, 1.0).passed,
            "missing rows never pass"
        );
    }
}
