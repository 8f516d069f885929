//! The cuDNN objects the fused executor owns, each behind an RAII type that destroys it exactly
//! once, and the device buffers it reads and writes, whose addresses are only ever borrowed.
//!
//! cudarc's safe cuDNN layer (`cudarc::cudnn::safe`) types every descriptor by a compile-time
//! element type, has no `cudnnFindConvolutionForwardAlgorithmEx` and keeps its handle private,
//! so the executor, which picks f32/f16/bf16 at run time and ranks algorithms on its real
//! buffers, uses cudarc's `result` layer to create objects (safe functions) and the raw
//! bindings only to set them up and launch.

use std::{ffi::c_void, marker::PhantomData, sync::Arc};

use candle_core::{
    cuda_backend::cudarc::{
        cudnn::{result, sys as dnn},
        driver::{CudaSlice, CudaStream, DevicePtr},
    },
    DType, Tensor,
};
use fleetmark_core::{MathMode, Precision};

use crate::{
    fused::{conv_graph::Filter, graph::Shape},
    EngineError,
};

pub(super) fn check(what: &str, s: dnn::cudnnStatus_t) -> Result<(), EngineError> {
    if s == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(EngineError::Setup(format!("cuDNN {what}: {s:?}")))
    }
}

fn created<T>(what: &str, r: Result<T, result::CudnnError>) -> Result<T, EngineError> {
    r.map_err(|e| EngineError::Setup(format!("cuDNN create {what}: {:?}", e.0)))
}

pub(super) fn drv<T>(what: &str, r: Result<T, impl std::fmt::Debug>) -> Result<T, EngineError> {
    r.map_err(|e| EngineError::Setup(format!("CUDA {what}: {e:?}")))
}

/// The element type activations and weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Elem {
    F32,
    F16,
    Bf16,
}

impl Elem {
    pub(super) fn of(p: Precision) -> Self {
        match p {
            Precision::F32 => Elem::F32,
            Precision::F16 => Elem::F16,
            Precision::Bf16 => Elem::Bf16,
        }
    }

    pub(super) fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F16 | Elem::Bf16 => 2,
        }
    }

    pub(super) fn dnn(self) -> dnn::cudnnDataType_t {
        match self {
            Elem::F32 => dnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
            Elem::F16 => dnn::cudnnDataType_t::CUDNN_DATA_HALF,
            Elem::Bf16 => dnn::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        }
    }

    fn dtype(self) -> DType {
        match self {
            Elem::F32 => DType::F32,
            Elem::F16 => DType::F16,
            Elem::Bf16 => DType::BF16,
        }
    }

    /// Host bytes of `t` in this precision, little-endian.
    pub(super) fn bytes_of(self, t: &Tensor) -> Result<Vec<u8>, EngineError> {
        let t = t.to_dtype(self.dtype())?.flatten_all()?;
        Ok(match self {
            Elem::F32 => le_bytes(t.to_vec1::<f32>()?, f32::to_le_bytes),
            Elem::F16 => le_bytes(t.to_vec1::<half::f16>()?, half::f16::to_le_bytes),
            Elem::Bf16 => le_bytes(t.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes),
        })
    }

    /// f32 values of host bytes in this precision.
    pub(super) fn f32_from_bytes(self, b: &[u8]) -> Vec<f32> {
        match self {
            Elem::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Elem::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Elem::Bf16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }
}

fn le_bytes<T, const N: usize>(v: Vec<T>, f: fn(T) -> [u8; N]) -> Vec<u8> {
    v.into_iter().flat_map(f).collect()
}

