//! The one door to the host. Every host call the filter makes is a method of [`Host`]; each
//! returns what the host answered (a status, a value or nothing) and never panics, whatever
//! the host answers. [`RawHost`] (wasm only) makes the proxy-wasm ABI 0.2.1 calls directly;
//! the tests drive the filter with a mock. Bytes from the host are bounds-checked and
//! decoded lossily: a header value that is not UTF-8 can never match a rule or be a token,
//! and must not stop the request.

use agentgate::host_crypto::HostVerifier;

/// proxy-wasm statuses the filter tells apart.
pub const OK: u32 = 0;
pub const NOT_FOUND: u32 = 1;
pub const BAD_ARGUMENT: u32 = 2;
pub const CAS_MISMATCH: u32 = 8;
// The raw imports' answer for a garbage buffer (wasm only; tests use it too).
#[cfg_attr(not(any(target_arch = "wasm32", test)), allow(dead_code))]
pub const INTERNAL_FAILURE: u32 = 10;

/// proxy-wasm log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl From<agentgate::config::LogLevel> for Level {
    fn from(level: agentgate::config::LogLevel) -> Level {
        use agentgate::config::LogLevel;
        match level {
            LogLevel::Trace => Level::Trace,
            LogLevel::Debug => Level::Debug,
            LogLevel::Info => Level::Info,
            LogLevel::Warn => Level::Warn,
            LogLevel::Error => Level::Error,
            LogLevel::Critical => Level::Critical,
        }
    }
}

/// proxy-wasm header map types.
#[allow(clippy::enum_variant_names)] // the ABI's names
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Map {
    RequestHeaders = 0,
    ResponseHeaders = 2,
    CallResponseHeaders = 6,
}

/// Every host call the filter makes.
pub trait Host {
    fn log(&self, level: Level, message: &str);
    /// The proxy-wasm clock, Unix nanoseconds.
    fn host_clock_nanos(&self) -> Option<u64>;
    /// WASI's realtime clock, Unix nanoseconds (APISIX has no proxy-wasm clock).
    fn wasi_clock_nanos(&self) -> Option<u64>;
    /// Fills `buf` with random bytes (WASI `random_get`); false when the host cannot.
    fn random(&self, buf: &mut [u8]) -> bool;
    fn set_tick_period(&self, period_ms: u32) -> bool;
    /// The plugin configuration (the policy): `Ok(None)` when there is none.
    fn plugin_configuration(&self) -> Result<Option<Vec<u8>>, u32>;
    /// Up to `max` bytes of the callout response body.
    fn call_response_body(&self, max: usize) -> Option<Vec<u8>>;
    /// Up to `max` bytes of the request body the host holds now (call only from
    /// `on_request_body`: Kong traps a read from other callbacks).
    fn request_body(&self, max: usize) -> Option<Vec<u8>>;
    /// A header map; `None` when the host refuses or answers garbage.
    fn header_map(&self, map: Map) -> Option<Vec<(String, String)>>;
    fn replace_request_header(&self, name: &str, value: &str) -> bool;
    fn remove_request_header(&self, name: &str) -> bool;
    /// Call only from `on_response_headers` (hosts send the headers once it returns).
    fn remove_response_header(&self, name: &str) -> bool;
    /// Up to `max` bytes of the response body the host holds now (call only from
    /// `on_response_body`: Envoy's buffered body while the filter buffers; Kong's chunk, or
    /// its buffers).
    fn response_body(&self, max: usize) -> Option<Vec<u8>>;
    /// Replaces the `held` bytes of response body the host holds now with `body` (call only
    /// from `on_response_body`).
    fn set_response_body(&self, held: usize, body: &[u8]) -> bool;
    /// Adds a header to the upstream's response (call only from `on_response_headers`).
    fn add_response_header(&self, name: &str, value: &str) -> bool;
    fn send_response(&self, status: u16, headers: &[(String, String)], body: &str) -> bool;
    /// Makes request `context` the current one (Envoy answers every callout on the root
    /// context; Kong answers a request's callout with that request current and ignores this).
    fn set_effective_context(&self, context: u32) -> bool;
    /// Lets the current (paused) request go on.
    fn continue_request(&self) -> bool;
    /// Resets the current request's stream (when it cannot be answered).
    fn close_request(&self);
    /// `Ok(Some)` when set, `Ok(None)` when the host has no value, `Err(status)` otherwise.
    fn get_property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, u32>;
    fn set_property(&self, path: &str, value: &[u8]) -> bool;
    /// The value (if any) and its compare-and-swap token.
    fn get_shared_data(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), u32>;
    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> Result<(), u32>;
    /// Dispatches a callout; its token, or the status the host refused it with.
    fn http_call(&self, upstream: &str, headers: &[(&str, &str)], timeout_ms: u32) -> Result<u32, u32>;
    fn define_counter(&self, name: &str) -> Option<u32>;
    fn increment(&self, id: u32);
    /// Calls the host's foreign function `name` (Envoy's extensions: `verify_signature`): its
    /// answer, or the status it refused with. Kong traps on any name it does not know: call
    /// only where the host is known to be Envoy (see `crypto`).
    fn call_foreign_function(&self, name: &str, arguments: &[u8]) -> Result<Vec<u8>, u32>;
    /// The host's signature checks as the core takes them (each a `verify_signature` call),
    /// for a gate that outlives any borrow of the host.
    fn signature_verifier(&self) -> Box<dyn HostVerifier + Send + Sync>;
}

