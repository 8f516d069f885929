//! The fused path's CUDA-free half, so that it is built and tested in every CI run.
//!
//! The fused GPU path runs in three stages, each in its own module:
//! - [`graph`]: the network as data: the steps of ResNet18 with their shapes, the folded
//!   weights, each activation's liveness and the memory plan that lays them out in one slab;
//! - [`conv_graph`]: one convolution with its epilogue as cuDNN's graph API describes it
//!   (tensors, ids, strides, the operation chain), for the executor's graph API candidates;
//! - [`planner`]: the choices made before running (stem layout, plan strategy, epilogues,
//!   workspace caps, math), driven by the typed [`options::FusedOptions`];
//! - the executor (`crate::cuda::fused`, CUDA builds only): cuDNN descriptors and device buffers
//!   owned through RAII types, the algorithm search, and the captured CUDA graph.
//!
//! [`cpu_exec`] runs the same graph on the CPU in f32 (NHWC, one `gemm` per convolution).

pub mod conv_graph;
pub mod cpu_exec;
pub mod graph;
pub mod options;
pub mod planner;

pub use options::FusedOptions;
