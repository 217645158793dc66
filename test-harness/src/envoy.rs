//! A real Envoy (from the project's virtualenv) running the built filter: config rendered
//! from `envoy-config/demo.yaml`, ports chosen by the kernel (so tests run in parallel),
//! stopped when dropped.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The workspace root (this crate lives in `test-harness/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn path_from_env(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| workspace_root().join(default))
}

/// `AGENTGATE_ENVOY`, or the Envoy that `make` installs into `.venv/`.
pub fn envoy_binary() -> PathBuf {
    path_from_env("AGENTGATE_ENVOY", ".venv/bin/envoy")
}

/// `AGENTGATE_WASM`, or the filter that `make build` writes.
pub fn filter_wasm() -> PathBuf {
    path_from_env("AGENTGATE_WASM", "dist/agentgate.wasm")
}

/// `envoy-config/demo.yaml` with its `${...}` placeholders filled in. Without an identity
/// provider, its cluster points at the discard port.
pub fn render_config(policy: &str, upstream_port: u16, idp_port: Option<u16>) -> String {
    let template =
        std::fs::read_to_string(workspace_root().join("envoy-config/demo.yaml")).expect("read envoy-config/demo.yaml");
    template
        .replace("${AGENTGATE_WASM}", &filter_wasm().display().to_string())
        // A JSON string literal is a valid YAML double-quoted scalar.
        .replace("${AGENTGATE_POLICY}", &Value::String(policy.to_string()).to_string())
        .replace("${LISTEN_PORT}", "0")
        .replace("${ADMIN_PORT}", "0")
        .replace("${UPSTREAM_PORT}", &upstream_port.to_string())
        .replace("${IDP_PORT}", &idp_port.unwrap_or(9).to_string())
}

/// A fresh directory under the system's temporary directory.
pub fn scratch_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "agentgate-envoy-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn check_prerequisites() {
    for (path, hint) in [(envoy_binary(), "run `make venv`"), (filter_wasm(), "run `make build`")] {
        assert!(path.exists(), "{} is missing: {hint} (or use `make test`)", path.display());
    }
}