/// Milliseconds since the Unix epoch: the host's clock, else WASI's.
pub fn now_ms(host: &dyn Host) -> Option<u64> {
    host.host_clock_nanos().or_else(|| host.wasi_clock_nanos()).map(|nanos| nanos / 1_000_000)
}

/// The proxy-wasm map encoding: a u32 count, a (name, value) length pair per entry, then each
/// name and value followed by a NUL. Bytes that are not UTF-8 become U+FFFD.
#[cfg_attr(not(any(target_arch = "wasm32", test)), allow(dead_code))]
pub fn parse_map(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    // `from_utf8` checks ASCII a word at a time; the lossy decoder goes byte by byte.
    let text =
        |b: &[u8]| std::str::from_utf8(b).map_or_else(|_| String::from_utf8_lossy(b).into_owned(), str::to_owned);
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
        pairs.push((text(name), text(value)));
    }
    Some(pairs)
}

#[cfg_attr(not(any(target_arch = "wasm32", test)), allow(dead_code))]
pub fn serialize_map<N: AsRef<str>, V: AsRef<str>>(pairs: &[(N, V)]) -> Vec<u8> {
    let size = pairs.iter().map(|(n, v)| n.as_ref().len() + v.as_ref().len() + 10).sum::<usize>() + 4;
    let mut bytes = Vec::with_capacity(size);
    let length = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    bytes.extend_from_slice(&length(pairs.len()));
    for (name, value) in pairs {
        bytes.extend_from_slice(&length(name.as_ref().len()));
        bytes.extend_from_slice(&length(value.as_ref().len()));
    }
    for (name, value) in pairs {
        bytes.extend_from_slice(name.as_ref().as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(value.as_ref().as_bytes());
        bytes.push(0);
    }
    bytes
}

#[cfg(target_arch = "wasm32")]
pub use raw::{allocate, RawHost};

#[cfg(target_arch = "wasm32")]
mod raw {
    use super::{parse_map, serialize_map, Host, HostVerifier, Level, Map, INTERNAL_FAILURE, OK};
    use crate::crypto::Foreign;
    use std::cell::Cell;
    use std::mem::ManuallyDrop;
    use std::ptr::null_mut;

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
        fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
        fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            data: *mut *mut u8,
            size: *mut usize,
        ) -> u32;
        fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32;
        fn proxy_replace_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        fn proxy_add_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
        fn proxy_set_buffer_bytes(
            buffer_type: u32,
            start: usize,
            size: usize,
            buffer_data: *const u8,
            buffer_size: usize,
        ) -> u32;
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
        fn proxy_continue_stream(stream_type: u32) -> u32;
        fn proxy_set_effective_context(context_id: u32) -> u32;
        fn proxy_close_stream(stream_type: u32) -> u32;
        fn proxy_get_property(path_data: *const u8, path_size: usize, value: *mut *mut u8, size: *mut usize) -> u32;
        fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
        fn proxy_get_shared_data(
            key_data: *const u8,
            key_size: usize,
            value: *mut *mut u8,
            size: *mut usize,
            cas: *mut u32,
        ) -> u32;
        fn proxy_set_shared_data(
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
            cas: u32,
        ) -> u32;
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
        fn proxy_define_metric(metric_type: u32, name_data: *const u8, name_size: usize, id: *mut u32) -> u32;
        fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
        fn proxy_call_foreign_function(
            name_data: *const u8,
            name_size: usize,
            arguments_data: *const u8,
            arguments_size: usize,
            results: *mut *mut u8,
            results_size: *mut usize,
        ) -> u32;
    }

    // std's clock and randomness panic when WASI fails: call them directly.
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        fn clock_time_get(clock_id: i32, precision: i64, time: *mut u64) -> i32;
        fn random_get(buf: *mut u8, len: usize) -> i32;
    }

    /// proxy-wasm buffer types.
    const PLUGIN_CONFIGURATION: u32 = 7;
    const CALL_RESPONSE_BODY: u32 = 4;
    const REQUEST_BODY: u32 = 0;
    const RESPONSE_BODY: u32 = 1;
    /// The HTTP request stream (continue, close).
    const REQUEST_STREAM: u32 = 0;

    thread_local! {
        /// The buffer handed to the host last (address, size): a buffer the host hands back
        /// must be that one, or it is garbage and left alone.
        static HANDED: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    }

    /// `proxy_on_memory_allocate`: a zeroed buffer of `size` bytes for the host to fill.
    pub fn allocate(size: usize) -> *mut u8 {
        let mut buffer = ManuallyDrop::new(vec![0u8; size]);
        let data = buffer.as_mut_ptr();
        HANDED.with(|handed| handed.set((data as usize, size)));
        data
    }

    /// Takes back the buffer the host filled: `None` when what it reports is not the
    /// buffer it was given (a garbage pointer or size), which is then freed untouched.
    fn take_buffer(data: *mut u8, size: usize) -> Option<Vec<u8>> {
        let (address, capacity) = HANDED.with(|handed| handed.replace((0, 0)));
        // SAFETY: `address` and `capacity` are exactly a Vec<u8> that `allocate` leaked.
        let handed = (address != 0).then(|| unsafe { Vec::from_raw_parts(address as *mut u8, capacity, capacity) });
        match handed {
            None if data.is_null() || size == 0 => Some(Vec::new()),
            Some(mut buffer) if data as usize == address && size <= capacity => {
                buffer.truncate(size);
                Some(buffer)
            }
            _ => None,
        }
    }

    /// A call that hands back a buffer: its status and the bytes (InternalFailure for garbage).
    fn fetch(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> (u32, Vec<u8>) {
        let (mut data, mut size) = (null_mut(), 0usize);
        HANDED.with(|handed| handed.set((0, 0)));
        let status = call(&mut data, &mut size);
        match take_buffer(data, size) {
            Some(bytes) => (status, bytes),
            None => (INTERNAL_FAILURE, Vec::new()),
        }
    }

    /// The filter's host: the proxy-wasm imports.
    pub struct RawHost;

    impl Host for RawHost {
        fn log(&self, level: Level, message: &str) {
            // SAFETY: the message outlives the call; the host only reads it.
            let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
        }

        fn host_clock_nanos(&self) -> Option<u64> {
            let mut nanos: u64 = 0;
            // SAFETY: the host writes one u64 to a valid, aligned location.
            let status = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
            (status == OK && nanos > 0).then_some(nanos)
        }

        fn wasi_clock_nanos(&self) -> Option<u64> {
            let mut nanos: u64 = 0;
            // SAFETY: as above. 0 is the realtime clock.
            let errno = unsafe { clock_time_get(0, 1, &mut nanos) };
            (errno == 0 && nanos > 0).then_some(nanos)
        }

        fn random(&self, buf: &mut [u8]) -> bool {
            // SAFETY: the host writes `buf.len()` bytes into `buf`.
            unsafe { random_get(buf.as_mut_ptr(), buf.len()) == 0 }
        }

        fn set_tick_period(&self, period_ms: u32) -> bool {
            // SAFETY: a plain integer argument.
            unsafe { proxy_set_tick_period_milliseconds(period_ms) == OK }
        }

        fn plugin_configuration(&self) -> Result<Option<Vec<u8>>, u32> {
            // SAFETY: the host writes a pointer and a size.
            let (status, bytes) =
                fetch(|d, s| unsafe { proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, usize::MAX, d, s) });
            match status {
                OK => Ok((!bytes.is_empty()).then_some(bytes)),
                super::NOT_FOUND => Ok(None),
                other => Err(other),
            }
        }

        fn call_response_body(&self, max: usize) -> Option<Vec<u8>> {
            // SAFETY: the host writes a pointer and a size.
            let (status, mut bytes) = fetch(|d, s| unsafe { proxy_get_buffer_bytes(CALL_RESPONSE_BODY, 0, max, d, s) });
            // A host that hands back more than asked is cut to the limit.
            bytes.truncate(max);
            (status == OK).then_some(bytes)
        }

        fn request_body(&self, max: usize) -> Option<Vec<u8>> {
            // SAFETY: the host writes a pointer and a size.
            // wasm-nginx-module takes the size as a signed 32-bit number.
            let max = max.min(i32::MAX as usize);
            let (status, mut bytes) = fetch(|d, s| unsafe { proxy_get_buffer_bytes(REQUEST_BODY, 0, max, d, s) });
            bytes.truncate(max);
            (status == OK).then_some(bytes)
        }

        fn header_map(&self, map: Map) -> Option<Vec<(String, String)>> {
            // SAFETY: the host writes a pointer and a size.
            let (status, bytes) = fetch(|d, s| unsafe { proxy_get_header_map_pairs(map as u32, d, s) });
            if status != OK {
                return None;
            }
            parse_map(&bytes)
        }

        fn replace_request_header(&self, name: &str, value: &str) -> bool {
            // SAFETY: both buffers outlive the call; the host only reads them.
            unsafe { proxy_replace_header_map_value(0, name.as_ptr(), name.len(), value.as_ptr(), value.len()) == OK }
        }

        fn remove_request_header(&self, name: &str) -> bool {
            // SAFETY: the name outlives the call; the host only reads it.
            unsafe { proxy_remove_header_map_value(0, name.as_ptr(), name.len()) == OK }
        }

        fn remove_response_header(&self, name: &str) -> bool {
            // SAFETY: the name outlives the call; the host only reads it.
            unsafe { proxy_remove_header_map_value(Map::ResponseHeaders as u32, name.as_ptr(), name.len()) == OK }
        }

        fn response_body(&self, max: usize) -> Option<Vec<u8>> {
            let max = max.min(i32::MAX as usize);
            // SAFETY: the host writes a pointer and a size.
            let (status, mut bytes) = fetch(|d, s| unsafe { proxy_get_buffer_bytes(RESPONSE_BODY, 0, max, d, s) });
            bytes.truncate(max);
            (status == OK).then_some(bytes)
        }

        fn set_response_body(&self, held: usize, body: &[u8]) -> bool {
            // Start 0 and a size: Envoy drains that many bytes and prepends `body`;
            // ngx_wasm_module cuts the chunk at 0 and writes at most that many bytes of `body`
            // (a size of 0 would prepend). The larger of the two does both.
            let size = held.max(body.len());
            // SAFETY: the body outlives the call; the host only reads it.
            unsafe { proxy_set_buffer_bytes(RESPONSE_BODY, 0, size, body.as_ptr(), body.len()) == OK }
        }

        fn add_response_header(&self, name: &str, value: &str) -> bool {
            // SAFETY: both buffers outlive the call; the host only reads them. 2: response headers.
            unsafe { proxy_add_header_map_value(2, name.as_ptr(), name.len(), value.as_ptr(), value.len()) == OK }
        }

        fn send_response(&self, status: u16, headers: &[(String, String)], body: &str) -> bool {
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

        fn set_effective_context(&self, context: u32) -> bool {
            // SAFETY: a plain integer argument.
            unsafe { proxy_set_effective_context(context) == OK }
        }

        fn continue_request(&self) -> bool {
            // SAFETY: a plain integer argument.
            unsafe { proxy_continue_stream(REQUEST_STREAM) == OK }
        }

        fn close_request(&self) {
            // SAFETY: a plain integer argument.
            let _ = unsafe { proxy_close_stream(REQUEST_STREAM) };
        }

        fn get_property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, u32> {
            let joined = path.join("\0");
            // SAFETY: the path outlives the call; the host writes a pointer and a size.
            let (status, bytes) = fetch(|d, s| unsafe { proxy_get_property(joined.as_ptr(), joined.len(), d, s) });
            match status {
                OK => Ok(Some(bytes)),
                super::NOT_FOUND => Ok(None),
                other => Err(other),
            }
        }

        fn set_property(&self, path: &str, value: &[u8]) -> bool {
            // SAFETY: both buffers outlive the call; the host only reads them.
            unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) == OK }
        }

        fn get_shared_data(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), u32> {
            let mut cas = 0u32;
            // SAFETY: the key outlives the call; the host writes a pointer, a size and a CAS.
            let (status, bytes) =
                fetch(|d, s| unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), d, s, &mut cas) });
            match status {
                OK => Ok((Some(bytes), cas)),
                super::NOT_FOUND => Ok((None, cas)),
                other => Err(other),
            }
        }

        fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> Result<(), u32> {
            // SAFETY: both buffers outlive the call; the host only reads them.
            let status = unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) };
            if status == OK {
                Ok(())
            } else {
                Err(status)
            }
        }

        fn http_call(&self, upstream: &str, headers: &[(&str, &str)], timeout_ms: u32) -> Result<u32, u32> {
            let map = serialize_map(headers);
            let empty = serialize_map::<&str, &str>(&[]);
            let mut token = 0u32;
            // SAFETY: all buffers outlive the call; the host writes one u32.
            let status = unsafe {
                proxy_http_call(
                    upstream.as_ptr(),
                    upstream.len(),
                    map.as_ptr(),
                    map.len(),
                    b"".as_ptr(),
                    0,
                    empty.as_ptr(),
                    empty.len(),
                    timeout_ms,
                    &mut token,
                )
            };
            if status == OK {
                Ok(token)
            } else {
                Err(status)
            }
        }

        fn define_counter(&self, name: &str) -> Option<u32> {
            let mut id = 0u32;
            // SAFETY: the name outlives the call; the host writes one u32. 0 is a counter.
            let status = unsafe { proxy_define_metric(0, name.as_ptr(), name.len(), &mut id) };
            (status == OK).then_some(id)
        }

        fn increment(&self, id: u32) {
            // SAFETY: plain integer arguments.
            let _ = unsafe { proxy_increment_metric(id, 1) };
        }

        fn call_foreign_function(&self, name: &str, arguments: &[u8]) -> Result<Vec<u8>, u32> {
            // SAFETY: both buffers outlive the call; the host writes a pointer and a size.
            let (status, bytes) = fetch(|d, s| unsafe {
                proxy_call_foreign_function(name.as_ptr(), name.len(), arguments.as_ptr(), arguments.len(), d, s)
            });
            if status == OK {
                Ok(bytes)
            } else {
                Err(status)
            }
        }

        fn signature_verifier(&self) -> Box<dyn HostVerifier + Send + Sync> {
            Box::new(Foreign::new(
                |arguments: &[u8]| RawHost.call_foreign_function(crate::crypto::VERIFY_SIGNATURE, arguments),
                |why: &str| RawHost.log(Level::Error, &crate::crypto::refusal(why)),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_round_trip_and_bad_bytes_are_replaced_not_fatal() {
        let pairs = vec![(":path".to_string(), "/a".to_string()), ("x-note".to_string(), String::new())];
        assert_eq!(parse_map(&serialize_map(&pairs)), Some(pairs));
        let mut latin1 = serialize_map(&[("x-note", "caf?")]);
        if let Some(byte) = latin1.iter_mut().rev().nth(1) {
            *byte = 0xe9;
        }
        assert_eq!(parse_map(&latin1), Some(vec![("x-note".to_string(), "caf\u{fffd}".to_string())]));
        assert_eq!(parse_map(&[5, 0, 0, 0, 1]), None, "truncated");
        assert_eq!(parse_map(&[255, 255, 255, 255]), None, "a count larger than the buffer");
        assert_eq!(parse_map(&[]), Some(vec![]));
    }
}
