//! Envoy's host crypto: the foreign function `verify_signature` (source/extensions/common/
//! wasm/foreign.cc) as the core's [`HostVerifier`]. Its arguments and result are protobuf
//! messages (ext/verify_signature.proto), encoded here by hand:
//! `VerifySignatureArguments { string hash_function = 1; bytes public_key = 2 (DER SPKI);
//! bytes signature = 3; bytes text = 4; }`, `VerifySignatureResult { bool result = 1;
//! string error = 2; }`.
//!
//! Only Envoy is asked. Kong (ngx_wasm_module) defines the import but traps on any name but
//! `resolve_lua` (a fatal trap); APISIX (wasm-nginx-module) answers Unimplemented. So the
//! host must be known for Envoy first ([`crate::HostKind`], told at the first request),
//! and then the known-answer probes of `agentgate::host_crypto` decide per family.

use crate::host::{Host, Level};
use agentgate::host_crypto::{self, HashFunction, HostCrypto, HostVerifier};
use agentgate::keys::Alg;
use agentgate::Gate;
use std::cell::RefCell;

pub const VERIFY_SIGNATURE: &str = "verify_signature";

/// What Envoy's `error` says when the signature simply does not verify (BoringSSL's
/// `EVP_DigestVerify` said no): a verdict, not a failure. Every other error is a failure.
const MISMATCH: &str = "Failed to verify digest";