/// Result of `envoy --mode validate`: whether Envoy accepted the config, and what it printed.
pub fn validate(policy: &str) -> (bool, String) {
    check_prerequisites();
    let dir = scratch_dir();
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, render_config(policy, 9, None)).expect("write config");
    let out = Command::new(envoy_binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-l", "warning", "-c"])
        .arg(&config)
        .output()
        .expect("run envoy --mode validate");
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

pub struct Envoy {
    /// Behind a lock so that a test can kill an Envoy that other threads are using.
    child: std::sync::Mutex<Child>,
    dir: PathBuf,
    pub port: u16,
    pub admin_port: u16,
    agent: ureq::Agent,
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as JSON (the echo upstream's answer, or agentgate's error body).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// A header the upstream received, from the echo upstream's answer.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        match &self.json()["headers"][name] {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }
}

impl Envoy {
    /// Starts Envoy with `policy` in front of `upstream_port` and waits until it serves.
    pub fn start(policy: &str, upstream_port: u16) -> Result<Envoy, String> {
        Envoy::start_with_idp(policy, upstream_port, None)
    }

    /// Starts Envoy whose `idp` cluster reaches a test identity provider on `idp_port`.
    pub fn start_with_idp(policy: &str, upstream_port: u16, idp_port: Option<u16>) -> Result<Envoy, String> {
        Envoy::start_config(&render_config(policy, upstream_port, idp_port))
    }

    /// Starts Envoy with `workers` worker threads (each its own wasm VM; shared data between them).
    pub fn start_workers(policy: &str, upstream_port: u16, workers: u32) -> Result<Envoy, String> {
        Envoy::start_config_with(&render_config(policy, upstream_port, None), workers)
    }

    /// Starts Envoy on a complete config (YAML text) and waits until it serves; `port` is its
    /// first listener's.
    pub fn start_config(config_text: &str) -> Result<Envoy, String> {
        Envoy::start_config_with(config_text, 1)
    }

    /// Starts Envoy on a complete config (YAML text) with `workers` worker threads.
    pub fn start_config_with(config_text: &str, workers: u32) -> Result<Envoy, String> {
        check_prerequisites();
        let dir = scratch_dir();
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, config_text).map_err(|e| e.to_string())?;
        let admin_file = dir.join("admin-address");
        let log = std::fs::File::create(dir.join("envoy.log")).map_err(|e| e.to_string())?;
        let access_log = std::fs::File::create(dir.join("access.log")).map_err(|e| e.to_string())?;
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", &workers.to_string()])
            .args([
                "--disable-hot-restart",
                "-l",
                "warning",
                "--component-log-level",
                "wasm:info",
                // Access log files are flushed every 10 s by default.
                "--file-flush-interval-msec",
                "100",
            ])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .stdin(Stdio::null())
            // The access log (envoy-config/demo.yaml logs to stdout).
            .stdout(access_log)
            // Envoy's log on stderr is written at once (a --log-path file is flushed lazily).
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", envoy_binary().display()))?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut envoy = Envoy { child: std::sync::Mutex::new(child), dir, port: 0, admin_port: 0, agent };
        envoy.wait_ready(&admin_file)?;
        Ok(envoy)
    }

    fn wait_ready(&mut self, admin_file: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child().try_wait() {
                return Err(format!("envoy exited with {status}:\n{}", self.logs()));
            }
            let admin = std::fs::read_to_string(admin_file).unwrap_or_default();
            if let Some(port) = admin.trim().rsplit(':').next().and_then(|p| p.parse().ok()) {
                self.admin_port = port;
                let listeners = self.admin("/listeners?format=json");
                if let Some(port) = listener_port(&listeners.json()) {
                    if self.admin("/ready").status == 200 {
                        self.port = port;
                        return Ok(());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("envoy did not become ready:\n{}", self.logs()))
    }

    fn request(&self, url: &str, headers: &[(&str, &str)]) -> Response {
        let mut request = self.agent.get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        match request.call() {
            Ok(mut response) => Response {
                status: response.status().as_u16(),
                headers: response
                    .headers()
                    .iter()
                    .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                    .collect(),
                body: response.body_mut().read_to_string().unwrap_or_default(),
            },
            Err(e) => Response { status: 0, headers: Vec::new(), body: format!("request failed: {e}") },
        }
    }

    /// GET `path` through Envoy's listener.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.request(&format!("http://127.0.0.1:{}{path}", self.port), headers)
    }

    /// GET `path` through another of Envoy's listeners (see [`Envoy::listener_port`]).
    pub fn get_at(&self, port: u16, path: &str, headers: &[(&str, &str)]) -> Response {
        self.request(&format!("http://127.0.0.1:{port}{path}"), headers)
    }

    /// The port of the listener called `name`.
    pub fn listener_port(&self, name: &str) -> Option<u16> {
        let listeners = self.admin("/listeners?format=json").json();
        let statuses = listeners["listener_statuses"].as_array()?;
        let listener = statuses.iter().find(|l| l["name"] == name)?;
        listener_port(&serde_json::json!({"listener_statuses": [listener]}))
    }

    /// Sends `request` (raw HTTP/1.1, any bytes) to Envoy's listener; the status of the
    /// answer, 0 if there was none.
    pub fn raw(&self, request: &[u8]) -> u16 {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return 0 };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        if stream.write_all(request).is_err() {
            return 0;
        }
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        text.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
    }

    /// GET `path` on Envoy's admin interface.
    pub fn admin(&self, path: &str) -> Response {
        self.request(&format!("http://127.0.0.1:{}{path}", self.admin_port), &[])
    }

    /// Envoy's log so far, the filter's own log lines included.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// The filter's audit records logged so far, parsed.
    pub fn audit_records(&self) -> Vec<Value> {
        self.logs()
            .lines()
            .filter_map(|line| line.split_once("agentgate audit ").map(|(_, json)| json))
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect()
    }

    /// The access log lines written so far, parsed (one JSON object per request). Envoy
    /// flushes its access logs every 100 ms here: this waits up to 5 s for `count` lines.
    pub fn access_log(&self, count: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
            let lines: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
            if lines.len() >= count || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the Envoy process at once (SIGKILL: no draining, its memory is lost); its logs
    /// stay readable until the value is dropped.
    pub fn kill(&self) {
        let mut child = self.child();
        let _ = child.kill();
        let _ = child.wait();
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Envoy process's id (for reading its memory in /proc).
    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    /// Whether the Envoy process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child().try_wait(), Ok(None))
    }
}

fn listener_port(listeners: &Value) -> Option<u16> {
    let port = &listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"];
    port.as_u64().and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0)
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
