//! A fleet of agentgate Envoys on loopback (docs/fleet.md): one front Envoy (agentgate in
//! `front_tier` mode, a consistent hash on `x-agent-route` over the back tier, and beside it a
//! plain round-robin listener as the control) and N back-tier Envoys running the full policy,
//! delivered by ECDS from one watched file, in front of the echo upstream. Configs are rendered
//! from `envoy-config/fleet-*.yaml`; every process is stopped when the fleet is dropped.

use crate::envoy::{filter_wasm, scratch_dir, workspace_root, Envoy, Response};
use crate::upstream::Upstream;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The `server` header of back instance `i`: every answer says which instance gave it.
pub fn instance_name(i: usize) -> String {
    format!("agentgate-back-{i}")
}

pub fn render(template: &str, values: &[(&str, String)]) -> String {
    let path = workspace_root().join("envoy-config").join(template);
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for (name, value) in values {
        text = text.replace(&format!("${{{name}}}"), value);
    }
    text
}

/// A JSON string literal is a valid YAML double-quoted scalar.
pub fn yaml_string(text: &str) -> String {
    Value::String(text.to_string()).to_string()
}

pub struct Fleet {
    backs: Vec<Envoy>,
    /// The listener and admin ports of each back instance, kept for a restart on the same ports.
    back_ports: Vec<(u16, u16)>,
    pub front: Envoy,
    /// The front's round-robin listener (no affinity, no agentgate): the control.
    pub round_robin_port: u16,
    filter_dir: PathBuf,
    version: u32,
    upstream: Upstream,
}

impl Fleet {
    /// Starts `size` back instances on `back_policy` (in parallel), then the front on
    /// `front_policy` (which should hold `"front_tier": {}`).
    pub fn start(size: usize, back_policy: &str, front_policy: &str) -> Result<Fleet, String> {
        Fleet::start_with(size, back_policy, front_policy, "RING_HASH")
    }

