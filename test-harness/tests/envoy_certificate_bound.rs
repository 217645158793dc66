//! RFC 8705 certificate-bound tokens in the real Envoy: a TLS listener that asks for client
//! certificates (made here with Debian's openssl CLI), and a token whose `cnf["x5t#S256"]` is
//! the agent certificate's SHA-256. Envoy gives the filter `connection.
//! sha256_peer_certificate_digest` in hex; the token carries base64url: passing here shows the
//! filter reads Envoy's encoding right.

use agentgate_test_harness::envoy::{render_config, scratch_dir, Envoy};
use agentgate_test_harness::oidc_provider::node_script;
use agentgate_test_harness::tokens::{agent_claims, b64, policy, read_invoice_rule, Signer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl (Debian's openssl package) is needed: {e}"));
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A P-256 key and a certificate for `name` signed by the test CA (`ca.pem`, `ca.key`).
fn issue(dir: &Path, name: &str, extensions: &str) {
    let (key, csr, pem, ext) =
        (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
    std::fs::write(dir.join(&ext), extensions).expect("write extensions");
    let subject = format!("/CN={name}");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subject,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &pem,
            "-extfile",
            &ext,
        ],
    );
}

fn certificates() -> PathBuf {
    let dir = scratch_dir();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=agentgate test CA",
        ],
    );
    issue(&dir, "server", "subjectAltName=IP:127.0.0.1\n");
    issue(&dir, "agent", "extendedKeyUsage=clientAuth\n");
    issue(&dir, "thief", "extendedKeyUsage=clientAuth\n");
    dir
}

/// The certificate's SHA-256 over its DER, base64url: RFC 8705's `x5t#S256`.
fn x5t_s256(dir: &Path, name: &str) -> String {
    use sha2::Digest;
    let out = Command::new("openssl")
        .args(["x509", "-in", &format!("{name}.pem"), "-outform", "DER"])
        .current_dir(dir)
        .output()
        .expect("openssl x509");
    b64(&sha2::Sha256::digest(&out.stdout))
}

/// Envoy's demo config with TLS on the agents' listener: client certificates asked for and
/// checked against the test CA when sent, so that a request without one reaches the gate.
fn tls_config(policy: &str, upstream: u16, certs: &Path) -> String {
    let file = |name: &str| certs.join(name).display().to_string();
    let tls = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": false,
            "common_tls_context": {
                "tls_certificates": [{"certificate_chain": {"filename": file("server.pem")}, "private_key": {"filename": file("server.key")}}],
                "validation_context": {"trusted_ca": {"filename": file("ca.pem")}}
            }
        }
    });
    let config = render_config(policy, upstream, None);
    let from = "    filter_chains:\n    - filters:\n";
    assert!(config.contains(from), "envoy-config/demo.yaml changed shape");
    config.replacen(from, &format!("    filter_chains:\n    - transport_socket: {tls}\n      filters:\n"), 1)
}

fn get(envoy: &Envoy, certs: &Path, client: Option<&str>, token: &str) -> Value {
    let mut request = json!({
        "url": format!("https://127.0.0.1:{}/invoices/42", envoy.port),
        "ca": certs.join("ca.pem"),
        "headers": {"authorization": format!("Bearer {token}")},
    });
    if let Some(name) = client {
        request["cert"] = json!(certs.join(format!("{name}.pem")));
        request["key"] = json!(certs.join(format!("{name}.key")));
    }
    node_script("https-get.mjs", &request)
}

#[test]
fn a_certificate_bound_token_passes_only_with_its_client_certificate_in_envoy() {
    let certs = certificates();
    let issuer = Signer::es256("es-mtls", 31);
    let mut p: Value =
        serde_json::from_str(&policy(&issuer.jwks(), &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["providers"][0]["certificate_bound"] = json!(true);
    let upstream = agentgate_test_harness::upstream::Upstream::start();
    let envoy =
        Envoy::start_config(&tls_config(&p.to_string(), upstream.port, &certs)).unwrap_or_else(|e| panic!("{e}"));
    let now = agentgate_test_harness::tokens::now();
    let mut claims = agent_claims("agent-7", "invoices:read", now);
    claims["cnf"] = json!({"x5t#S256": x5t_s256(&certs, "agent")});
    let bound = issuer.sign(&claims);

    let ok = get(&envoy, &certs, Some("agent"), &bound);
    assert_eq!(ok["status"], 200, "{ok}\n{}", envoy.logs());
    for (client, detail) in [(None, "no_client_certificate"), (Some("thief"), "certificate_thumbprint_mismatch")] {
        let refused = get(&envoy, &certs, client, &bound);
        assert_eq!(refused["status"], 401, "{refused}");
        let challenge = refused["headers"]["www-authenticate"].as_str().unwrap_or_default();
        assert!(challenge.starts_with("Bearer error=\"invalid_token\""), "{challenge}");
        let record = envoy.audit_records().last().cloned().unwrap_or_default();
        assert_eq!((&record["reason"], &record["detail"]), (&json!("certificate_mismatch"), &json!(detail)));
    }
    // An unbound token needs no certificate; the thief's own certificate does not help a bound one.
    let plain = issuer.sign(&agent_claims("agent-8", "invoices:read", now));
    assert_eq!(get(&envoy, &certs, None, &plain)["status"], 200);
    let _ = std::fs::remove_dir_all(&certs);
}
