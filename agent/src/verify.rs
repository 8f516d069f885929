//! `fleetmark-agent verify`: checks every path and precision this agent can run against golden
//! logits written by the PyTorch reference script (`scripts/bench/pytorch_reference.py golden`),
//! for the same weights file and the agent's deterministic input.

use std::path::Path;

use fleetmark_core::{Correctness, EnginePath, JobSpec, MeasurementSpec, Precision, WeightsSpec};
use fleetmark_engine::{
    correctness::{bound_for, compare},
    device::{open_backend, parse_devices, BackendOptions},
    input::{input_batch, INPUT_SEED},
    ModelWeights,
};
use serde::Serialize;

use crate::AgentError;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub device: String,
    pub path: String,
    pub precision: String,
    pub math: String,
    pub correctness: Correctness,
    pub error: Option<String>,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |cause| AgentError::Io { context, cause }
}

/// Runs the checks; returns one line per (device, path, precision). `options` are the backend's,
/// fused knobs included, so a lever configuration is checked as a benchmark would run it.
pub fn run(
    weights_path: &Path,
    input_path: &Path,
    golden_path: &Path,
    devices: &str,
    precisions: &[Precision],
    engines: &[EnginePath],
    options: &BackendOptions,
) -> Result<Vec<Check>, AgentError> {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden_path)
            .map_err(io(format!("cannot read {}", golden_path.display())))?,
    )
    .map_err(|e| AgentError::Config(format!("{}: not JSON: {e}", golden_path.display())))?;
    let rows = golden["logits"].as_array().ok_or_else(|| {
        AgentError::Config(format!("{} has no 'logits' array", golden_path.display()))
    })?;
    let reference: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.as_array().cloned().unwrap_or_default())
        .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
        .collect();
    let images = rows.len();
    if images == 0 || reference.len() != images * 1000 {
        return Err(AgentError::Config(format!(
            "{}: expected rows of 1000 logits",
            golden_path.display()
        )));
    }
    // The golden logits must be of the very input this agent generates.
    let tensors = candle_core::safetensors::load(input_path, &candle_core::Device::Cpu)
        .map_err(|e| AgentError::Config(format!("{}: {e}", input_path.display())))?;
    let input = tensors.get("input").ok_or_else(|| {
        AgentError::Config(format!("{} has no 'input' tensor", input_path.display()))
    })?;
    let (n, _, size, _) = input
        .dims4()
        .map_err(|e| AgentError::Config(format!("input: {e}")))?;
    let ours = input_batch(INPUT_SEED, n, size).map_err(|e| AgentError::Config(e.to_string()))?;
    let same = (input - &ours)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .map_err(|e| AgentError::Config(e.to_string()))?;
    if n != images || same != 0.0 {
        return Err(AgentError::Config(format!(
            "{} is not this agent's input (export it with `fleetmark-agent export --input`)",
            input_path.display()
        )));
    }
    let weights = ModelWeights::from_file(weights_path)?;
    let mut out = Vec::new();
    for spec in parse_devices(devices)? {
        let mut backend = open_backend(spec, options)?;
        for &engine in engines {
            for &precision in precisions {
                let job = JobSpec {
                    model: "resnet18".into(),
                    batch_size: n as u32,
                    precision,
                    image_size: size as u32,
                    target: fleetmark_core::HardwareTarget::Any,
                    engine,
                    weights: WeightsSpec::File {
                        path: weights_path
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    },
                    measurement: MeasurementSpec::default(),
                    repetition: 0,
                };
                let outcome =
                    fleetmark_core::capability::check_precision(backend.class(), precision)
                        .map_err(fleetmark_engine::EngineError::Unsupported)
                        .and_then(|()| backend.prepare(&job, &weights))
                        .and_then(|mut p| {
                            let info = p.info();
                            let math = p.math();
                            let logits = p.logits()?;
                            Ok((info, math, logits))
                        });
                let (path, math, correctness, error) = match outcome {
                    Ok((info, math, logits)) => {
                        let bound = bound_for(math);
                        (
                            info.path,
                            info.math,
                            compare(&logits, &reference, bound),
                            None,
                        )
                    }
                    Err(e) => (
                        engine.to_string(),
                        String::new(),
                        Correctness::default(),
                        Some(e.to_string()),
                    ),
                };
                out.push(Check {
                    device: spec.to_string(),
                    path,
                    precision: precision.to_string(),
                    math,
                    correctness,
                    error,
                });
            }
        }
    }
    Ok(out)
}
