//! A test identity provider's key endpoint on loopback, whose behaviour the test changes
//! while Envoy runs: serve a JWKS (and rotate it), fail, serve garbage, or answer slowly.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How the endpoint answers the next requests.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// 200 with this JWKS.
    Serve(String),
    /// This status, empty body.
    Fail(u16),
    /// 200 with a body that is no JWKS.
    Garbage,
    /// This JWKS, after this delay.
    Slow(Duration, String),
}

pub struct Idp {
    pub port: u16,
    behaviour: Arc<Mutex<Behaviour>>,
    requests: Arc<AtomicUsize>,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl Idp {
    pub fn start(behaviour: Behaviour) -> Idp {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind test IdP"));
        let port = server.server_addr().to_ip().map(|a| a.port()).expect("test IdP port");
        let behaviour = Arc::new(Mutex::new(behaviour));
        let requests = Arc::new(AtomicUsize::new(0));
        let (serving, current, count) = (Arc::clone(&server), Arc::clone(&behaviour), Arc::clone(&requests));
        let thread = std::thread::spawn(move || {
            for request in serving.incoming_requests() {
                count.fetch_add(1, Ordering::SeqCst);
                let now = current.lock().map(|b| b.clone()).unwrap_or(Behaviour::Fail(500));
                // Each answer on its own thread: a slow one must not hold the others.
                std::thread::spawn(move || {
                    let response = match now {
                        Behaviour::Serve(jwks) => tiny_http::Response::from_string(jwks),
                        Behaviour::Fail(status) => tiny_http::Response::from_string("").with_status_code(status),
                        Behaviour::Garbage => tiny_http::Response::from_string("<html>login required</html>"),
                        Behaviour::Slow(delay, jwks) => {
                            std::thread::sleep(delay);
                            tiny_http::Response::from_string(jwks)
                        }
                    };
                    let _ = request.respond(response);
                });
            }
        });
        Idp { port, behaviour, requests, server, thread: Some(thread) }
    }

    pub fn set(&self, behaviour: Behaviour) {
        if let Ok(mut current) = self.behaviour.lock() {
            *current = behaviour;
        }
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