    /// [`Fleet::start`] with the front's consistent hash `lb_policy`: `RING_HASH` or `MAGLEV`.
    pub fn start_with(size: usize, back_policy: &str, front_policy: &str, lb_policy: &str) -> Result<Fleet, String> {
        let upstream = Upstream::start();
        let filter_dir = scratch_dir();
        write_filter_config(&filter_dir, 1, back_policy);
        let starts: Vec<_> = (0..size)
            .map(|i| {
                let config = back_config(i, 0, 0, upstream.port, &filter_dir);
                std::thread::spawn(move || Envoy::start_config(&config))
            })
            .collect();
        let mut backs = Vec::new();
        let mut failure = None;
        for start in starts {
            match start.join() {
                Ok(Ok(back)) => backs.push(back),
                Ok(Err(e)) => failure = Some(e),
                Err(_) => failure = Some("a back instance's start panicked".to_string()),
            }
        }
        if let Some(e) = failure {
            let _ = std::fs::remove_dir_all(&filter_dir);
            return Err(e);
        }
        let back_ports: Vec<(u16, u16)> = backs.iter().map(|b| (b.port, b.admin_port)).collect();
        let front = Envoy::start_config(&front_config(front_policy, &back_ports, lb_policy)).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&filter_dir);
        })?;
        let round_robin_port = front.listener_port("round_robin").ok_or("the front has no round_robin listener")?;
        Ok(Fleet { backs, back_ports, front, round_robin_port, filter_dir, version: 1, upstream })
    }

    /// Pushes a new policy to every back instance: written once, into the file they all
    /// watch. Returns the moment of the rename.
    pub fn push_policy(&mut self, policy: &str) -> Instant {
        self.version += 1;
        write_filter_config(&self.filter_dir, self.version, policy);
        Instant::now()
    }

    pub fn size(&self) -> usize {
        self.back_ports.len()
    }

    /// Back instance `i` (a killed one still has its logs).
    pub fn back(&self, i: usize) -> &Envoy {
        &self.backs[i]
    }

    /// GET through the front (agent affinity).
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.front.get(path, headers)
    }

    /// GET through the front's round-robin listener (no affinity).
    pub fn get_round_robin(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.front.get_at(self.round_robin_port, path, headers)
    }

    /// Kills back instance `i` (SIGKILL: its memory is gone). Its logs stay readable.
    pub fn kill(&self, i: usize) {
        if let Some(back) = self.backs.get(i) {
            back.kill();
        }
    }

    /// Starts back instance `i` again, on its old ports, with empty memory.
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        let (port, admin_port) = *self.back_ports.get(i).ok_or("no such instance")?;
        self.kill(i);
        let back = Envoy::start_config(&back_config(i, port, admin_port, self.upstream.port, &self.filter_dir))?;
        if let Some(slot) = self.backs.get_mut(i) {
            *slot = back;
        }
        Ok(())
    }

    /// How many back instances the front's consistent-hash cluster holds healthy, from the
    /// front's admin interface.
    pub fn healthy_backs(&self) -> usize {
        let clusters = self.front.admin("/clusters?format=json").json();
        let Some(statuses) = clusters["cluster_statuses"].as_array() else { return 0 };
        let Some(back_tier) = statuses.iter().find(|c| c["name"] == "back_tier") else { return 0 };
        back_tier["host_statuses"].as_array().map_or(0, |hosts| {
            hosts
                .iter()
                .filter(|h| {
                    h["health_status"]["eds_health_status"] == "HEALTHY"
                        && h["health_status"]["failed_active_health_check"] != true
                })
                .count()
        })
    }

    /// Waits until the front holds `count` healthy back instances; how long that took.
    pub fn wait_healthy(&self, count: usize, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < within {
            if self.healthy_backs() == count {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Which back instance gave `response` (its `server` header), if one did.
pub fn served_by(response: &Response) -> Option<usize> {
    response.header("server")?.strip_prefix("agentgate-back-")?.parse().ok()
}

fn front_config(policy: &str, backs: &[(u16, u16)], lb_policy: &str) -> String {
    let endpoints: Vec<Value> = backs
        .iter()
        .map(|(port, admin_port)| {
            json!({"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "health_check_config": {"port_value": admin_port},
            }})
        })
        .collect();
    render(
        "fleet-front.yaml",
        &[
            ("AGENTGATE_WASM", filter_wasm().display().to_string()),
            ("AGENTGATE_POLICY", yaml_string(policy)),
            ("LISTEN_PORT", "0".to_string()),
            ("ROUND_ROBIN_PORT", "0".to_string()),
            ("ADMIN_PORT", "0".to_string()),
            ("BACK_ENDPOINTS", Value::Array(endpoints).to_string()),
            ("LB_POLICY", lb_policy.to_string()),
        ],
    )
}

pub const FILTER_FILE: &str = "agentgate.yaml";

fn back_config(i: usize, port: u16, admin_port: u16, upstream_port: u16, filter_dir: &Path) -> String {
    render(
        "fleet-back.yaml",
        &[
            ("INSTANCE", instance_name(i)),
            ("LISTEN_PORT", port.to_string()),
            ("ADMIN_PORT", admin_port.to_string()),
            ("UPSTREAM_PORT", upstream_port.to_string()),
            ("FILTER_CONFIG", filter_dir.join(FILTER_FILE).display().to_string()),
            ("FILTER_CONFIG_DIR", filter_dir.display().to_string()),
        ],
    )
}

/// Writes the back tier's policy once, into the file every back instance watches: written
/// beside it, then renamed over it (Envoy's filesystem xDS reacts to the rename).
pub fn write_filter_config(dir: &Path, version: u32, policy: &str) {
    let text = render(
        "fleet-filter.yaml",
        &[
            ("AGENTGATE_WASM", filter_wasm().display().to_string()),
            ("AGENTGATE_POLICY", yaml_string(policy)),
            ("VERSION", version.to_string()),
        ],
    );
    let staged = dir.join(".agentgate.yaml.next");
    std::fs::write(&staged, text).expect("write the filter configuration");
    std::fs::rename(&staged, dir.join(FILTER_FILE)).expect("rename the filter configuration");
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.filter_dir);
    }
}
