//! Deterministic input batches. Every backend, the correctness gate and the reference scripts
//! see the same pixels for the same (seed, batch, size), so outputs can be compared directly.

use candle_core::{Device, Result, Tensor};

use crate::weights::SplitMix64;

/// The seed used for benchmark inputs unless a caller picks another.
pub const INPUT_SEED: u64 = 20_261_127;

/// An NCHW f32 batch of `batch` images of `size`x`size`, values uniform in [-2, 2) like
/// normalised image data. Image `i` is the same whatever the batch size, so the first images of
/// a large batch can be checked against a small reference batch.
pub fn input_batch(seed: u64, batch: usize, size: usize) -> Result<Tensor> {
    let per_image = 3 * size * size;
    let mut data = Vec::with_capacity(batch * per_image);
    for i in 0..batch {
        let mut rng = SplitMix64::new(seed ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        data.extend((0..per_image).map(|_| rng.uniform(-2.0, 2.0)));
    }
    Tensor::from_vec(data, (batch, 3, size, size), &Device::Cpu)
}
