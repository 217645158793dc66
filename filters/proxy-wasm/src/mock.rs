//! A host for native tests of the filter's own logic: answers from fields the test sets,
//! and records what the filter did (logs, header changes, responses, callouts).

use crate::crypto::Foreign;
use crate::host::{Host, Level, Map, CAS_MISMATCH};
use agentgate::host_crypto::HostVerifier;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// A host's foreign function: its answer, or the status it refuses with.
pub type ForeignFn = Arc<dyn Fn(&[u8]) -> Result<Vec<u8>, u32> + Send + Sync>;

type Headers = Vec<(String, String)>;

#[derive(Default)]
pub struct State {
    pub now_nanos: u64,
    pub config: Vec<u8>,
    pub headers: Option<Vec<(String, String)>>,
    pub properties: HashMap<String, Result<Vec<u8>, u32>>,
    pub shared: HashMap<String, (Vec<u8>, u32)>,
    pub logs: Vec<(Level, String)>,
    /// Header changes in order: (name, Some(value)) replaced, (name, None) removed.
    pub changes: Vec<(String, Option<String>)>,
    pub response: Option<(u16, Headers, String)>,
    /// Headers added to the upstream's response.
    pub added_response_headers: Headers,
    pub continued: usize,
    /// The contexts the filter made current, in order.
    pub effective: Vec<u32>,
    /// Callouts dispatched: (token, upstream, headers).
    pub calls: Vec<(u32, String, Headers)>,
    pub call_response: Option<(Headers, Vec<u8>)>,
    pub request_body: Option<Vec<u8>>,
    pub response_headers: Option<Vec<(String, String)>>,
    /// The response body the host holds now; the filter's replacements land here.
    pub response_body: Option<Vec<u8>>,
    /// Response headers the filter removed.
    pub removed_response_headers: Vec<String>,
    /// Properties the filter set, in order.
    pub set: Vec<(String, Vec<u8>)>,
    pub tick_ms: Option<u32>,
    /// Host calls answered with this status (by method name).
    pub refuse: HashMap<&'static str, u32>,
    /// `verify_signature`, where the host has it (else Unimplemented); shared with the
    /// verifier the gate holds, so a test can change it after the probe.
    pub verify_signature: Arc<Mutex<Option<ForeignFn>>>,
    /// What the signature verifier handed to the gate logged (it outlives any borrow).
    pub crypto_logs: Arc<Mutex<Vec<String>>>,
}

#[derive(Clone, Default)]
pub struct Mock(pub Rc<RefCell<State>>);

impl Mock {
    pub fn state(&self) -> std::cell::RefMut<'_, State> {
        self.0.borrow_mut()
    }

    /// Gives the host a `verify_signature` (`None`: takes it away).
    pub fn set_verify_signature(&self, call: Option<ForeignFn>) {
        *self.0.borrow().verify_signature.lock().unwrap_or_else(|e| e.into_inner()) = call;
    }

    fn refused(&self, call: &'static str) -> Option<u32> {
        self.0.borrow().refuse.get(call).copied()
    }
}