/// cuDNN's math type for a convolution in `math`.
pub(super) fn math_type(math: MathMode) -> dnn::cudnnMathType_t {
    match math {
        // FMA math forbids tensor-op down-conversion: f32 stays f32.
        MathMode::F32 => dnn::cudnnMathType_t::CUDNN_FMA_MATH,
        // Default math lets f32 convolutions use TF32 tensor cores, as PyTorch's default does.
        MathMode::Tf32 => dnn::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        MathMode::F16 | MathMode::Bf16 => dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

pub fn cudnn_version() -> String {
    let v = result::get_version();
    format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
}

/// A device allocation. Its address is handed out only as a [`DevPtr`] that borrows the
/// buffer, so no pointer into it can outlive it.
pub(super) struct DeviceBuffer {
    slice: CudaSlice<u8>,
}

impl DeviceBuffer {
    pub(super) fn zeroed(stream: &Arc<CudaStream>, bytes: usize) -> Result<Self, EngineError> {
        let slice = drv("alloc", stream.alloc_zeros::<u8>(bytes.max(1)))?;
        Ok(DeviceBuffer { slice })
    }

    pub(super) fn upload(stream: &Arc<CudaStream>, bytes: &[u8]) -> Result<Self, EngineError> {
        let slice = drv("upload", stream.clone_htod(bytes))?;
        Ok(DeviceBuffer { slice })
    }

    pub(super) fn slice(&self) -> &CudaSlice<u8> {
        &self.slice
    }

    pub(super) fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.slice
    }

    pub(super) fn ptr(&self, stream: &CudaStream) -> DevPtr<'_> {
        // Event tracking is off for this context (CudaBackend::open) and one stream uses these
        // buffers, so the guard records nothing and dropping it at once is correct.
        let (raw, _guard) = self.slice.device_ptr(stream);
        DevPtr {
            raw,
            _owner: PhantomData,
        }
    }
}

/// A device address borrowed from the [`DeviceBuffer`] it points into.
#[derive(Clone, Copy)]
pub(super) struct DevPtr<'a> {
    raw: u64,
    _owner: PhantomData<&'a DeviceBuffer>,
}

impl<'a> DevPtr<'a> {
    /// The address `bytes` further on; the caller keeps it inside the buffer (the memory plan
    /// places every activation inside the slab).
    pub(super) fn offset(self, bytes: usize) -> DevPtr<'a> {
        DevPtr {
            raw: self.raw + bytes as u64,
            _owner: PhantomData,
        }
    }

    /// The address as a kernel argument.
    pub(super) fn addr(self) -> u64 {
        self.raw
    }

    pub(super) fn src(self) -> *const c_void {
        self.raw as *const c_void
    }

    pub(super) fn dst(self) -> *mut c_void {
        self.raw as *mut c_void
    }
}

macro_rules! raii {
    ($name:ident, $raw:ty, $create:path, $destroy:path, $what:literal) => {
        pub(super) struct $name(pub(super) $raw);

        impl $name {
            fn create() -> Result<Self, EngineError> {
                created($what, $create()).map($name)
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: `self.0` was returned by the matching create function and is owned
                // by this value alone (the field is never copied out to another owner), so it
                // is destroyed exactly once, here.
                unsafe { $destroy(self.0) };
            }
        }
    };
}

raii!(
    TensorDesc,
    dnn::cudnnTensorDescriptor_t,
    result::create_tensor_descriptor,
    dnn::cudnnDestroyTensorDescriptor,
    "tensor descriptor"
);
raii!(
    FilterDesc,
    dnn::cudnnFilterDescriptor_t,
    result::create_filter_descriptor,
    dnn::cudnnDestroyFilterDescriptor,
    "filter descriptor"
);
raii!(
    ConvDesc,
    dnn::cudnnConvolutionDescriptor_t,
    result::create_convolution_descriptor,
    dnn::cudnnDestroyConvolutionDescriptor,
    "convolution descriptor"
);
raii!(
    ActDesc,
    dnn::cudnnActivationDescriptor_t,
    result::create_activation_descriptor,
    dnn::cudnnDestroyActivationDescriptor,
    "activation descriptor"
);
raii!(
    PoolDesc,
    dnn::cudnnPoolingDescriptor_t,
    result::create_pooling_descriptor,
    dnn::cudnnDestroyPoolingDescriptor,
    "pooling descriptor"
);

/// A cuDNN handle bound to the executor's stream.
pub(super) struct Handle(pub(super) dnn::cudnnHandle_t);

