//! Host calls whose SDK wrappers panic on an unexpected status (`set_property`,
//! `get_property`, `get_current_time`, `set_tick_period`, `get_shared_data`, `http_call`,
//! `define_metric`, `increment_metric`):
//! a host that lacks them, or refuses a value, must cost a feature, never the VM. Same
//! imports, status read as a plain integer.

use std::ptr::null_mut;

#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_property(path_data: *const u8, path_size: usize, value: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        value: *mut *mut u8,
        size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_define_metric(metric_type: u32, name_data: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout: u32,
        token: *mut u32,
    ) -> u32;
}

// std's `SystemTime::now` panics when the WASI clock fails: call it directly.
#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn clock_time_get(clock_id: i32, precision: i64, time: *mut u64) -> i32;
}

/// WASI's realtime clock id.
const CLOCK_REALTIME: i32 = 0;

pub const OK: u32 = 0;
pub const NOT_FOUND: u32 = 1;
pub const BAD_ARGUMENT: u32 = 2;

/// Takes ownership of a buffer the host filled through the SDK's allocator
/// (`proxy_on_memory_allocate`, a `Vec<u8>` of exactly `size`).
fn take_buffer(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: the host allocated `data` with the SDK's allocator as a Vec of capacity `size`
    // and hands it over to us.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// A counter named `name` (Envoy hands back the same one for a name defined again); `None`
/// where the host has no metrics (APISIX).
pub fn define_counter(name: &str) -> Option<u32> {
    let mut id = 0u32;
    // SAFETY: the name outlives the call; the host writes one u32. 0 is a counter.
    let status = unsafe { proxy_define_metric(0, name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

/// Adds one to counter `id`; a refusal is ignored (a counter must never stop a request).
pub fn increment(id: u32) {
    // SAFETY: plain integer arguments.
    let _ = unsafe { proxy_increment_metric(id, 1) };
}

/// A property (`path` segments joined with NUL, as the ABI wants): `Ok(Some)` when set,
/// `Ok(None)` when the host has no value, `Err(status)` otherwise.
pub fn get_property(path: &[&str]) -> Result<Option<Vec<u8>>, u32> {
    let joined = path.join("\0");
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the path outlives the call; the host writes a pointer and a size.
    let status = unsafe { proxy_get_property(joined.as_ptr(), joined.len(), &mut data, &mut size) };
    match status {
        OK => Ok(Some(take_buffer(data, size))),
        NOT_FOUND => Ok(None),
        other => Err(other),
    }
}

/// The status of reading shared data `key` (the value, if any, is dropped): a probe.
pub fn shared_data_status(key: &str) -> u32 {
    let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: the key outlives the call; the host writes a pointer, a size and a CAS.
    let status = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    drop(take_buffer(data, size));
    status
}

/// The status of an HTTP callout the host must refuse (to no upstream at all): a probe of
/// whether the host implements callouts, which dispatches nothing where it does.
pub fn http_call_status() -> u32 {
    let mut token = 0u32;
    // SAFETY: empty buffers; the host writes a token only if it dispatched.
    unsafe { proxy_http_call(b"".as_ptr(), 0, b"".as_ptr(), 0, b"".as_ptr(), 0, b"".as_ptr(), 0, 1, &mut token) }
}

/// Sets a property (Envoy: filter state `wasm.<path>`) for the current request; false when
/// the host refused.
pub fn set_property(path: &str, value: &[u8]) -> bool {
    // SAFETY: both buffers outlive the call; the host only reads them.
    let status = unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) };
    status == OK
}

/// The host's proxy-wasm clock in milliseconds since the Unix epoch.
pub fn host_clock_ms() -> Option<u64> {
    let mut nanos: u64 = 0;
    // SAFETY: the host writes one u64 to a valid, aligned location.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    (status == OK && nanos > 0).then_some(nanos / 1_000_000)
}

/// The WASI clock (`clock_time_get`), for hosts without the proxy-wasm one (APISIX).
pub fn wasi_clock_ms() -> Option<u64> {
    wasi_clock_nanos().map(|nanos| nanos / 1_000_000)
}

fn wasi_clock_nanos() -> Option<u64> {
    let mut nanos: u64 = 0;
    // SAFETY: the host writes one u64 to a valid, aligned location.
    let errno = unsafe { clock_time_get(CLOCK_REALTIME, 1, &mut nanos) };
    (errno == 0 && nanos > 0).then_some(nanos)
}

/// Milliseconds since the Unix epoch: the host's clock, else WASI's; `None` with neither.
pub fn now_ms() -> Option<u64> {
    host_clock_ms().or_else(wasi_clock_ms)
}

/// Sub-second nanoseconds of the clock, for jitter (0 without a clock).
pub fn subsec_nanos() -> u32 {
    let mut nanos: u64 = 0;
    // SAFETY: as in `host_clock_ms`.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    if status == OK {
        u32::try_from(nanos % 1_000_000_000).unwrap_or(0)
    } else {
        wasi_clock_nanos().map_or(0, |nanos| u32::try_from(nanos % 1_000_000_000).unwrap_or(0))
    }
}

/// Asks for `on_tick` every `period_ms`; false when the host has no timers.
pub fn set_tick_period(period_ms: u32) -> bool {
    // SAFETY: a plain integer argument.
    let status = unsafe { proxy_set_tick_period_milliseconds(period_ms) };
    status == OK
}
