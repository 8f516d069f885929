//! ResNet18 weights: generated deterministically from a seed, or loaded from a safetensors file
//! whose names are torchvision's `resnet18().state_dict()` keys.
//!
//! Seeded weights let every agent run the same model without shipping 45 MB around, and let the
//! golden test regenerate the exact tensors the reference script was given. They are not
//! torchvision's own initialisation; they are scaled like it (Kaiming for convolutions), and the
//! batch-norm statistics are deliberately not the identity, so that folding them is exercised.

use std::{collections::HashMap, path::Path};

use candle_core::{DType, Device, Tensor};
use fleetmark_core::{WeightsInfo, WeightsRef, WeightsSpec};
use sha2::{Digest, Sha256};

use crate::EngineError;

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    /// Kaiming-uniform over fan-out, as torchvision's `kaiming_normal_(mode="fan_out")` scales.
    Conv {
        fan_out: usize,
    },
    Uniform {
        lo: f32,
        hi: f32,
    },
    Counter,
}

/// Every tensor in torchvision's resnet18 `state_dict`, with its shape and initialisation.
fn resnet18_parameters() -> Vec<(String, Vec<usize>, Init)> {
    let mut p = Vec::new();
    let conv = |p: &mut Vec<_>, name: String, k: usize, c: usize, r: usize| {
        p.push((
            format!("{name}.weight"),
            vec![k, c, r, r],
            Init::Conv { fan_out: k * r * r },
        ));
    };
    let bn = |p: &mut Vec<_>, name: String, c: usize| {
        p.push((
            format!("{name}.weight"),
            vec![c],
            Init::Uniform { lo: 0.7, hi: 1.3 },
        ));
        p.push((
            format!("{name}.bias"),
            vec![c],
            Init::Uniform { lo: -0.2, hi: 0.2 },
        ));
        p.push((
            format!("{name}.running_mean"),
            vec![c],
            Init::Uniform { lo: -0.2, hi: 0.2 },
        ));
        p.push((
            format!("{name}.running_var"),
            vec![c],
            Init::Uniform { lo: 0.6, hi: 1.6 },
        ));
        p.push((format!("{name}.num_batches_tracked"), vec![], Init::Counter));
    };
    conv(&mut p, "conv1".into(), 64, 3, 7);
    bn(&mut p, "bn1".into(), 64);
    let mut in_c = 64;
    for (layer, out_c) in [(1, 64), (2, 128), (3, 256), (4, 512)] {
        for block in 0..2 {
            let prefix = format!("layer{layer}.{block}");
            let block_in = if block == 0 { in_c } else { out_c };
            conv(&mut p, format!("{prefix}.conv1"), out_c, block_in, 3);
            bn(&mut p, format!("{prefix}.bn1"), out_c);
            conv(&mut p, format!("{prefix}.conv2"), out_c, out_c, 3);
            bn(&mut p, format!("{prefix}.bn2"), out_c);
            if block == 0 && layer > 1 {
                conv(&mut p, format!("{prefix}.downsample.0"), out_c, in_c, 1);
                bn(&mut p, format!("{prefix}.downsample.1"), out_c);
            }
        }
        in_c = out_c;
    }
    let bound = 1.0 / (512f32).sqrt();
    p.push((
        "fc.weight".into(),
        vec![1000, 512],
        Init::Uniform {
            lo: -bound,
            hi: bound,
        },
    ));
    p.push((
        "fc.bias".into(),
        vec![1000],
        Init::Uniform {
            lo: -bound,
            hi: bound,
        },
    ));
    p
}

/// SplitMix64: tiny, fast, and the same on every platform, which is all seeded weights need.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi), from the top 24 bits so every value is exact in f32.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }
}

/// Weights on the host in f32, with a record of where they came from.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    pub tensors: HashMap<String, Tensor>,
    pub info: WeightsInfo,
}

/// Largest weights file an agent reads: ResNet18 in f32 is about 45 MB.
pub const MAX_WEIGHTS_FILE_BYTES: u64 = 1 << 30;

impl ModelWeights {
    /// Loads the weights a job names. File weights come only from `weights_dir`, the directory
    /// the agent's operator allows (`--weights-dir`): the spec names a plain file in it or the
    /// SHA-256 of one. Errors name only what the spec said, never a path, so they reveal
    /// nothing about files outside the directory.
    pub fn load(spec: &WeightsSpec, weights_dir: Option<&Path>) -> Result<Self, EngineError> {
        match spec {
            WeightsSpec::Seeded { seed } => Self::seeded(*seed),
            WeightsSpec::File { path } => {
                let wanted =
                    WeightsRef::parse(path).map_err(|e| EngineError::Weights(e.to_string()))?;
                let dir = weights_dir.ok_or_else(|| {
                    EngineError::Weights(
                        "this agent serves no file weights: its operator did not start it with \
                         --weights-dir"
                            .into(),
                    )
                })?;
                let (name, bytes) = read_from_dir(dir, &wanted)?;
                Self::from_bytes(&bytes, &name)
            }
        }
    }

