//! The demo upstream: answers every request with 200 and a JSON echo of the request line and
//! headers it received, so tests and the demo can see exactly what Envoy forwarded.

use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::thread::JoinHandle;

pub struct Upstream {
    pub port: u16,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn start() -> Upstream {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind echo upstream"));
        let port = server.server_addr().to_ip().map(|a| a.port()).expect("echo upstream port");
        let serving = Arc::clone(&server);
        let thread = std::thread::spawn(move || {
            for request in serving.incoming_requests() {
                let mut headers = Map::new();
                for h in request.headers() {
                    let name = h.field.as_str().as_str().to_ascii_lowercase();
                    let value = Value::String(h.value.as_str().to_string());
                    match headers.get_mut(&name) {
                        Some(Value::Array(values)) => values.push(value),
                        Some(first) => *first = Value::Array(vec![first.clone(), value]),
                        None => {
                            headers.insert(name, value);
                        }
                    }
                }
                let body = json!({"method": request.method().as_str(), "path": request.url(), "headers": headers});
                let content_type =
                    tiny_http::Header::from_bytes("content-type", "application/json").expect("static header");
                let response = tiny_http::Response::from_string(body.to_string()).with_header(content_type);
                let _ = request.respond(response);
            }
        });
        Upstream { port, server, thread: Some(thread) }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
