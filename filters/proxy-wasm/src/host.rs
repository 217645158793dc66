//! Host calls made directly instead of through the SDK, whose wrappers panic on any status
//! they do not expect (and whose header-map reader panics on a header value that is not
//! UTF-8, which HTTP allows and Envoy passes on: one such request would abort the VM). A host
//! that lacks a call, or refuses a value, must cost a feature, never the VM. Same imports,
//! status read as a plain integer.

use proxy_wasm::types::LogLevel;
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
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_close_stream(stream_type: u32) -> u32;
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

/// proxy-wasm map types.
pub const REQUEST_HEADERS: u32 = 0;
pub const CALL_RESPONSE_HEADERS: u32 = 6;

pub fn log(level: LogLevel, message: &str) {
    // SAFETY: the message outlives the call; the host only reads it.
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// A header map (`REQUEST_HEADERS`, `CALL_RESPONSE_HEADERS`); `None` when the host refuses.
pub fn header_map(map_type: u32) -> Option<Vec<(String, String)>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the host writes a pointer and a size.
    let status = unsafe { proxy_get_header_map_pairs(map_type, &mut data, &mut size) };
    let bytes = take_buffer(data, size);
    if status != OK {
        return None;
    }
    parse_map(&bytes)
}

/// The proxy-wasm map encoding: a u32 count, a (name, value) length pair per entry, then each
/// name and value followed by a NUL. Bytes that are not UTF-8 become U+FFFD: such a value
/// can never match a rule or be a token, and it must not stop the request.
fn parse_map(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    };
    let count = word(0)?;
    let mut at = count.checked_mul(8)?.checked_add(4)?;
    let mut pairs = Vec::with_capacity(count.min(256));
    for n in 0..count {
        let lengths = n.checked_mul(8)?.checked_add(4)?;
        let (name_len, value_len) = (word(lengths)?, word(lengths.checked_add(4)?)?);
        let name = bytes.get(at..at.checked_add(name_len)?)?;
        at = at.checked_add(name_len)?.checked_add(1)?;
        let value = bytes.get(at..at.checked_add(value_len)?)?;
        at = at.checked_add(value_len)?.checked_add(1)?;
        pairs.push((String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned()));
    }
    Some(pairs)
}

fn serialize_map(pairs: &[(String, String)]) -> Vec<u8> {
    let size = pairs.iter().map(|(n, v)| n.len() + v.len() + 10).sum::<usize>() + 4;
    let mut bytes = Vec::with_capacity(size);
    let length = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    bytes.extend_from_slice(&length(pairs.len()));
    for (name, value) in pairs {
        bytes.extend_from_slice(&length(name.len()));
        bytes.extend_from_slice(&length(value.len()));
    }
    for (name, value) in pairs {
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
    }
    bytes
}

/// Sets request header `name` to `value` (replacing it); false when the host refused.
pub fn set_request_header(name: &str, value: &str) -> bool {
    // SAFETY: both buffers outlive the call; the host only reads them.
    let status = unsafe {
        proxy_replace_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    };
    status == OK
}

pub fn remove_request_header(name: &str) -> bool {
    // SAFETY: the name outlives the call; the host only reads it.
    let status = unsafe { proxy_remove_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len()) };
    status == OK
}

/// Answers the current request locally; false when the host refused.
pub fn send_response(status: u16, headers: &[(String, String)], body: &str) -> bool {
    let map = serialize_map(headers);
    // SAFETY: all buffers outlive the call; the host only reads them. -1: not gRPC.
    let result = unsafe {
        proxy_send_local_response(
            u32::from(status),
            b"".as_ptr(),
            0,
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        )
    };
    result == OK
}

/// Resets the current request's stream (when it cannot be answered).
pub fn close_request() {
    // SAFETY: a plain integer argument; 0 is the HTTP request stream.
    let _ = unsafe { proxy_close_stream(0) };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_round_trip_and_bad_bytes_are_replaced_not_fatal() {
        let pairs = vec![(":path".to_string(), "/a".to_string()), ("x-note".to_string(), String::new())];
        assert_eq!(parse_map(&serialize_map(&pairs)), Some(pairs));
        let mut latin1 = serialize_map(&[("x-note".to_string(), "caf?".to_string())]);
        if let Some(byte) = latin1.iter_mut().rev().nth(1) {
            *byte = 0xe9;
        }
        assert_eq!(parse_map(&latin1), Some(vec![("x-note".to_string(), "caf\u{fffd}".to_string())]));
        assert_eq!(parse_map(&[5, 0, 0, 0, 1]), None, "truncated");
        assert_eq!(parse_map(&[255, 255, 255, 255]), None, "a count larger than the buffer");
        assert_eq!(parse_map(&[]), Some(vec![]));
    }
}
