//! cuDNN's graph (backend) API for one convolution with its epilogue, as the executor's
//! alternative to the legacy calls (by default for the 1x1 convolutions, `--fused-conv-api=1x1`;
//! for every layer with `graph` or `auto`).
//!
//! Why it exists: the legacy calls the fused path is built on
//! (`cudnnFindConvolutionForwardAlgorithmEx`, `cudnnConvolutionBiasActivationForward`) are
//! deprecated in cuDNN 9.19 and offer eight algorithms with fixed settings. The graph API
//! describes the convolution and its bias, residual and ReLU as one operation graph
//! ([`ConvGraphSpec`]); cuDNN's heuristics then offer engine configurations, and an engine's
//! knobs can split the reduction (split-K), which may keep more of the GPU busy on layers with
//! few output tiles (the 7x7 layers at batch 1).
//!
//! cudarc has raw bindings for these calls but no safe wrapper, so this module is the wrapper:
//! [`Desc`] owns one backend descriptor and destroys it once; attributes are set through typed
//! setters, each pairing a Rust element type with the cuDNN attribute type that names it.

use std::{cell::Cell, collections::HashSet, ffi::c_void, rc::Rc};

use candle_core::cuda_backend::cudarc::cudnn::sys as dnn;
use fleetmark_core::MathMode;

use super::cudnn::{check, DevPtr, Elem, Handle};
use crate::{
    fused::{
        conv_graph::{ConvGraphSpec, PointwiseMode, TensorType},
        planner::{self, EngineNote},
    },
    EngineError,
};

use dnn::cudnnBackendAttributeName_t as A;
use dnn::cudnnBackendAttributeType_t as T;
use dnn::cudnnBackendDescriptorType_t as D;

/// Byte alignment promised for every tensor: slab offsets are 256-byte aligned and every
/// buffer is its own allocation.
const ALIGNMENT: i64 = 16;

/// Most engine configurations the heuristics are asked for.
const MAX_HEURISTIC_RESULTS: usize = 64;

/// A cuDNN status as a result, naming `what` (built only on failure: setters run per call when a
/// plan executes).
fn ok(s: dnn::cudnnStatus_t, what: impl FnOnce() -> String) -> Result<(), EngineError> {
    if s == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        check(&what(), s)
    }
}

/// One backend descriptor, destroyed exactly once when dropped.
pub(super) struct Desc(dnn::cudnnBackendDescriptor_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: `self.0` was created by `cudnnBackendCreateDescriptor` in `Desc::new` and is
        // owned by this value alone (the handle is copied out only for the length of a call),
        // so it is destroyed once, here.
        unsafe { dnn::cudnnBackendDestroyDescriptor(self.0) };
    }
}

impl Desc {
    fn new(ty: D) -> Result<Self, EngineError> {
        let mut raw: dnn::cudnnBackendDescriptor_t = std::ptr::null_mut();
        // SAFETY: cuDNN writes one descriptor handle into `raw`, a live local.
        let s = unsafe { dnn::cudnnBackendCreateDescriptor(ty, &mut raw) };
        ok(s, || format!("create {ty:?}"))?;
        Ok(Desc(raw))
    }

    /// Sets attribute `name` to `values`. Private to the typed setters below, each of which
    /// passes the element type that `ty` names.
    fn set<V>(&mut self, name: A, ty: T, values: &[V]) -> Result<(), EngineError> {
        // SAFETY: `self.0` is a live descriptor we own and have not finalized (setters run
        // only between `new` and `finalize`); `values` is a live slice whose element type is
        // the one `ty` names (the only callers are the setters below: i64 for INT64, f32 for
        // FLOAT, bool for BOOLEAN, u8 for CHAR, the repr(u32) cuDNN enums for their types, raw descriptor
        // and handle pointers for BACKEND_DESCRIPTOR and HANDLE, raw addresses for VOID_PTR),
        // so cuDNN reads exactly `values.len()` valid elements. Descriptors passed as values
        // stay alive as long as anything made from them (`OpGraph`, `GraphPlan` keep them),
        // in case cuDNN refers to them rather than copying.
        let s = unsafe {
            dnn::cudnnBackendSetAttribute(
                self.0,
                name,
                ty,
                values.len() as i64,
                values.as_ptr() as *const c_void,
            )
        };
        ok(s, || format!("set {name:?}"))
    }

    fn i64s(&mut self, name: A, v: &[i64]) -> Result<(), EngineError> {
        self.set(name, T::CUDNN_TYPE_INT64, v)
    }

    fn f32(&mut self, name: A, v: f32) -> Result<(), EngineError> {
        self.set(name, T::CUDNN_TYPE_FLOAT, &[v])
    }

    fn boolean(&mut self, name: A, v: bool) -> Result<(), EngineError> {
        self.set(name, T::CUDNN_TYPE_BOOLEAN, &[v])
    }

    fn data_type(&mut self, name: A, v: dnn::cudnnDataType_t) -> Result<(), EngineError> {
        self.set(name, T::CUDNN_TYPE_DATA_TYPE, &[v])
    }

