//! The agent's engine: ResNet18 written over Candle, the backends that run it (CPU, CUDA, and a
//! simulated one for exercising the coordinator), and the measurement loop that times them.
//!
//! The [`backend::Backend`] trait is where a device plugs in. Timing sits on the device's side of
//! that trait: each backend reports how long an iteration took by its own clock (a host clock
//! around a synchronous CPU forward; CUDA events on the GPU), so the loop in [`measure`] never
//! reads a clock that the device has not caught up with.

pub mod backend;
pub mod correctness;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
pub mod fused;
pub mod gpucheck;
pub mod gpuinfo;
pub mod health;
pub mod input;
pub mod measure;
pub mod memplan;
pub mod resnet;
pub mod simulated;
pub mod telemetry;
pub mod versions;
pub mod weights;

pub use backend::{Backend, Prepared};
pub use error::EngineError;
pub use measure::{run_job, AgentIdentity, JobContext, Phase, Progress};
pub use weights::ModelWeights;
