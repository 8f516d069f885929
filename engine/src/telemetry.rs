//! Host-side helpers for telemetry summaries shared by backends.

use fleetmark_core::Telemetry;

/// A one-line description of telemetry for logs: clocks, power and whether it throttled.
pub fn describe(t: &Telemetry) -> String {
    let sm = t
        .sm_clock_mhz
        .as_ref()
        .map(|m| format!("sm {:.0}-{:.0} MHz", m.min, m.max))
        .unwrap_or_default();
    let power = t
        .power_watts
        .as_ref()
        .map(|m| format!("power {:.0} W mean, {:.0} W max", m.mean, m.max))
        .unwrap_or_default();
    format!(
        "{sm}, {power}, throttled: {} {:?}",
        t.throttled, t.throttle_reasons
    )
}
