//! The response to an allowed MCP list call (`tools/list`, `prompts/list`, `resources/list`),
//! filtered for the agent that asked: buffered whole, passed through `Gate::filter_list`,
//! written back. Nothing of it reaches the client unfiltered: a body that cannot be read,
//! that outgrows [`LIMIT`] or the host's buffers, or that the host will not hand over is
//! replaced with a JSON-RPC error (the upstream's HTTP status stays; its headers were sent).
//!
//! Hosts buffer differently. Envoy keeps a body while the filter answers
//! StopIterationAndBuffer and then hands over all of it, with the total size. Kong
//! (ngx_wasm_module) takes a pause in `on_response_body` as "buffer" and calls again once,
//! with the whole body (end of stream) or with its buffers full (`wasm_response_body_buffers`,
//! 4 × 4 KiB by default): a list larger than those is refused. APISIX (wasm-nginx-module)
//! cannot replace a response body at all: list calls are refused at the request there.

use crate::host::{Host, Level};
use crate::{HostKind, Shared, CONTINUE, PAUSE};
use agentgate::gate::ListFilter;
use agentgate::mcp;
use std::cell::Cell;
use std::rc::Rc;

/// The largest list response buffered (1 MiB); a larger one is replaced with an error.
pub const LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No body seen yet.
    Waiting,
    /// The filter asked the host to buffer.
    Buffering,
    /// Filtered and written back: later callbacks pass through.
    Done,
    /// Replaced with an error: later chunks are blanked.
    Failed,
}

pub struct ListResponse {
    shared: Rc<Shared>,
    filter: ListFilter,
    event_stream: Cell<bool>,
    state: Cell<State>,
}

impl ListResponse {
    pub fn new(shared: Rc<Shared>, filter: ListFilter) -> ListResponse {
        ListResponse { shared, filter, event_stream: Cell::new(false), state: Cell::new(State::Waiting) }
    }

    /// The body will change length, and is always written uncompressed: the upstream's
    /// framing and encoding go (the host frames the new body).
    pub fn on_headers(&self, host: &dyn Host, _end_of_stream: bool) {
        let headers = host.header_map(crate::host::Map::ResponseHeaders).unwrap_or_default();
        let event_stream = headers.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case("content-type")
                && value.trim_start().get(..17).is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
        });
        self.event_stream.set(event_stream);
        for name in ["content-length", "content-encoding"] {
            host.remove_response_header(name);
        }
    }

    /// `size`: the body the host holds now (Envoy: all of it while buffering; Kong: the
    /// chunk, or its buffers).
    pub fn on_body(&self, host: &dyn Host, kind: HostKind, size: usize, end_of_stream: bool) -> u32 {
        match self.state.get() {
            State::Done => return CONTINUE,
            State::Failed => {
                self.blank(host, kind, size);
                return CONTINUE;
            }
            State::Waiting | State::Buffering => {}
        }
        if size > LIMIT {
            self.fail(host, size, &format!("the list response is larger than {LIMIT} bytes"));
            return CONTINUE;
        }
        if !end_of_stream {
            if kind == HostKind::NgxWasmModule && self.state.get() == State::Buffering {
                self.fail(
                    host,
                    size,
                    "the list response outgrew the host's response buffers (raise ngx_wasm_module's wasm_response_body_buffers)",
                );
                return CONTINUE;
            }
            self.state.set(State::Buffering);
            return PAUSE;
        }
        let body = if size == 0 {
            Vec::new()
        } else {
            match host.response_body(size) {
                Some(body) => body,
                None => {
                    self.fail(host, size, "the host did not hand over the list response");
                    return CONTINUE;
                }
            }
        };
        let filtered = self.shared.gate.filter_list(&self.filter, &body, self.event_stream.get());
        self.state.set(State::Done);
        if !host.set_response_body(size, &filtered) {
            host.log(Level::Error, "agentgate: the host did not take the filtered list: response reset");
            host.close_request();
        }
        CONTINUE
    }

    /// Trailers end a body that never said end of stream: whatever was buffered would go
    /// out unfiltered, so the stream is reset.
    pub fn on_trailers(&self, host: &dyn Host) {
        if self.state.get() == State::Buffering {
            self.state.set(State::Failed);
            host.log(Level::Error, "agentgate: a list response ended with trailers, unfiltered: response reset");
            host.close_request();
        }
    }

    /// Replaces the `held` bytes with a JSON-RPC error; later chunks are blanked.
    fn fail(&self, host: &dyn Host, held: usize, why: &str) {
        self.state.set(State::Failed);
        host.log(Level::Error, &format!("agentgate: {why}: replaced with a JSON-RPC error"));
        if !host.set_response_body(held, &mcp::unfilterable_body(self.event_stream.get())) {
            host.close_request();
        }
    }

    /// Empties a chunk after a failure. nginx ends a response with the flag of its last
    /// chunk, which ngx_wasm_module drops with an emptied chunk: a space keeps it (trailing
    /// white space after the JSON error, or an SSE line without a field).
    fn blank(&self, host: &dyn Host, kind: HostKind, size: usize) {
        if size == 0 {
            return;
        }
        let filler: &[u8] = if kind == HostKind::NgxWasmModule { b" " } else { b"" };
        if !host.set_response_body(size, filler) {
            host.close_request();
        }
    }
}
