//! The proxy-wasm ABI 0.2.1 exports: each hands its call to the one [`Vm`] of this module
//! instance. Callbacks the filter has no use for answer as a filter that is not there would
//! (continue). Wasm runs one call at a time, and no export holds state borrowed across a
//! host call, so a call that traps in the host leaves nothing locked for the next.

use crate::host::RawHost;
use crate::{Vm, CONTINUE};

thread_local! {
    static VM: Vm<RawHost> = Vm::new(RawHost);
}

fn with<R>(f: impl FnOnce(&Vm<RawHost>) -> R) -> R {
    VM.with(f)
}

fn size(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

extern "C" {
    fn __wasm_call_ctors();
}

#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: the reactor's constructors, run once by the host before any other call.
    unsafe { __wasm_call_ctors() }
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host copies values into memory it asks for here (`host::allocate`).
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    crate::host::allocate(size)
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context: u32, parent: u32) {
    with(|vm| vm.on_context_create(context, parent));
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(context: u32, _vm_configuration_size: u32) -> u32 {
    with(|vm| u32::from(vm.on_vm_start(context)))
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(context: u32, _plugin_configuration_size: u32) -> u32 {
    with(|vm| u32::from(vm.on_configure(context)))
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(context: u32) {
    with(|vm| vm.on_tick(context));
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(context: u32, headers: u32, end_of_stream: u32) -> u32 {
    with(|vm| vm.on_request_headers(context, size(headers), end_of_stream != 0))
}

#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(context: u32, token: u32, _headers: u32, body_size: u32, _trailers: u32) {
    with(|vm| vm.on_http_call_response(context, token, size(body_size)));
}

#[no_mangle]
pub extern "C" fn proxy_on_done(_context: u32) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_log(_context: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context: u32) {
    with(|vm| vm.on_delete(context));
}

#[no_mangle]
pub extern "C" fn proxy_on_queue_ready(_context: u32, _queue: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(context: u32, size: u32, end_of_stream: u32) -> u32 {
    with(|vm| vm.on_request_body(context, self::size(size), end_of_stream != 0))
}

#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(_context: u32, _trailers: u32) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(context: u32, _headers: u32, _end_of_stream: u32) -> u32 {
    with(|vm| vm.on_response_headers(context))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(_context: u32, _size: u32, _end_of_stream: u32) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(_context: u32, _trailers: u32) -> u32 {
    CONTINUE
}