    fn descs(&mut self, name: A, v: &[&Desc]) -> Result<(), EngineError> {
        let raw: Vec<dnn::cudnnBackendDescriptor_t> = v.iter().map(|d| d.0).collect();
        self.set(name, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw)
    }

    fn handle(&mut self, name: A, h: &Handle) -> Result<(), EngineError> {
        self.set(name, T::CUDNN_TYPE_HANDLE, &[h.0])
    }

    fn finalize(self) -> Result<Self, EngineError> {
        // SAFETY: `self.0` is a live descriptor we own; finalizing only validates it and makes
        // it read-only.
        check("finalize", unsafe { dnn::cudnnBackendFinalize(self.0) })?;
        Ok(self)
    }

    /// Reads up to `out.len()` elements of attribute `name` into `out`; returns how many
    /// cuDNN wrote. Private to the typed getters below.
    fn get<V>(&self, name: A, ty: T, out: &mut [V]) -> Result<usize, EngineError> {
        let mut n = 0i64;
        // SAFETY: `self.0` is a live, finalized descriptor; `out` is a live, writable slice of
        // `out.len()` elements of the type `ty` names (the getters below pair them: i64 for
        // INT64, u8 for CHAR, u32 for the repr(u32) enum types, which are read as plain integers so that a
        // value this build's bindings do not know is still a valid u32, and live created
        // descriptors for BACKEND_DESCRIPTOR); cuDNN writes at most `out.len()` elements and
        // the count into `n`.
        let s = unsafe {
            dnn::cudnnBackendGetAttribute(
                self.0,
                name,
                ty,
                out.len() as i64,
                &mut n,
                out.as_mut_ptr() as *mut c_void,
            )
        };
        ok(s, || format!("get {name:?}"))?;
        Ok((n.max(0) as usize).min(out.len()))
    }

    fn get_i64(&self, name: A) -> Result<i64, EngineError> {
        let mut v = [0i64];
        self.get(name, T::CUDNN_TYPE_INT64, &mut v)?;
        Ok(v[0])
    }

    /// An enum-valued attribute (up to `max` values) as raw integers.
    fn get_u32s(&self, name: A, ty: T, max: usize) -> Result<Vec<u32>, EngineError> {
        let mut v = vec![0u32; max];
        let n = self.get(name, ty, &mut v)?;
        v.truncate(n);
        Ok(v)
    }

    /// How many elements attribute `name` holds.
    fn count(&self, name: A, ty: T) -> Result<usize, EngineError> {
        let mut n = 0i64;
        // SAFETY: `self.0` is a live, finalized descriptor; with a requested count of 0 cuDNN
        // writes only the element count into `n` and reads no array.
        let s = unsafe {
            dnn::cudnnBackendGetAttribute(self.0, name, ty, 0, &mut n, std::ptr::null_mut())
        };
        ok(s, || format!("count {name:?}"))?;
        Ok(n.max(0) as usize)
    }

    /// A descriptor-valued attribute: `n` descriptors of type `ty` are created for cuDNN to
    /// fill, and those it filled are returned.
    fn get_descs(&self, name: A, ty: D, n: usize) -> Result<Vec<Desc>, EngineError> {
        let mut owned = (0..n)
            .map(|_| Desc::new(ty))
            .collect::<Result<Vec<_>, _>>()?;
        let mut raw: Vec<dnn::cudnnBackendDescriptor_t> = owned.iter().map(|d| d.0).collect();
        let got = self.get(name, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, &mut raw)?;
        owned.truncate(got);
        Ok(owned)
    }
}

fn data_type(t: TensorType, elem: Elem) -> dnn::cudnnDataType_t {
    match t {
        TensorType::Act => elem.dnn(),
        TensorType::F32 => dnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
    }
}