impl Host for Mock {
    fn log(&self, level: Level, message: &str) {
        self.state().logs.push((level, message.to_string()));
    }
    fn host_clock_nanos(&self) -> Option<u64> {
        self.refused("clock").is_none().then(|| self.0.borrow().now_nanos)
    }
    fn wasi_clock_nanos(&self) -> Option<u64> {
        self.host_clock_nanos()
    }
    fn random(&self, buf: &mut [u8]) -> bool {
        buf.fill(0xab);
        true
    }
    fn set_tick_period(&self, period_ms: u32) -> bool {
        self.state().tick_ms = Some(period_ms);
        true
    }
    fn plugin_configuration(&self) -> Result<Option<Vec<u8>>, u32> {
        Ok(Some(self.0.borrow().config.clone()))
    }
    fn call_response_body(&self, max: usize) -> Option<Vec<u8>> {
        let body = self.0.borrow().call_response.as_ref().map(|(_, b)| b.clone())?;
        Some(body.into_iter().take(max).collect())
    }
    fn request_body(&self, max: usize) -> Option<Vec<u8>> {
        let body = self.0.borrow().request_body.clone()?;
        Some(body.into_iter().take(max).collect())
    }
    fn header_map(&self, map: Map) -> Option<Vec<(String, String)>> {
        let state = self.0.borrow();
        match map {
            Map::RequestHeaders => state.headers.clone(),
            Map::ResponseHeaders => state.response_headers.clone(),
            Map::CallResponseHeaders => state.call_response.as_ref().map(|(h, _)| h.clone()),
        }
    }
    fn replace_request_header(&self, name: &str, value: &str) -> bool {
        self.state().changes.push((name.to_string(), Some(value.to_string())));
        true
    }
    fn remove_request_header(&self, name: &str) -> bool {
        self.state().changes.push((name.to_string(), None));
        true
    }
    fn remove_response_header(&self, name: &str) -> bool {
        self.state().removed_response_headers.push(name.to_string());
        true
    }
    fn response_body(&self, max: usize) -> Option<Vec<u8>> {
        let body = self.0.borrow().response_body.clone()?;
        Some(body.into_iter().take(max).collect())
    }
    fn set_response_body(&self, held: usize, body: &[u8]) -> bool {
        if self.refused("set_response_body").is_some() {
            return false;
        }
        let mut state = self.state();
        let rest = state.response_body.as_deref().unwrap_or_default().get(held..).unwrap_or_default().to_vec();
        state.response_body = Some([body, &rest].concat());
        true
    }
    fn add_response_header(&self, name: &str, value: &str) -> bool {
        self.state().added_response_headers.push((name.to_string(), value.to_string()));
        true
    }
    fn send_response(&self, status: u16, headers: &[(String, String)], body: &str) -> bool {
        self.state().response = Some((status, headers.to_vec(), body.to_string()));
        true
    }
    fn set_effective_context(&self, context: u32) -> bool {
        self.state().effective.push(context);
        true
    }
    fn continue_request(&self) -> bool {
        self.state().continued += 1;
        true
    }
    fn close_request(&self) {}
    fn get_property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, u32> {
        match self.0.borrow().properties.get(&path.join(".")) {
            Some(Ok(value)) => Ok(Some(value.clone())),
            Some(Err(status)) => Err(*status),
            None => Ok(None),
        }
    }
    fn set_property(&self, path: &str, value: &[u8]) -> bool {
        self.state().set.push((path.to_string(), value.to_vec()));
        self.refused("set_property").is_none()
    }
    fn get_shared_data(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), u32> {
        if let Some(status) = self.refused("shared") {
            return Err(status);
        }
        Ok(match self.0.borrow().shared.get(key) {
            Some((value, cas)) => (Some(value.clone()), *cas),
            None => (None, 0),
        })
    }
    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> Result<(), u32> {
        if let Some(status) = self.refused("shared") {
            return Err(status);
        }
        let mut state = self.state();
        let current = state.shared.get(key).map_or(0, |(_, cas)| *cas);
        if cas != 0 && cas != current {
            return Err(CAS_MISMATCH);
        }
        state.shared.insert(key.to_string(), (value.to_vec(), current + 1));
        Ok(())
    }
    fn http_call(&self, upstream: &str, headers: &[(&str, &str)], _timeout_ms: u32) -> Result<u32, u32> {
        if let Some(status) = self.refused("http_call") {
            return Err(status);
        }
        let mut state = self.state();
        let token = u32::try_from(state.calls.len()).unwrap_or(0) + 1;
        let headers = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        state.calls.push((token, upstream.to_string(), headers));
        Ok(token)
    }
    fn define_counter(&self, _name: &str) -> Option<u32> {
        self.refused("metrics").map_or(Some(1), |_| None)
    }
    fn increment(&self, _id: u32) {}
    fn call_foreign_function(&self, name: &str, arguments: &[u8]) -> Result<Vec<u8>, u32> {
        let call = self.0.borrow().verify_signature.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match (call, name) {
            (Some(call), crate::crypto::VERIFY_SIGNATURE) => call(arguments),
            _ => Err(12),
        }
    }
    fn signature_verifier(&self) -> Box<dyn HostVerifier + Send + Sync> {
        let state = self.0.borrow();
        let call = Arc::clone(&state.verify_signature);
        let logs = Arc::clone(&state.crypto_logs);
        Box::new(Foreign::new(
            move |arguments: &[u8]| {
                let call = call.lock().unwrap_or_else(|e| e.into_inner()).clone();
                call.map_or(Err(12), |call| call(arguments))
            },
            move |why: &str| logs.lock().unwrap_or_else(|e| e.into_inner()).push(crate::crypto::refusal(why)),
        ))
    }
}