    /// Deterministic weights for `seed`. Each tensor draws from its own stream (seeded by the
    /// run's seed and the tensor's name), so adding a tensor never changes the others.
    pub fn seeded(seed: u64) -> Result<Self, EngineError> {
        let mut tensors = HashMap::new();
        for (name, shape, init) in resnet18_parameters() {
            let mut name_hash = Sha256::new();
            name_hash.update(seed.to_le_bytes());
            name_hash.update(name.as_bytes());
            let digest = name_hash.finalize();
            let stream_seed = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
            let mut rng = SplitMix64::new(stream_seed);
            let n: usize = shape.iter().product::<usize>().max(1);
            let t = match init {
                Init::Counter => Tensor::new(0i64, &Device::Cpu)?,
                Init::Conv { fan_out } => {
                    let bound = (6.0 / fan_out as f32).sqrt();
                    let v: Vec<f32> = (0..n).map(|_| rng.uniform(-bound, bound)).collect();
                    Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?
                }
                Init::Uniform { lo, hi } => {
                    let v: Vec<f32> = (0..n).map(|_| rng.uniform(lo, hi)).collect();
                    Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?
                }
            };
            tensors.insert(name, t);
        }
        let sha256 = hash_tensors(&tensors)?;
        Ok(ModelWeights {
            tensors,
            info: WeightsInfo {
                source: format!("seeded:{seed}"),
                sha256,
            },
        })
    }