impl Handle {
    /// A handle on the current context whose work goes to `stream`. The caller keeps `stream`
    /// alive at least as long as the handle (both live in the executor).
    pub(super) fn on_stream(stream: &CudaStream) -> Result<Self, EngineError> {
        let h = Handle(created("handle", result::create_handle())?);
        // SAFETY: `h.0` is a live handle just created, and `cu_stream()` is the live stream the
        // executor owns through an `Arc` for longer than the handle.
        check("set stream", unsafe {
            dnn::cudnnSetStream(h.0, stream.cu_stream() as dnn::cudaStream_t)
        })?;
        Ok(h)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate in `on_stream`, owned by this value alone, destroyed
        // once here; the executor drops its CUDA graph and descriptors' users before this.
        unsafe { dnn::cudnnDestroy(self.0) };
    }
}

impl TensorDesc {
    /// An NHWC tensor of `shape` in `e`.
    pub(super) fn nhwc(shape: &Shape, e: Elem) -> Result<Self, EngineError> {
        let t = TensorDesc::create()?;
        // SAFETY: `t.0` is a live descriptor we own; the call only writes into it, and the
        // dimensions are positive sizes of a planned activation.
        check("set tensor", unsafe {
            dnn::cudnnSetTensor4dDescriptor(
                t.0,
                dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                e.dnn(),
                shape.n as i32,
                shape.c as i32,
                shape.h as i32,
                shape.w as i32,
            )
        })?;
        Ok(t)
    }
}

impl FilterDesc {
    /// A KRSC ("NHWC") filter.
    pub(super) fn krsc(g: &Filter, e: Elem) -> Result<Self, EngineError> {
        let f = FilterDesc::create()?;
        // SAFETY: `f.0` is a live descriptor we own; the call only writes into it.
        check("set filter", unsafe {
            dnn::cudnnSetFilter4dDescriptor(
                f.0,
                e.dnn(),
                dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                g.k as i32,
                g.c as i32,
                g.r as i32,
                g.s as i32,
            )
        })?;
        Ok(f)
    }
}

impl ConvDesc {
    /// A cross-correlation with f32 accumulation and `math`.
    pub(super) fn new(g: &Filter, math: dnn::cudnnMathType_t) -> Result<Self, EngineError> {
        let d = ConvDesc::create()?;
        // SAFETY: `d.0` is a live descriptor we own; the call only writes into it.
        check("set conv", unsafe {
            dnn::cudnnSetConvolution2dDescriptor(
                d.0,
                g.pad as i32,
                g.pad as i32,
                g.stride as i32,
                g.stride as i32,
                1,
                1,
                dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                dnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
        })?;
        d.set_math(math)?;
        Ok(d)
    }

    pub(super) fn set_math(&self, math: dnn::cudnnMathType_t) -> Result<(), EngineError> {
        // SAFETY: `self.0` is a live descriptor we own; the call only writes into it.
        check("set math", unsafe {
            dnn::cudnnSetConvolutionMathType(self.0, math)
        })
    }
}

impl ActDesc {
    pub(super) fn relu() -> Result<Self, EngineError> {
        let a = ActDesc::create()?;
        // SAFETY: `a.0` is a live descriptor we own; the call only writes into it.
        check("set activation", unsafe {
            dnn::cudnnSetActivationDescriptor(
                a.0,
                dnn::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU,
                dnn::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                0.0,
            )
        })?;
        Ok(a)
    }
}

/// A pooling window.
#[derive(Debug, Clone, Copy)]
pub(super) struct PoolWindow {
    pub max: bool,
    pub window: (usize, usize),
    pub pad: usize,
    pub stride: (usize, usize),
}

impl PoolDesc {
    pub(super) fn new(w: &PoolWindow) -> Result<Self, EngineError> {
        let p = PoolDesc::create()?;
        let mode = if w.max {
            dnn::cudnnPoolingMode_t::CUDNN_POOLING_MAX
        } else {
            dnn::cudnnPoolingMode_t::CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING
        };
        // SAFETY: `p.0` is a live descriptor we own; the call only writes into it.
        check("set pooling", unsafe {
            dnn::cudnnSetPooling2dDescriptor(
                p.0,
                mode,
                dnn::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                w.window.0 as i32,
                w.window.1 as i32,
                w.pad as i32,
                w.pad as i32,
                w.stride.0 as i32,
                w.stride.1 as i32,
            )
        })?;
        Ok(p)
    }
}