fn push_varint(out: &mut Vec<u8>, mut value: usize) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn push_field(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(field << 3 | 2);
    push_varint(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// `VerifySignatureArguments` with the key as DER.
pub fn arguments(hash: HashFunction, spki: &[u8], signature: &[u8], text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(spki.len() + signature.len() + text.len() + 24);
    push_field(&mut out, 1, hash.name().as_bytes());
    push_field(&mut out, 2, spki);
    push_field(&mut out, 3, signature);
    push_field(&mut out, 4, text);
    out
}

fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// `VerifySignatureResult`: (result, error). `None` for anything that is not that message
/// (a field of the wrong type, a truncation, an error that is not UTF-8).
pub fn parse_result(bytes: &[u8]) -> Option<(bool, String)> {
    let (mut result, mut error, mut at) = (false, String::new(), 0);
    while at < bytes.len() {
        let key = varint(bytes, &mut at)?;
        match (key >> 3, key & 7) {
            (1, 0) => result = varint(bytes, &mut at)? != 0,
            (2, 2) => {
                let len = usize::try_from(varint(bytes, &mut at)?).ok()?;
                let text = bytes.get(at..at.checked_add(len)?)?;
                error = String::from_utf8(text.to_vec()).ok()?;
                at += len;
            }
            // Fields a later Envoy may add: skipped by their wire type.
            (field, 0) if field > 2 => {
                varint(bytes, &mut at)?;
            }
            (field, 2) if field > 2 => {
                let len = usize::try_from(varint(bytes, &mut at)?).ok()?;
                at = at.checked_add(len).filter(|&end| end <= bytes.len())?;
            }
            _ => return None,
        }
    }
    Some((result, error))
}

/// The verdict in a host's answer: a signature verifies only on `result` true with no
/// error, and fails to only on Envoy's mismatch error; anything else is the host failing.
pub fn verdict(answer: Result<Vec<u8>, u32>) -> Result<bool, String> {
    let bytes = answer.map_err(|status| format!("the host's {VERIFY_SIGNATURE} answered status {status}"))?;
    match parse_result(&bytes) {
        Some((true, error)) if error.is_empty() => Ok(true),
        Some((false, error)) if error.starts_with(MISMATCH) => Ok(false),
        Some((_, error)) => Err(format!("the host's {VERIFY_SIGNATURE} failed: {error:?}")),
        None => Err(format!("the host's {VERIFY_SIGNATURE} answered {} bytes that do not parse", bytes.len())),
    }
}

/// `verify_signature` through `call`; why a call failed goes to `log` (the core turns a
/// failure into the denial `crypto_unavailable`).
pub struct Foreign<C, L> {
    call: C,
    log: L,
}

impl<C, L> Foreign<C, L> {
    pub fn new(call: C, log: L) -> Self {
        Foreign { call, log }
    }
}

impl<C, L> HostVerifier for Foreign<C, L>
where
    C: Fn(&[u8]) -> Result<Vec<u8>, u32>,
    L: Fn(&str),
{
    fn verify(&self, hash: HashFunction, spki: &[u8], signature: &[u8], text: &[u8]) -> Result<bool, String> {
        let answer = verdict((self.call)(&arguments(hash, spki, signature, text)));
        if let Err(why) = &answer {
            (self.log)(why);
        }
        answer
    }
}

/// Probes the host's crypto (Envoy only) and logs which backend verifies which algorithm:
/// the algorithms the host verifies right.
pub fn probe(host: &dyn Host) -> Vec<Alg> {
    let failure = RefCell::new(None::<String>);
    let quiet = Foreign::new(
        |arguments: &[u8]| host.call_foreign_function(VERIFY_SIGNATURE, arguments),
        |why: &str| {
            failure.borrow_mut().get_or_insert_with(|| why.to_string());
        },
    );
    let algorithms = host_crypto::probe(&quiet);
    let host_takes = [Alg::Es256, Alg::Rs256, Alg::Rs384, Alg::Rs512];
    let in_wasm: Vec<&str> = Alg::ALL.iter().filter(|a| !algorithms.contains(a)).map(|a| a.name()).collect();
    let message = if algorithms.is_empty() {
        let why = failure.into_inner().unwrap_or_else(|| "it answered a known-answer probe wrong".into());
        format!(
            "agentgate: signature backends: every algorithm in wasm; host crypto ({VERIFY_SIGNATURE}) not used: {why}"
        )
    } else {
        let missed: Vec<&str> = host_takes.iter().filter(|a| !algorithms.contains(a)).map(|a| a.name()).collect();
        let names: Vec<&str> = algorithms.iter().map(|a| a.name()).collect();
        let note = if missed.is_empty() { String::new() } else { format!(" ({} failed its probe)", missed.join(", ")) };
        format!(
            "agentgate: signature backends: host crypto ({VERIFY_SIGNATURE}) for {}; wasm for {}{note}",
            names.join(", "),
            in_wasm.join(", ")
        )
    };
    host.log(Level::Info, &message);
    algorithms
}

/// The log line of a request-time failure.
#[cfg_attr(not(any(target_arch = "wasm32", test)), allow(dead_code))]
pub fn refusal(why: &str) -> String {
    format!("agentgate: {why}: the token is refused (crypto_unavailable)")
}

/// Gives `gate` the host's crypto for `algorithms` (none: nothing changes).
pub fn attach(host: &dyn Host, gate: &Gate, algorithms: &[Alg]) {
    if !algorithms.is_empty() {
        gate.use_host_crypto(HostCrypto { verifier: host.signature_verifier(), algorithms: algorithms.to_vec() });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn arguments_are_the_protobuf_envoy_parses() {
        let bytes = arguments(HashFunction::Sha256, &[0x30, 0x01], &[7; 200], b"t");
        let mut expected = vec![0x0a, 6];
        expected.extend_from_slice(b"sha256");
        expected.extend_from_slice(&[0x12, 2, 0x30, 0x01, 0x1a, 0xc8, 0x01]);
        expected.extend_from_slice(&[7; 200]);
        expected.extend_from_slice(&[0x22, 1, b't']);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn results_parse_strictly_and_only_a_clean_yes_or_a_mismatch_is_a_verdict() {
        let error = |text: &str| [&[0x12, text.len() as u8][..], text.as_bytes()].concat();
        let mismatch = error("Failed to verify digest. Error code: 0");
        assert_eq!(verdict(Ok(vec![0x08, 0x01])), Ok(true));
        assert_eq!(verdict(Ok(vec![0x08, 0x01, 0x12, 0x00])), Ok(true));
        assert_eq!(verdict(Ok(mismatch)), Ok(false));
        // Envoy's other errors: the host could not answer.
        assert!(verdict(Ok(error("md5 is not supported."))).is_err());
        assert!(verdict(Ok(error("Failed to initialize digest verify."))).is_err());
        assert!(verdict(Ok(vec![])).is_err(), "false with no error is no verdict");
        assert!(verdict(Ok(vec![0x08, 0x01, 0x12, 0x01, b'x'])).is_err(), "a yes with an error");
        assert!(verdict(Ok(vec![0x08])).is_err(), "truncated");
        assert!(verdict(Ok(vec![0x0a, 0x01, 0x01])).is_err(), "result of the wrong type");
        assert!(verdict(Ok(vec![0x12, 0x05, b'x'])).is_err(), "error longer than the message");
        assert!(verdict(Ok(vec![0xff; 11])).is_err(), "an endless varint");
        assert!(verdict(Err(12)).is_err());
        assert_eq!(verdict(Ok(vec![0x18, 0x05, 0x22, 0x01, 0x00, 0x08, 0x01])), Ok(true), "unknown fields skipped");
    }
}
