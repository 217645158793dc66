# workerd config of the key-rotation test (keys.test.mjs writes its own copy under target/
# with the policy and a port).
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "gate", worker = .keysWorker),
    (name = "internet", network = (allow = ["local"])),
  ],
  sockets = [(name = "http", address = "127.0.0.1:8788", http = (), service = "gate")],
);

const keysWorker :Workerd.Worker = (
  modules = [
    (name = "keys-worker.js", esModule = embed "keys-worker.js"),
    (name = "@agentgate/edge", esModule = embed "../../filters/edge-js/worker.js"),
    (name = "@agentgate/index.js", esModule = embed "../../filters/edge-js/index.js"),
    (name = "@agentgate/keys.js", esModule = embed "../../filters/edge-js/keys.js"),
    (name = "@agentgate/pkg/agentgate_edge.js", esModule = embed "../../filters/edge-js/pkg/agentgate_edge.js"),
    (name = "@agentgate/pkg/agentgate_edge_bg.wasm", wasm = embed "../../filters/edge-js/pkg/agentgate_edge_bg.wasm"),
  ],
  compatibilityDate = "2026-11-01",
  bindings = [(name = "POLICY", json = embed "policy.json")],
  globalOutbound = "internet",
);
