//! Property tests for the wire edge: any bytes decode to a message or an error, and any
//! message converts to a domain value or a `WireError`, never a panic. Also measures what the
//! largest legitimate result needs against the request limit.

use fleetmark_core::limits::{
    MAX_DETAILS, MAX_DETAIL_CHARS, MAX_LATENCY_SAMPLES, MAX_REQUEST_BYTES, MAX_TEXT_CHARS,
};
use fleetmark_proto::{convert::result_without_latencies, v1 as pb};
use proptest::prelude::*;
use prost::Message;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_iters: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn valid_wire() -> pb::BenchResult {
    let spec = fleetmark_core::SweepSpec::from_toml("batch_sizes=[4]\nprecisions=[\"f32\"]")
        .unwrap()
        .expand()
        .unwrap()
        .remove(0);
    let latencies = vec![1.0, 2.0, 3.0];
    let latency = fleetmark_core::LatencyStats::from_samples(&latencies).unwrap();
    let r = fleetmark_core::BenchResult {
        schema: fleetmark_core::RESULT_SCHEMA_VERSION,
        job_id: None,
        attempt: 1,
        agent_name: "a".into(),
        agent_labels: Default::default(),
        price_per_hour: None,
        hardware_kind: "cpu".into(),
        hardware_name: "cpu".into(),
        device: "cpu".into(),
        images_per_sec: latency.images_per_sec(spec.batch_size),
        spec,
        backend: Default::default(),
        weights: Default::default(),
        latency,
        input_copy: None,
        peak_memory_bytes: 0,
        memory_scope: String::new(),
        warmup_iterations: 0,
        timed_seconds: 0.01,
        telemetry: None,
        correctness: None,
        environment: Default::default(),
        host: Default::default(),
        started_at: chrono::Utc::now(),
        finished_at: chrono::Utc::now(),
        latencies_ms: latencies,
        stability: None,
    };
    r.validate().unwrap();
    (&r).into()
}

fn convert(wire: pb::BenchResult) {
    let _ = result_without_latencies(wire.clone());
    if let Err(e) = fleetmark_core::BenchResult::try_from(wire) {
        assert!(e.to_string().len() < 400, "{e}");
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(m) = pb::BenchResult::decode(bytes.as_slice()) {
            convert(m);
        }
        if let Ok(m) = pb::SubmitSweepRequest::decode(bytes.as_slice()) {
            let _ = fleetmark_core::SweepSpec::from_toml(&m.spec_toml);
        }
        if let Ok(m) = pb::JobSpec::decode(bytes.as_slice()) {
            let _ = fleetmark_core::JobSpec::try_from(m);
        }
        let _ = pb::RegisterRequest::decode(bytes.as_slice());
    }

    #[test]
    fn mutated_valid_messages_fail_cleanly(
        at in 0usize..4096,
        byte in any::<u8>(),
        cut in 0usize..4096,
    ) {
        let mut bytes = valid_wire().encode_to_vec();
        let at = at % bytes.len();
        bytes[at] = byte;
        if let Ok(m) = pb::BenchResult::decode(bytes.as_slice()) {
            convert(m);
        }
        let cut = cut % bytes.len();
        if let Ok(m) = pb::BenchResult::decode(&bytes[..cut]) {
            convert(m);
        }
    }

    #[test]
    fn any_field_values_convert_or_fail_cleanly(
        job_id in "\\PC{0,40}",
        precision in "\\PC{0,8}",
        target in "\\PC{0,8}",
        batch in any::<u32>(),
        size in any::<u32>(),
        ms in any::<u64>(),
        ts in any::<i64>(),
        nanos in any::<i32>(),
        x in any::<f64>(),
    ) {
        let mut w = valid_wire();
        w.job_id = job_id;
        let spec = w.spec.as_mut().unwrap();
        spec.precision = precision;
        spec.target = target;
        spec.batch_size = batch;
        spec.image_size = size;
        spec.measurement.as_mut().unwrap().max_duration_ms = ms;
        w.started_at = Some(prost_types::Timestamp { seconds: ts, nanos });
        w.images_per_sec = x;
        convert(w);
    }
}

/// One result with the most latencies an agent ever sends, and every string (backend details
/// included) at its limit, must fit in one request: this is what sizes `MAX_REQUEST_BYTES`.
#[test]
fn largest_real_result_fits_the_request_limit() {
    let mut w = valid_wire();
    w.latencies_ms = vec![12.345_678_9; MAX_LATENCY_SAMPLES];
    let long = "x".repeat(MAX_TEXT_CHARS);
    w.hardware_name = long.clone();
    w.host = Some(pb::HostInventory {
        hostname: long.clone(),
        cpu_model: long.clone(),
        gpus: (0..8)
            .map(|i| pb::GpuInfo {
                index: i,
                name: long.clone(),
                uuid: long.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    // Every backend detail at its length, in 4-byte characters: the most a detail can weigh.
    let detail = "\u{1F680}".repeat(MAX_DETAIL_CHARS);
    w.backend.get_or_insert_with(Default::default).details = (0..MAX_DETAILS)
        .map(|i| (format!("detail{i}"), detail.clone()))
        .collect();
    let len = pb::SubmitResultRequest {
        agent_id: uuid::Uuid::new_v4().to_string(),
        result: Some(w),
    }
    .encoded_len();
    eprintln!("largest real SubmitResult: {len} bytes; limit {MAX_REQUEST_BYTES}");
    assert!(len < MAX_REQUEST_BYTES * 3 / 4, "{len} bytes");
    assert!(
        len > MAX_REQUEST_BYTES / 4,
        "the limit is not far above real use: {len}"
    );
}
