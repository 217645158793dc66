//! Any bytes as a policy: must compile or fail with an error, never panic.
#![no_main]

use agentgate::Gate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Gate::from_json(text).map_err(|e| e.to_string());
    }
});
