//! Host calls whose SDK wrappers panic on an unexpected status (`set_property`,
//! `get_current_time`, `set_tick_period`): a host that lacks them, or refuses a value, must
//! cost a feature, never the VM. Same imports, status read as a plain integer.

#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
}

const OK: u32 = 0;

/// Sets a property (Envoy: filter state `wasm.<path>`) for the current request; false when
/// the host refused.
pub fn set_property(path: &str, value: &[u8]) -> bool {
    // SAFETY: both buffers outlive the call; the host only reads them.
    let status = unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) };
    status == OK
}

/// The host's wall clock in milliseconds since the Unix epoch; `None` when it has none.
pub fn now_ms() -> Option<u64> {
    let mut nanos: u64 = 0;
    // SAFETY: the host writes one u64 to a valid, aligned location.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    (status == OK).then_some(nanos / 1_000_000)
}

/// Sub-second nanoseconds of the clock, for jitter (0 without a clock).
pub fn subsec_nanos() -> u32 {
    let mut nanos: u64 = 0;
    // SAFETY: as in `now_ms`.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    if status == OK {
        u32::try_from(nanos % 1_000_000_000).unwrap_or(0)
    } else {
        0
    }
}

/// Asks for `on_tick` every `period_ms`; false when the host has no timers.
pub fn set_tick_period(period_ms: u32) -> bool {
    // SAFETY: a plain integer argument.
    let status = unsafe { proxy_set_tick_period_milliseconds(period_ms) };
    status == OK
}