/// What plans are made for: the executor's cuDNN handle (its GPU), or a device described in
/// JSON ([`DeviceProps`]), which lets cuDNN 9.8 and later plan on a machine without a GPU, as
/// the tests below do. Plans made for a description are for looking at, not for running.
#[derive(Clone, Copy)]
pub(super) enum PlanFor<'a> {
    Handle(&'a Handle),
    #[cfg_attr(not(test), allow(dead_code))]
    Device(&'a DeviceProps),
}

/// A device as cuDNN describes it (`CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION`).
pub(super) struct DeviceProps(Desc);

impl DeviceProps {
    /// The description of the GPU `handle` runs on.
    pub(super) fn of_handle(handle: &Handle) -> Result<Self, EngineError> {
        let mut d = Desc::new(D::CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR)?;
        d.handle(A::CUDNN_ATTR_DEVICEPROP_HANDLE, handle)?;
        Ok(DeviceProps(d.finalize()?))
    }

    /// The description as cuDNN serializes it: the bytes [`Self::from_json`] reads back.
    pub(super) fn json(&self) -> Result<Vec<u8>, EngineError> {
        let n = self.0.count(
            A::CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION,
            T::CUDNN_TYPE_CHAR,
        )?;
        let mut bytes = vec![0u8; n];
        let got = self.0.get(
            A::CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION,
            T::CUDNN_TYPE_CHAR,
            &mut bytes,
        )?;
        bytes.truncate(got);
        // A C string may end in its NUL; the file should not.
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        Ok(bytes)
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) fn from_json(json: &[u8]) -> Result<Self, EngineError> {
        let mut d = Desc::new(D::CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR)?;
        d.set(
            A::CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION,
            T::CUDNN_TYPE_CHAR,
            json,
        )?;
        Ok(DeviceProps(d.finalize()?))
    }
}

/// The descriptors of one convolution's operation graph, kept alive for as long as any plan
/// made from it (cuDNN's engine configurations and plans refer back to the graph).
pub(super) struct OpGraph {
    // Declared first, so dropped before the operations and tensors it was built from.
    graph: Desc,
    _ops: Vec<Desc>,
    _tensors: Vec<Desc>,
    /// The tensors in memory, in the order the variant pack passes their addresses.
    pub(super) uids: Vec<i64>,
}

/// Descriptors for the tensors, convolution and operations of `spec`, finalized; without the
/// operation graph itself, which needs a handle. Public to the module's tests, which check on a
/// machine without a GPU that cuDNN accepts every descriptor.
pub(super) fn operations(
    spec: &ConvGraphSpec,
    elem: Elem,
) -> Result<(Vec<Desc>, Vec<Desc>), EngineError> {
    let mut tensors = Vec::with_capacity(spec.tensors.len());
    for t in &spec.tensors {
        let mut d = Desc::new(D::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
        d.data_type(A::CUDNN_ATTR_TENSOR_DATA_TYPE, data_type(t.ty, elem))?;
        d.i64s(A::CUDNN_ATTR_TENSOR_DIMENSIONS, &t.dims)?;
        d.i64s(A::CUDNN_ATTR_TENSOR_STRIDES, &t.strides)?;
        d.i64s(A::CUDNN_ATTR_TENSOR_UNIQUE_ID, &[t.uid])?;
        d.i64s(A::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, &[ALIGNMENT])?;
        d.boolean(A::CUDNN_ATTR_TENSOR_IS_VIRTUAL, t.is_virtual)?;
        tensors.push(d.finalize()?);
    }
    let tensor = |uid: i64| -> Result<&Desc, EngineError> {
        spec.tensors
            .iter()
            .position(|t| t.uid == uid)
            .map(|i| &tensors[i])
            .ok_or_else(|| EngineError::Setup(format!("graph operand {uid} is not declared")))
    };
    let c = &spec.conv;
    let mut conv = Desc::new(D::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
    conv.data_type(
        A::CUDNN_ATTR_CONVOLUTION_COMP_TYPE,
        dnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
    )?;
    conv.set(
        A::CUDNN_ATTR_CONVOLUTION_CONV_MODE,
        T::CUDNN_TYPE_CONVOLUTION_MODE,
        &[dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION],
    )?;
    conv.i64s(A::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, &[2])?;
    conv.i64s(A::CUDNN_ATTR_CONVOLUTION_DILATIONS, &[1, 1])?;
    conv.i64s(
        A::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,
        &[c.stride, c.stride],
    )?;
    conv.i64s(A::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, &[c.pad, c.pad])?;
    conv.i64s(A::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, &[c.pad, c.pad])?;
    let conv = conv.finalize()?;

    let mut op = Desc::new(D::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR)?;
    op.descs(
        A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X,
        &[tensor(c.x)?],
    )?;
    op.descs(
        A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,
        &[tensor(c.w)?],
    )?;
    op.descs(
        A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
        &[tensor(c.y)?],
    )?;
    op.descs(
        A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
        &[&conv],
    )?;
    op.f32(A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, 1.0)?;
    op.f32(A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA, 0.0)?;
    let mut ops = vec![op.finalize()?];
    // The convolution descriptor is kept with the operations it configures.
    let mut keep = vec![conv];
    for p in &spec.pointwise {
        let mut pw = Desc::new(D::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
        let mode = match p.mode {
            PointwiseMode::Add => dnn::cudnnPointwiseMode_t::CUDNN_POINTWISE_ADD,
            PointwiseMode::Relu => dnn::cudnnPointwiseMode_t::CUDNN_POINTWISE_RELU_FWD,
        };
        pw.set(
            A::CUDNN_ATTR_POINTWISE_MODE,
            T::CUDNN_TYPE_POINTWISE_MODE,
            &[mode],
        )?;
        pw.data_type(
            A::CUDNN_ATTR_POINTWISE_MATH_PREC,
            dnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
        )?;
        let pw = pw.finalize()?;
        let mut op = Desc::new(D::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?;
        op.descs(A::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw])?;
        op.descs(A::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, &[tensor(p.x)?])?;
        if let Some(b) = p.b {
            op.descs(A::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, &[tensor(b)?])?;
        }
        op.descs(A::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &[tensor(p.y)?])?;
        ops.push(op.finalize()?);
        keep.push(pw);
    }
    tensors.extend(keep);
    Ok((ops, tensors))
}

impl OpGraph {
    pub(super) fn new(
        target: PlanFor<'_>,
        spec: &ConvGraphSpec,
        elem: Elem,
    ) -> Result<Self, EngineError> {
        let (ops, tensors) = operations(spec, elem)?;
        let mut graph = Desc::new(D::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        // Without a handle (optional since cuDNN 9.8), the heuristics get the device instead.
        if let PlanFor::Handle(handle) = target {
            graph.handle(A::CUDNN_ATTR_OPERATIONGRAPH_HANDLE, handle)?;
        }
        graph.descs(
            A::CUDNN_ATTR_OPERATIONGRAPH_OPS,
            &ops.iter().collect::<Vec<_>>(),
        )?;
        Ok(OpGraph {
            graph: graph.finalize()?,
            _ops: ops,
            _tensors: tensors,
            uids: spec.real_uids(),
        })
    }

    /// The heuristics' engine configurations for this graph in `mode`, best first.
    fn engine_configs(
        &self,
        target: PlanFor<'_>,
        mode: dnn::cudnnBackendHeurMode_t,
    ) -> Result<Vec<Desc>, EngineError> {
        let mut heur = Desc::new(D::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
        heur.descs(A::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[&self.graph])?;
        if let PlanFor::Device(device) = target {
            heur.descs(A::CUDNN_ATTR_ENGINEHEUR_DEVICEPROP, &[&device.0])?;
        }
        heur.set(
            A::CUDNN_ATTR_ENGINEHEUR_MODE,
            T::CUDNN_TYPE_HEUR_MODE,
            &[mode],
        )?;
        let heur = heur.finalize()?;
        let n = heur
            .count(
                A::CUDNN_ATTR_ENGINEHEUR_RESULTS,
                T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            )?
            .min(MAX_HEURISTIC_RESULTS);
        heur.get_descs(
            A::CUDNN_ATTR_ENGINEHEUR_RESULTS,
            D::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR,
            n,
        )
    }
}

/// An engine configuration's engine, its knob choices and what its label says.
struct EngineInfo {
    engine: Desc,
    global_index: i64,
    notes: Vec<EngineNote>,
    /// (knob type as cuDNN numbers it, value).
    knobs: Vec<(u32, i64)>,
}

fn note_of(raw: u32) -> EngineNote {
    use dnn::cudnnBackendNumericalNote_t as N;
    match raw {
        x if x == N::CUDNN_NUMERICAL_NOTE_TENSOR_CORE as u32 => EngineNote::TensorCore,
        x if x == N::CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS as u32 => {
            EngineNote::DownConvertInputs
        }
        x if x == N::CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION as u32 => {
            EngineNote::ReducedPrecisionReduction
        }
        _ => EngineNote::Other,
    }
}

/// Knob types that split a convolution's reduction across thread blocks. (`SPLIT_K` itself is
/// deprecated in cuDNN 9; `SPLIT_K_BUF` may be a buffering mode rather than a count, in which
/// case the values tried fall outside its range or fail to finalize, and are counted so.)
fn is_split_knob(raw: u32) -> bool {
    use dnn::cudnnBackendKnobType_t as K;
    [
        K::CUDNN_KNOB_TYPE_SPLIT_K_SLC as u32,
        K::CUDNN_KNOB_TYPE_SPLIT_K_BUF as u32,
    ]
    .contains(&raw)
}

fn knob_name(raw: u32) -> String {
    use dnn::cudnnBackendKnobType_t as K;
    match raw {
        x if x == K::CUDNN_KNOB_TYPE_SPLIT_K_SLC as u32 => "split_k_slc".into(),
        x if x == K::CUDNN_KNOB_TYPE_SPLIT_K_BUF as u32 => "split_k_buf".into(),
        x if x == K::CUDNN_KNOB_TYPE_KERNEL_CFG as u32 => "kernel_cfg".into(),
        other => format!("knob{other}"),
    }
}

const KNOB_TYPES: usize = 64;

/// Knob choices: (knob type as cuDNN numbers it, value).
type Knobs = Vec<(u32, i64)>;

impl EngineInfo {
    fn of(cfg: &Desc) -> Result<Self, EngineError> {
        let engine = cfg
            .get_descs(
                A::CUDNN_ATTR_ENGINECFG_ENGINE,
                D::CUDNN_BACKEND_ENGINE_DESCRIPTOR,
                1,
            )?
            .pop()
            .ok_or_else(|| EngineError::Setup("engine configuration without engine".into()))?;
        let global_index = engine.get_i64(A::CUDNN_ATTR_ENGINE_GLOBAL_INDEX)?;
        let notes = engine
            .get_u32s(
                A::CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
                T::CUDNN_TYPE_NUMERICAL_NOTE,
                16,
            )?
            .into_iter()
            .map(note_of)
            .collect();
        let choices = cfg.get_descs(
            A::CUDNN_ATTR_ENGINECFG_KNOB_CHOICES,
            D::CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR,
            KNOB_TYPES,
        )?;
        let knobs = choices
            .iter()
            .map(|c| {
                let ty = c.get_u32s(
                    A::CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE,
                    T::CUDNN_TYPE_KNOB_TYPE,
                    1,
                )?;
                let v = c.get_i64(A::CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE)?;
                Ok((ty.first().copied().unwrap_or(u32::MAX), v))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(EngineInfo {
            engine,
            global_index,
            notes,
            knobs,
        })
    }

    /// The engine's split knobs: (type, min, max, stride).
    fn split_knobs(&self) -> Result<Vec<(u32, i64, i64, i64)>, EngineError> {
        let infos = self.engine.get_descs(
            A::CUDNN_ATTR_ENGINE_KNOB_INFO,
            D::CUDNN_BACKEND_KNOB_INFO_DESCRIPTOR,
            KNOB_TYPES,
        )?;
        let mut v = Vec::new();
        for i in &infos {
            let ty = i
                .get_u32s(A::CUDNN_ATTR_KNOB_INFO_TYPE, T::CUDNN_TYPE_KNOB_TYPE, 1)?
                .first()
                .copied()
                .unwrap_or(u32::MAX);
            if is_split_knob(ty) {
                v.push((
                    ty,
                    i.get_i64(A::CUDNN_ATTR_KNOB_INFO_MINIMUM_VALUE)?,
                    i.get_i64(A::CUDNN_ATTR_KNOB_INFO_MAXIMUM_VALUE)?,
                    i.get_i64(A::CUDNN_ATTR_KNOB_INFO_STRIDE)?,
                ));
            }
        }
        Ok(v)
    }

    /// A new engine configuration on this engine of `graph` with `knobs` chosen. The engine
    /// is made afresh from the graph and its global index, the documented way, rather than
    /// reusing the copy read out of the heuristics' configuration. Knobs left out would take
    /// the engine's defaults, so `knobs` carries all of the heuristics' choices.
    /// Returns the configuration and the descriptors it was made from, which live as long as
    /// it does.
    fn config(
        &self,
        target: PlanFor<'_>,
        graph: &OpGraph,
        knobs: &[(u32, i64)],
    ) -> Result<(Desc, Vec<Desc>), EngineError> {
        let mut engine = Desc::new(D::CUDNN_BACKEND_ENGINE_DESCRIPTOR)?;
        engine.descs(A::CUDNN_ATTR_ENGINE_OPERATION_GRAPH, &[&graph.graph])?;
        engine.i64s(A::CUDNN_ATTR_ENGINE_GLOBAL_INDEX, &[self.global_index])?;
        if let PlanFor::Device(device) = target {
            engine.descs(A::CUDNN_ATTR_ENGINE_DEVICEPROP, &[&device.0])?;
        }
        let engine = engine.finalize()?;
        let mut choices = Vec::with_capacity(knobs.len());
        for &(ty, value) in knobs {
            let mut c = Desc::new(D::CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR)?;
            // The knob type is passed as the integer cuDNN gave us for it (a repr(u32) enum
            // in C), so a knob this build's bindings do not name still round-trips.
            c.set(
                A::CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE,
                T::CUDNN_TYPE_KNOB_TYPE,
                &[ty],
            )?;
            c.i64s(A::CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE, &[value])?;
            choices.push(c.finalize()?);
        }
        let mut cfg = Desc::new(D::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR)?;
        cfg.descs(A::CUDNN_ATTR_ENGINECFG_ENGINE, &[&engine])?;
        if !choices.is_empty() {
            cfg.descs(
                A::CUDNN_ATTR_ENGINECFG_KNOB_CHOICES,
                &choices.iter().collect::<Vec<_>>(),
            )?;
        }
        let cfg = cfg.finalize()?;
        choices.push(engine);
        Ok((cfg, choices))
    }

    /// The engine and every knob choice, in knob order: `e7/split_k_slc=4/kernel_cfg=21`.
    /// It names the configuration exactly (the heuristics offer one engine several times with
    /// different knobs), so it also tells configurations apart.
    fn label(&self, knobs: &[(u32, i64)]) -> String {
        let mut sorted = knobs.to_vec();
        sorted.sort_unstable();
        let mut label = format!("e{}", self.global_index);
        for (t, v) in sorted {
            label.push_str(&format!("/{}={v}", knob_name(t)));
        }
        label
    }
}

/// One runnable plan: an engine configuration made into an execution plan for one operation
/// graph.
pub(super) struct GraphPlan {
    // Declared first, so dropped before the configuration and graph it was made from.
    plan: Desc,
    _cfg: Desc,
    /// What a configuration made here (a split variant) was made from: its engine and knob
    /// choices. cuDNN may refer to descriptors set as attributes, so every descriptor lives as
    /// long as anything made from it.
    _parts: Vec<Desc>,
    graph: Rc<OpGraph>,
    /// Workspace bytes the plan needs.
    pub(super) ws: usize,
    /// Engine and split knobs, for the result's plan note.
    pub(super) label: String,
    /// Whether its output has been compared with a reference: `Some(true)` if it agreed.
    /// Plans are shared between layers of one shape and between stem candidates, so each is
    /// checked once.
    pub(super) checked: Cell<Option<bool>>,
}

impl GraphPlan {
    fn new(
        target: PlanFor<'_>,
        graph: &Rc<OpGraph>,
        (cfg, parts): (Desc, Vec<Desc>),
        label: String,
    ) -> Result<Self, EngineError> {
        let mut plan = Desc::new(D::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
        // A plan for a description needs nothing more: its configuration carries the device.
        if let PlanFor::Handle(handle) = target {
            plan.handle(A::CUDNN_ATTR_EXECUTION_PLAN_HANDLE, handle)?;
        }
        plan.descs(A::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[&cfg])?;
        let plan = plan.finalize()?;
        let ws = plan.get_i64(A::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)?;
        Ok(GraphPlan {
            plan,
            _cfg: cfg,
            _parts: parts,
            graph: graph.clone(),
            ws: ws.max(0) as usize,
            label,
            checked: Cell::new(None),
        })
    }

    /// The ids of the tensors in memory, in the order [`Self::run`] takes their addresses.
    pub(super) fn uids(&self) -> &[i64] {
        &self.graph.uids
    }

    /// Enqueues the plan on the handle's stream. `ptrs` gives the address of each tensor in
    /// memory, in the graph's `uids` order; `workspace` is `ws_bytes` long.
    pub(super) fn run(
        &self,
        handle: &Handle,
        ptrs: &[DevPtr<'_>],
        workspace: DevPtr<'_>,
        ws_bytes: usize,
    ) -> Result<(), EngineError> {
        // cuDNN takes no workspace size: a short one would be written past its end.
        if ws_bytes < self.ws {
            return Err(EngineError::Setup(format!(
                "graph plan {} needs {} workspace bytes, given {ws_bytes}",
                self.label, self.ws
            )));
        }
        let uids = &self.graph.uids;
        if ptrs.len() != uids.len() {
            return Err(EngineError::Setup(format!(
                "graph plan {}: {} addresses for {} tensors",
                self.label,
                ptrs.len(),
                uids.len()
            )));
        }
        let raw: Vec<*mut c_void> = ptrs.iter().map(|p| p.dst()).collect();
        let mut pack = Desc::new(D::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        pack.i64s(A::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, uids)?;
        pack.set(
            A::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
            T::CUDNN_TYPE_VOID_PTR,
            &raw,
        )?;
        pack.set(
            A::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
            T::CUDNN_TYPE_VOID_PTR,
            &[workspace.dst()],
        )?;
        let pack = pack.finalize()?;
        // SAFETY: the handle, plan and variant pack are live; the pack names every tensor of
        // the plan's graph that lives in memory, each with the address of a live buffer of the
        // graph's shape and type (the caller borrows them from the executor's buffers, which
        // outlive the stream's work), and a workspace of at least `self.ws` bytes (checked
        // above against the length the caller gives). The call only enqueues work on the
        // handle's stream.
        let s = unsafe { dnn::cudnnBackendExecute(handle.0, self.plan.0, pack.0) };
        ok(s, || format!("execute {}", self.label))
    }
}

/// What planning one convolution through the graph API found: its runnable plans, best guess
/// first, and a note of what failed.
pub(super) struct GraphCandidates {
    pub(super) plans: Vec<Rc<GraphPlan>>,
    /// Configurations dropped because their numerical notes do not fit the math.
    pub(super) refused: usize,
    /// Configurations or split variants cuDNN could not finalize.
    pub(super) failed: usize,
}

impl GraphCandidates {
    /// What was found, for `backend.details.graph_api`.
    pub(super) fn note(&self) -> String {
        format!(
            "{} plans ({} refused for their math, {} not finalized)",
            self.plans.len(),
            self.refused,
            self.failed
        )
    }
}

/// Plans for `spec`: the heuristics' configurations that compute in `math`, the first
/// `limit` of them made into plans, and for the first [`planner::SPLIT_CONFIGS`] of those,
/// variants with each split knob set to the values [`planner::split_values`] allows.
/// Configurations cuDNN cannot finalize are counted, not errors.
pub(super) fn candidates(
    target: PlanFor<'_>,
    spec: &ConvGraphSpec,
    elem: Elem,
    math: MathMode,
    limit: usize,
) -> Result<GraphCandidates, EngineError> {
    use dnn::cudnnBackendHeurMode_t::{CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK};
    let graph = Rc::new(OpGraph::new(target, spec, elem)?);
    // Mode A's ranking first, then the fallback list (engines mode A may leave out).
    let mut configs = graph.engine_configs(target, CUDNN_HEUR_MODE_A)?;
    configs.extend(
        graph
            .engine_configs(target, CUDNN_HEUR_MODE_FALLBACK)
            .unwrap_or_default(),
    );
    let (mut refused, mut failed) = (0usize, 0usize);
    let mut plans = Vec::new();
    let mut seen = HashSet::new();
    let mut base = 0usize;
    for cfg in configs {
        if base >= limit {
            break;
        }
        let info = match EngineInfo::of(&cfg) {
            Ok(i) => i,
            Err(_) => {
                failed += 1;
                continue;
            }
        };
        if !planner::engine_allowed(math, &info.notes) {
            refused += 1;
            continue;
        }
        let label = info.label(&info.knobs);
        if !seen.insert(label.clone()) {
            continue;
        }
        match GraphPlan::new(target, &graph, (cfg, Vec::new()), label) {
            Ok(p) => plans.push(Rc::new(p)),
            Err(_) => {
                failed += 1;
                continue;
            }
        }
        if base < planner::SPLIT_CONFIGS {
            // An engine whose knobs cannot be read gets no variants; its plan above stands.
            for (knobs, label) in split_variants(&info).unwrap_or_default() {
                if !seen.insert(label.clone()) {
                    continue;
                }
                match info
                    .config(target, &graph, &knobs)
                    .and_then(|c| GraphPlan::new(target, &graph, c, label))
                {
                    Ok(p) => plans.push(Rc::new(p)),
                    Err(_) => failed += 1,
                }
            }
        }
        base += 1;
    }
    Ok(GraphCandidates {
        plans,
        refused,
        failed,
    })
}

/// The heuristics' knob choices with one split knob changed, for each split knob the engine
/// has and each value [`planner::split_values`] allows.
fn split_variants(info: &EngineInfo) -> Result<Vec<(Knobs, String)>, EngineError> {
    let mut out = Vec::new();
    for (ty, min, max, stride) in info.split_knobs()? {
        let current = info.knobs.iter().find(|(t, _)| *t == ty).map(|(_, v)| *v);
        for v in planner::split_values(min, max, stride, current) {
            let mut knobs: Vec<(u32, i64)> = info
                .knobs
                .iter()
                .copied()
                .filter(|(t, _)| *t != ty)
                .collect();
            knobs.push((ty, v));
            let label = info.label(&knobs);
            out.push((knobs, label));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! These need cuDNN's library but no GPU: descriptors, unlike handles and plans, are built
    //! on the host. CI runs them after installing the CUDA toolchain (`.ci/run`).
    use super::*;
    use crate::fused::{
        conv_graph::{ConvEpilogue, Filter},
        graph::Shape,
    };

    fn spec(epi: ConvEpilogue) -> ConvGraphSpec {
        let s = Shape {
            n: 1,
            h: 7,
            w: 7,
            c: 512,
        };
        let f = Filter {
            k: 512,
            c: 512,
            r: 3,
            s: 3,
            stride: 1,
            pad: 1,
        };
        ConvGraphSpec::new(&s, &s, f, epi)
    }

    #[test]
    fn cudnn_accepts_every_descriptor_of_a_fused_convolution() {
        let full = ConvEpilogue {
            bias: true,
            residual: true,
            relu: true,
        };
        let bare = ConvEpilogue {
            bias: false,
            residual: false,
            relu: false,
        };
        for elem in [Elem::F32, Elem::F16, Elem::Bf16] {
            for epi in [full, bare] {
                let s = spec(epi);
                let (ops, tensors) =
                    operations(&s, elem).unwrap_or_else(|e| panic!("{elem:?} {epi:?}: {e}"));
                assert_eq!(ops.len(), 1 + s.pointwise.len());
                // Every tensor, the convolution and one pointwise descriptor per operation.
                assert_eq!(tensors.len(), s.tensors.len() + 1 + s.pointwise.len());
            }
        }
    }

    #[test]
    fn an_undeclared_operand_is_an_error_before_cudnn_is_asked() {
        let mut s = spec(ConvEpilogue {
            bias: true,
            residual: false,
            relu: true,
        });
        s.pointwise[0].b = Some(77);
        let e = operations(&s, Elem::F16)
            .err()
            .expect("an undeclared operand");
        assert!(e.to_string().contains("77"), "{e}");
    }

    #[test]
    fn cudnn_refuses_an_attribute_of_the_wrong_type() {
        // So the test above can fail: cuDNN checks each attribute's type as it is set (it
        // does not check shapes between operations until the graph is made, on a GPU).
        let mut d = Desc::new(D::CUDNN_BACKEND_TENSOR_DESCRIPTOR).unwrap();
        assert!(d
            .set(
                A::CUDNN_ATTR_TENSOR_DIMENSIONS,
                T::CUDNN_TYPE_FLOAT,
                &[1.0f32; 4]
            )
            .is_err());
        let mut c = Desc::new(D::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR).unwrap();
        assert!(c.i64s(A::CUDNN_ATTR_CONVOLUTION_CONV_MODE, &[1]).is_err());
    }

    #[test]
    fn cudnn_refuses_a_convolution_without_its_descriptor() {
        let s = spec(ConvEpilogue {
            bias: false,
            residual: false,
            relu: false,
        });
        let (_, tensors) = operations(&s, Elem::F16).unwrap();
        let mut op = Desc::new(D::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR).unwrap();
        op.descs(
            A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X,
            &[&tensors[0]],
        )
        .unwrap();
        op.descs(
            A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,
            &[&tensors[1]],
        )
        .unwrap();
        op.descs(
            A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
            &[&tensors[2]],
        )
        .unwrap();
        assert!(op.finalize().is_err());
    }

    /// The whole search but the run, planned for each device described in
    /// `engine/testdata/*-deviceprop.json` (an H100 written from its published properties;
    /// captures from real cards by `fleetmark-agent cudnn-device` belong there too):
    /// heuristics, engine and knob reading, the split variants and every plan's finalize, as
    /// cuDNN 9.19 does them. Runtime-compiled engines load their kernel through the driver
    /// after compiling it, so this needs the stand-in driver that
    /// `scripts/dev/cudnn_graph_probe/stand_in_driver.sh` builds on the library path (CI does
    /// that); with the toolchain's link-only stub it fails, saying so.
    #[test]
    fn cudnn_plans_a_fused_convolution_for_each_described_device() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("engine/testdata")
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.to_string_lossy().ends_with("-deviceprop.json"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no device descriptions in {dir:?}");
        for file in files {
            let json = std::fs::read(&file).expect("read the description");
            plan_for_described_device(&json, &file.display().to_string());
        }
    }

    fn plan_for_described_device(json: &[u8], name: &str) {
        let device = DeviceProps::from_json(json)
            .unwrap_or_else(|e| panic!("{name}: cuDNN does not read it: {e}"));
        let fused = spec(ConvEpilogue {
            bias: true,
            residual: true,
            relu: true,
        });
        let target = PlanFor::Device(&device);
        let found = candidates(target, &fused, Elem::F16, MathMode::F16, 8)
            .unwrap_or_else(|e| panic!("{name}: no operation graph or heuristics: {e}"));
        assert!(
            !found.plans.is_empty(),
            "{name}: no plan finalized ({}); is the stand-in driver from \
             scripts/dev/cudnn_graph_probe/stand_in_driver.sh on LD_LIBRARY_PATH?",
            found.note()
        );
        let labels: Vec<&str> = found.plans.iter().map(|p| p.label.as_str()).collect();
        eprintln!("{name}: f16: {}: {labels:?}", found.note());
        let unique: HashSet<&str> = labels.iter().copied().collect();
        assert_eq!(unique.len(), labels.len(), "{name}: {labels:?}");
        assert!(
            labels.iter().any(|l| l.contains("split_k_slc=2")),
            "{name}: the split variants were made: {labels:?}"
        );
        // The space-to-depth stem in chunks of 8 images (`--fused-stem-chunk`, f16): a 4x4
        // convolution over 16 channels with bias and ReLU, the shape the chunked plan gives it.
        let stem = ConvGraphSpec::new(
            &Shape {
                n: 8,
                h: 115,
                w: 115,
                c: 16,
            },
            &Shape {
                n: 8,
                h: 112,
                w: 112,
                c: 64,
            },
            Filter {
                k: 64,
                c: 16,
                r: 4,
                s: 4,
                stride: 1,
                pad: 0,
            },
            ConvEpilogue {
                bias: true,
                residual: false,
                relu: true,
            },
        );
        let found = candidates(target, &stem, Elem::F16, MathMode::F16, 2).unwrap();
        eprintln!("{name}: chunked s2d stem, f16: {}", found.note());
        assert!(!found.plans.is_empty(), "{name}: {}", found.note());
        // TF32 engines are allowed for TF32 math, and refused for true f32.
        let tf32 = candidates(target, &fused, Elem::F32, MathMode::Tf32, 8).unwrap();
        let f32 = candidates(target, &fused, Elem::F32, MathMode::F32, 8).unwrap();
        eprintln!("{name}: tf32: {}; f32: {}", tf32.note(), f32.note());
        assert!(
            f32.refused > 0 && tf32.refused < f32.refused,
            "{name}: tf32: {}; f32: {}",
            tf32.note(),
            f32.note()
        );
    }

    #[test]
    fn cudnn_refuses_a_tensor_with_no_dimensions() {
        // Our setters reach cuDNN and it checks what they pass: a tensor without its
        // dimensions does not finalize.
        let mut d = Desc::new(D::CUDNN_BACKEND_TENSOR_DESCRIPTOR).unwrap();
        d.data_type(
            A::CUDNN_ATTR_TENSOR_DATA_TYPE,
            dnn::cudnnDataType_t::CUDNN_DATA_HALF,
        )
        .unwrap();
        d.i64s(A::CUDNN_ATTR_TENSOR_UNIQUE_ID, &[1]).unwrap();
        assert!(d.finalize().is_err());
    }
}