    /// Loads a safetensors file with torchvision's names. Every expected tensor must be present
    /// with the expected shape; extra tensors are an error too, since they mean a different model.
    pub fn from_file(path: &Path) -> Result<Self, EngineError> {
        let bytes = std::fs::read(path)
            .map_err(|e| EngineError::Weights(format!("cannot read {}: {e}", path.display())))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_bytes(&bytes, &name).map_err(|e| match e {
            EngineError::Weights(m) => EngineError::Weights(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses safetensors bytes; `name` (a file name, never a path) labels errors and the
    /// result's weights source.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Self, EngineError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let loaded = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| {
            EngineError::Weights(format!("'{name}' is not a safetensors file: {e}"))
        })?;
        let mut tensors = HashMap::new();
        let expected = resnet18_parameters();
        for (tensor, shape, _) in &expected {
            let t = loaded.get(tensor).ok_or_else(|| {
                EngineError::Weights(format!(
                    "'{name}' has no tensor '{tensor}': expected torchvision resnet18 state_dict names"
                ))
            })?;
            if t.dims() != shape.as_slice() {
                return Err(EngineError::Weights(format!(
                    "tensor '{tensor}' in '{name}' has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
            let t = if tensor.ends_with("num_batches_tracked") {
                t.to_dtype(DType::I64)?
            } else {
                t.to_dtype(DType::F32)?
            };
            tensors.insert(tensor.clone(), t);
        }
        if let Some(extra) = loaded.keys().find(|k| !tensors.contains_key(*k)) {
            return Err(EngineError::Weights(format!(
                "'{name}' has an unexpected tensor '{}': not a torchvision resnet18",
                fleetmark_core::limits::Excerpt::of(extra)
            )));
        }
        Ok(ModelWeights {
            tensors,
            info: WeightsInfo {
                source: format!("file:{name}"),
                sha256,
            },
        })
    }

    /// Writes the weights as safetensors with torchvision's names.
    pub fn save(&self, path: &Path) -> Result<(), EngineError> {
        candle_core::safetensors::save(&self.tensors, path)
            .map_err(|e| EngineError::Weights(format!("cannot write {}: {e}", path.display())))
    }
}

/// Reads the weights file `wanted` names from `dir`, returning its file name and bytes. Only
/// regular files directly inside `dir` (after resolving links) qualify; anything else, missing
/// or not, gets the same answer, so a sweep learns nothing about the rest of the disk.
fn read_from_dir(dir: &Path, wanted: &WeightsRef) -> Result<(String, Vec<u8>), EngineError> {
    let refused = || {
        EngineError::Weights(match wanted {
            WeightsRef::Name(n) => {
                format!("no weights file '{n}' in this agent's weights directory")
            }
            WeightsRef::Sha256(h) => {
                format!("no weights file with sha256 {h} in this agent's weights directory")
            }
        })
    };
    let root = dir.canonicalize().map_err(|_| refused())?;
    match wanted {
        WeightsRef::Name(n) => {
            let bytes = read_inside(&root, &root.join(n)).ok_or_else(refused)?;
            Ok((n.clone(), bytes))
        }
        WeightsRef::Sha256(h) => {
            let entries = std::fs::read_dir(&root).map_err(|_| refused())?;
            for entry in entries.flatten() {
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if let Some(bytes) = read_inside(&root, &entry.path()) {
                    if hex::encode(Sha256::digest(&bytes)) == *h {
                        return Ok((name, bytes));
                    }
                }
            }
            Err(refused())
        }
    }
}

/// The bytes of `path` if it resolves to a regular file directly inside `root` and is at most
/// [`MAX_WEIGHTS_FILE_BYTES`] long; `None` otherwise, whatever the reason.
fn read_inside(root: &Path, path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let real = path.canonicalize().ok()?;
    if real.parent() != Some(root) {
        return None;
    }
    let file = std::fs::File::open(&real).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_WEIGHTS_FILE_BYTES {
        return None;
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_WEIGHTS_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    (bytes.len() as u64 <= MAX_WEIGHTS_FILE_BYTES).then_some(bytes)
}

/// SHA-256 over names, shapes and f32/i64 bytes in name order: identical tensors give an
/// identical hash however they were produced.
fn hash_tensors(tensors: &HashMap<String, Tensor>) -> Result<String, EngineError> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut h = Sha256::new();
    for name in names {
        let t = &tensors[name];
        h.update(name.as_bytes());
        for d in t.dims() {
            h.update((*d as u64).to_le_bytes());
        }
        match t.dtype() {
            DType::I64 => {
                for v in t.flatten_all()?.to_vec1::<i64>()? {
                    h.update(v.to_le_bytes());
                }
            }
            _ => {
                for v in t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
                    h.update(v.to_le_bytes());
                }
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_weights_are_deterministic_and_seed_dependent() {
        let a = ModelWeights::seeded(7).unwrap();
        let b = ModelWeights::seeded(7).unwrap();
        let c = ModelWeights::seeded(8).unwrap();
        assert_eq!(a.info.sha256, b.info.sha256);
        assert_ne!(a.info.sha256, c.info.sha256);
        // torchvision's resnet18 has 122 state_dict entries and 11,689,512 parameters.
        assert_eq!(a.tensors.len(), 122);
        let params: usize = a
            .tensors
            .iter()
            .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
            .map(|(_, t)| t.elem_count())
            .sum();
        assert_eq!(params, 11_689_512 + 9_600);
    }

    #[test]
    fn save_and_load_round_trip_and_bad_files_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let a = ModelWeights::seeded(1).unwrap();
        a.save(&path).unwrap();
        let b = ModelWeights::from_file(&path).unwrap();
        assert_eq!(hash_tensors(&b.tensors).unwrap(), a.info.sha256);
        assert!(b.info.source.starts_with("file:"));

        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"not a tensor file").unwrap();
        let err = ModelWeights::from_file(&junk).unwrap_err().to_string();
        assert!(err.contains("is not a safetensors file"), "{err}");

        // From a weights directory: by name, by hash, and nothing outside it.
        let load = |p: &str, dir: Option<&Path>| {
            ModelWeights::load(&WeightsSpec::File { path: p.into() }, dir)
        };
        let by_name = load("w.safetensors", Some(dir.path())).unwrap();
        assert_eq!(by_name.info.source, "file:w.safetensors");
        let by_hash = load(&format!("sha256:{}", by_name.info.sha256), Some(dir.path())).unwrap();
        assert_eq!(by_hash.info.sha256, by_name.info.sha256);
        let e = load("w.safetensors", None).unwrap_err().to_string();
        assert!(e.contains("--weights-dir"), "{e}");
        let e_missing = load("nothing.safetensors", Some(dir.path()))
            .unwrap_err()
            .to_string();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link")).unwrap();
        let e_link = load("link", Some(dir.path())).unwrap_err().to_string();
        assert!(
            e_link.starts_with("weights: no weights file 'link'"),
            "{e_link}"
        );
        assert!(
            !e_missing.contains(&dir.path().display().to_string()),
            "{e_missing}"
        );
        for p in ["/etc/shadow", "../w.safetensors", "/dev/zero"] {
            let e = load(p, Some(dir.path())).unwrap_err().to_string();
            assert!(e.contains("not a file name") || e.contains("a path"), "{e}");
        }

        let mut partial = a.tensors.clone();
        partial.remove("fc.bias");
        let p = dir.path().join("partial.safetensors");
        candle_core::safetensors::save(&partial, &p).unwrap();
        let err = ModelWeights::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("has no tensor 'fc.bias'"), "{err}");
    }
}
