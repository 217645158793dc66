//! A real OAuth authorization server for the tests: npm `oidc-provider` run by Node on
//! loopback (`test-harness/idp-node/idp.mjs`), and agent clients that get tokens from it, with
//! DPoP proofs made by npm `dpop` (`client.mjs`). `make idp-node` installs both into
//! `test-harness/idp-node/node_modules`.

use crate::envoy::workspace_root;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The resource server the provider issues agent tokens for (the policy's audience).
pub const RESOURCE: &str = "https://api.example.com";
/// Another resource server of the same provider: its tokens are genuine but not for us.
pub const OTHER_RESOURCE: &str = "https://other.example.com";
/// A client that gets bearer tokens, and one that may only get DPoP-bound tokens.
pub const AGENT: (&str, &str) = ("billing-agent", "billing-agent-secret");
pub const DPOP_AGENT: (&str, &str) = ("dpop-agent", "dpop-agent-secret");

pub fn node_dir() -> PathBuf {
    workspace_root().join("test-harness/idp-node")
}

/// Runs `script` of `test-harness/idp-node` with `request` (JSON) as its argument; its one
/// line of JSON output.
pub fn node_script(script: &str, request: &Value) -> Value {
    let out = Command::new("node")
        .arg(script)
        .arg(request.to_string())
        .current_dir(node_dir())
        .output()
        .unwrap_or_else(|e| panic!("run node {script} (Node 20 is needed): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|_| panic!("{script} failed: {stdout}{}", String::from_utf8_lossy(&out.stderr)))
}

fn check_installed() {
    let module = node_dir().join("node_modules/oidc-provider");
    assert!(module.exists(), "{} is missing: run `make idp-node` (or use `make test`)", module.display());
}

/// A running oidc-provider; stopped when dropped.
pub struct OidcProvider {
    child: Child,
    // Held open: the server exits when its stdin closes, even if this process dies.
    _stdin: Option<ChildStdin>,
    pub issuer: String,
    pub port: u16,
    stderr_path: PathBuf,
}

impl OidcProvider {
    pub fn start() -> OidcProvider {
        check_installed();
        let stderr_path =
            std::env::temp_dir().join(format!("agentgate-oidc-provider-{}-{}.log", std::process::id(), unique()));
        let stderr = std::fs::File::create(&stderr_path).expect("create the provider's log");
        let mut child = Command::new("node")
            .arg("idp.mjs")
            .current_dir(node_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start node idp.mjs (Node 20 is needed)");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let line = receiver.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let ready: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let (Some(issuer), Some(port)) = (ready["issuer"].as_str(), ready["port"].as_u64()) else {
            let _ = child.kill();
            let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            panic!("oidc-provider did not start (said {line:?}):\n{log}");
        };
        let stdin = child.stdin.take();
        OidcProvider {
            child,
            _stdin: stdin,
            issuer: issuer.to_string(),
            port: u16::try_from(port).expect("port"),
            stderr_path,
        }
    }

    /// What the provider logged on stderr (its warnings and grant errors).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Runs the agent client (`client.mjs`) with `request` (client, resource, scope,
    /// authorization_details, dpop, proofs; see the script) against this provider, and
    /// returns its answer: `status`, the token endpoint's `token` answer, `jkt` and `proofs`.
    pub fn client(&self, request: &Value) -> Value {
        let mut request = request.clone();
        request["issuer"] = json!(self.issuer);
        let out = Command::new("node")
            .arg("client.mjs")
            .arg(request.to_string())
            .current_dir(node_dir())
            .output()
            .expect("run node client.mjs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
            panic!(
                "client.mjs failed: {stdout}{}\nprovider log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            )
        })
    }

    /// A bearer access token for `client` (id, secret), from the client credentials grant;
    /// panics with the provider's answer if there is none.
    pub fn token(&self, client: (&str, &str), resource: &str, scope: &str, details: Option<Value>) -> String {
        let mut request =
            json!({"client_id": client.0, "client_secret": client.1, "resource": resource, "scope": scope});
        if let Some(details) = details {
            request["authorization_details"] = details;
        }
        let answer = self.client(&request);
        match answer["token"]["access_token"].as_str() {
            Some(token) if answer["status"] == 200 => token.to_string(),
            _ => panic!("no token from oidc-provider: {answer}\n{}", self.logs()),
        }
    }
}

fn unique() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// The decoded JSON of a compact JWS's header and payload, unverified (to read what a real
/// implementation put there).
pub fn peek(jws: &str) -> (Value, Value) {
    use base64ct::{Base64UrlUnpadded, Encoding};
    let mut parts = jws.split('.');
    let mut next = || {
        let bytes = Base64UrlUnpadded::decode_vec(parts.next().unwrap_or_default()).unwrap_or_default();
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    let header = next();
    (header, next())
}
