//! A fleet on loopback (docs/fleet.md, issue 21): one front Envoy with agentgate in
//! `front_tier` mode and a consistent hash on `x-agent-route`, three back-tier Envoys with the
//! full policy (delivered by ECDS from one watched file), the echo upstream behind them.
//!
//! - a single-use token replayed through the front is refused fleet-wide, and through the
//!   front's round-robin listener (the control: no affinity) it is not;
//! - an agent's rate limit holds at its rate through the front, and is 3× through round robin;
//! - a revocation written once reaches all three back instances, their memory kept;
//! - a back instance killed mid-run: requests keep being served, and what moved agents gain
//!   (one more use of a used token, one more burst) is measured.
//!
//! `fleet_short` runs in `make test` (a few seconds of requests); `make fleet` runs
//! `fleet_long` (more agents, sustained rates, the killed instance rejoining) and prints the
//! numbers (`--nocapture`).

use agentgate_test_harness::envoy::Response;
use agentgate_test_harness::fleet::{served_by, Fleet};
use agentgate_test_harness::tokens::{agent_claims, now, Signer, AUDIENCE, ISSUER};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BACKS: usize = 3;
/// The issuer whose tokens are single use (a second provider; the first one's are not).
const SINGLE_USE_ISSUER: &str = "https://single-use.example.com";
/// `/limited/{id}`: a burst of 5, refilled at 5 an hour (nothing refills during a run).
const BURST: usize = 5;
/// `/metered/{id}`: 20 a second, bursts of 20.
const METERED_PER_SECOND: usize = 20;
/// How long a pushed policy may take to reach every instance, generously (measured: printed).
const PROPAGATION_BOUND: Duration = Duration::from_secs(10);
/// How long the front may take to take a killed instance out of the ring (health checks every
/// 0.5 s; measured: printed).
const DETECTION_BOUND: Duration = Duration::from_secs(10);

struct Scale {
    name: &'static str,
    /// The front's consistent hash: RING_HASH or MAGLEV.
    lb: &'static str,
    /// Agents with a single-use token and an exhausted burst when an instance is killed.
    agents: usize,
    /// Replays of each single-use token through the front.
    replays: usize,
    /// Seconds of sustained requests on `/metered` through each listener (0: skipped).
    metered_seconds: u64,
    /// Load before and after the kill.
    load_before: Duration,
    load_after: Duration,
    /// Whether the killed instance rejoins and what that costs is measured too.
    rejoin: bool,
}

const SHORT: Scale = Scale {
    name: "short",
    lb: "RING_HASH",
    agents: 12,
    replays: 2,
    metered_seconds: 0,
    load_before: Duration::from_millis(300),
    load_after: Duration::from_millis(300),
    rejoin: false,
};

const LONG: Scale = Scale {
    name: "long",
    lb: "RING_HASH",
    agents: 90,
    replays: 5,
    metered_seconds: 10,
    load_before: Duration::from_secs(2),
    load_after: Duration::from_secs(3),
    rejoin: true,
};

/// The long run again on Maglev (the sustained rates once are enough).
const LONG_MAGLEV: Scale = Scale { name: "long, Maglev", lb: "MAGLEV", metered_seconds: 0, ..LONG };

fn signer() -> Signer {
    Signer::es256("es-1", 1)
}

fn back_policy(revoked: &[&str]) -> Value {
    let jwks = signer().jwks();
    let provider = |name: &str, issuer: &str| json!({"name": name, "issuer": issuer, "audiences": [AUDIENCE], "algorithms": ["ES256"], "jwks": jwks});
    let mut single_use = provider("single-use-idp", SINGLE_USE_ISSUER);
    single_use["single_use"] = json!(true);
    single_use["max_lifetime_seconds"] = json!(3600);
    let mut policy = json!({
        "mode": "enforce",
        "providers": [provider("corp-idp", ISSUER), single_use],
        "rules": [
            {"name": "read-invoice", "match": {"methods": ["GET"], "path": "/invoices/{id}"}},
            {"name": "limited", "match": {"methods": ["GET"], "path": "/limited/{id}"},
             "rate_limit": {"requests": BURST, "per_seconds": 3600}},
            {"name": "metered", "match": {"methods": ["GET"], "path": "/metered/{id}"},
             "rate_limit": {"requests": METERED_PER_SECOND, "per_seconds": 1}},
        ],
    });
    if !revoked.is_empty() {
        policy["revoked"] = json!({"subjects": revoked});
    }
    policy
}

fn front_policy() -> String {
    let mut policy = back_policy(&[]);
    policy["front_tier"] = json!({});
    policy.to_string()
}

fn start(lb: &str) -> Fleet {
    let started = Instant::now();
    let fleet =
        Fleet::start_with(BACKS, &back_policy(&[]).to_string(), &front_policy(), lb).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fleet.wait_healthy(BACKS, DETECTION_BOUND).map(|_| ()), Some(()), "the front sees the back tier");
    println!("fleet: 1 front ({lb}) + {BACKS} back Envoys up in {:.1} s", started.elapsed().as_secs_f64());
    fleet
}

/// A token of the plain provider (reusable) for `agent`.
fn token(agent: &str) -> String {
    let mut claims = agent_claims(agent, "", now());
    claims["jti"] = json!(format!("{agent}-plain"));
    format!("Bearer {}", signer().sign(&claims))
}

/// A single-use token for `agent`, `jti` unique to `label`.
fn single_use_token(agent: &str, label: &str) -> String {
    let mut claims = agent_claims(agent, "", now());
    claims["iss"] = json!(SINGLE_USE_ISSUER);
    claims["jti"] = json!(format!("{agent}-{label}"));
    format!("Bearer {}", signer().sign(&claims))
}

fn last_reason(fleet: &Fleet, instance: usize) -> Value {
    let records = fleet.back(instance).audit_records();
    records.last().map(|r| r["reason"].clone()).unwrap_or(Value::Null)
}

fn owner(r: &Response) -> usize {
    served_by(r).unwrap_or_else(|| panic!("no back instance answered: {} {}", r.status, r.body))
}

/// First use 200, every replay 401 `replayed` from the same instance; through round robin
/// the token is accepted once per instance.
fn single_use_is_fleet_wide(fleet: &Fleet, scale: &Scale) {
    let mut owners = BTreeMap::<usize, usize>::new();
    let (mut uses, mut replays_refused) = (0, 0);
    for i in 0..scale.agents.min(12) {
        let agent = format!("replay-agent-{i}");
        let token = single_use_token(&agent, "once");
        let first = fleet.get("/invoices/1", &[("authorization", &token)]);
        assert_eq!(first.status, 200, "first use: {}", first.body);
        assert_eq!(first.upstream_header("x-agent-id").as_deref(), Some(agent.as_str()));
        uses += 1;
        let home = owner(&first);
        *owners.entry(home).or_default() += 1;
        for _ in 0..scale.replays {
            let replay = fleet.get("/invoices/1", &[("authorization", &token)]);
            assert_eq!((replay.status, owner(&replay)), (401, home), "a replay of {agent}: {}", replay.body);
            assert_eq!(last_reason(fleet, home), "replayed");
            replays_refused += 1;
        }
    }
    println!(
        "fleet: single use through the front: {uses} first uses 200, {replays_refused} of {replays_refused} replays \
         401 replayed (agents per instance {owners:?})"
    );

    // The control: without affinity, each instance accepts the token once.
    let token = single_use_token("round-robin-agent", "once");
    let mut accepted = BTreeSet::new();
    let attempts = BACKS * 2;
    for _ in 0..attempts {
        let r = fleet.get_round_robin("/invoices/1", &[("authorization", &token)]);
        if r.status == 200 {
            accepted.insert(owner(&r));
        }
    }
    println!(
        "fleet: the same through round robin (no affinity): {} of {attempts} uses accepted, by instances {accepted:?}",
        accepted.len()
    );
    assert!(accepted.len() > 1, "round robin must let a replay through on another instance");
}

/// Counts 200s of `count` requests of `agent` on `path` through the front or round robin.
fn allowed(fleet: &Fleet, round_robin: bool, agent: &str, path: &str, count: usize) -> (usize, Vec<u16>) {
    let token = token(agent);
    let statuses: Vec<u16> = (0..count)
        .map(|_| {
            let headers = [("authorization", token.as_str())];
            if round_robin {
                fleet.get_round_robin(path, &headers).status
            } else {
                fleet.get(path, &headers).status
            }
        })
        .collect();
    (statuses.iter().filter(|&&s| s == 200).count(), statuses)
}

fn rate_limits_hold_fleet_wide(fleet: &Fleet, scale: &Scale) {
    let attempts = BURST * BACKS * 2;
    let (front, statuses) = allowed(fleet, false, "rate-agent", "/limited/1", attempts);
    assert_eq!(front, BURST, "the burst through the front: {statuses:?}");
    assert!(statuses.iter().skip(BURST).all(|&s| s == 429), "{statuses:?}");
    let probe = fleet.get("/limited/1", &[("authorization", &token("rate-agent"))]);
    assert_eq!(last_reason(fleet, owner(&probe)), "rate_limited");
    let (round_robin, _) = allowed(fleet, true, "rate-agent-rr", "/limited/1", attempts);
    println!(
        "fleet: rate limit of a burst of {BURST}: through the front {front} of {attempts} allowed, through round \
         robin {round_robin} of {attempts} ({}x)",
        round_robin / BURST
    );
    assert_eq!(round_robin, BURST * BACKS, "round robin gives each instance's bucket");

    if scale.metered_seconds == 0 {
        return;
    }
    // Sustained: as fast as one client goes for a while; a token bucket of rate r and burst b
    // allows at most b + r·t in t seconds, whichever instance counts.
    for round_robin in [false, true] {
        let agent = if round_robin { "metered-agent-rr" } else { "metered-agent" };
        let token = token(agent);
        let start = Instant::now();
        let (mut sent, mut ok) = (0usize, 0usize);
        while start.elapsed() < Duration::from_secs(scale.metered_seconds) {
            let headers = [("authorization", token.as_str())];
            let r = if round_robin {
                fleet.get_round_robin("/metered/1", &headers)
            } else {
                fleet.get("/metered/1", &headers)
            };
            sent += 1;
            ok += usize::from(r.status == 200);
        }
        let seconds = start.elapsed().as_secs_f64();
        // The gate counts time in whole seconds: t seconds of requests span at most
        // floor(t) + 1 refills.
        let one_bucket = (METERED_PER_SECOND * (2 + seconds.floor() as usize)) as f64;
        println!(
            "fleet: sustained {} for {seconds:.1} s: {sent} sent ({:.0}/s), {ok} allowed = {:.1}/s (configured \
             {METERED_PER_SECOND}/s; one bucket allows at most {one_bucket:.0})",
            if round_robin { "round robin" } else { "through the front" },
            sent as f64 / seconds,
            ok as f64 / seconds
        );
        if round_robin {
            assert!(ok as f64 > one_bucket, "round robin gets more than one bucket");
        } else {
            assert!(ok as f64 <= one_bucket, "the front holds the rate: {ok}");
        }
    }
}

/// Pushes a revocation once (the file every back instance watches) and times its arrival on
/// each instance, asked directly. Their memory stays: a used token is still `replayed`.
fn revocation_reaches_every_instance(fleet: &mut Fleet) {
    let revoked = "revoked-agent";
    let token = token(revoked);
    let used = single_use_token("kept-agent", "kept");
    let first = fleet.get("/invoices/1", &[("authorization", &used)]);
    assert_eq!(first.status, 200);
    let (_, limited) = allowed(fleet, false, "kept-rate-agent", "/limited/1", BURST + 1);
    assert_eq!(limited.last(), Some(&429));
    for i in 0..BACKS {
        let back = fleet.back(i);
        let r = back.get("/invoices/1", &[("authorization", &token)]);
        assert_eq!(r.status, 200, "before the push, instance {i}: {}", r.body);
    }
    let pushed = fleet.push_policy(&back_policy(&[revoked]).to_string());
    let mut arrived = Vec::new();
    for i in 0..BACKS {
        let back = fleet.back(i);
        loop {
            let r = back.get("/invoices/1", &[("authorization", &token)]);
            if r.status == 403 {
                arrived.push(pushed.elapsed());
                break;
            }
            assert_eq!(r.status, 200, "{}", r.body);
            assert!(pushed.elapsed() < PROPAGATION_BOUND, "instance {i} still allows the revoked agent");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(last_reason(fleet, i), "revoked");
    }
    let through_front = fleet.get("/invoices/1", &[("authorization", &token)]);
    assert_eq!(through_front.status, 403);
    let replay = fleet.get("/invoices/1", &[("authorization", &used)]);
    assert_eq!(replay.status, 401, "single-use memory survives the update: {}", replay.body);
    let (after, _) = allowed(fleet, false, "kept-rate-agent", "/limited/1", 1);
    assert_eq!(after, 0, "rate-limit memory survives the update");
    let ms: Vec<String> = arrived.iter().map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0)).collect();
    println!(
        "fleet: a revocation written once (filesystem ECDS, one watched file) refused on all {BACKS} instances \
         after {} (bound {} s); used tokens and empty buckets remembered across it",
        ms.join(", "),
        PROPAGATION_BOUND.as_secs()
    );
}

#[derive(Default)]
struct Load {
    /// (seconds since the load began, agent, status, instance)
    results: Vec<(f64, usize, u16, Option<usize>)>,
}

/// Kills the instance owning most agents mid-run; measures what keeps being served and what
/// the moved agents gain.
fn kill_one_instance(fleet: &mut Fleet, scale: &Scale) {
    let agents: Vec<String> = (0..scale.agents).map(|i| format!("agent-{i}")).collect();
    let mut home = Vec::new();
    let mut tokens = Vec::new();
    let mut seen = BTreeSet::new();
    for (a, agent) in agents.iter().enumerate() {
        let t = single_use_token(agent, "before-kill");
        let r = fleet.get("/invoices/1", &[("authorization", &t)]);
        assert_eq!(r.status, 200, "{}", r.body);
        home.push(owner(&r));
        seen.insert((a, owner(&r)));
        tokens.push(t);
        let (ok, statuses) = allowed(fleet, false, agent, "/limited/1", BURST + 1);
        assert_eq!(ok, BURST, "{statuses:?}");
    }
    let mut per_instance = [0usize; BACKS];
    for &h in &home {
        per_instance[h] += 1;
    }
    let victim = (0..BACKS).max_by_key(|&i| per_instance[i]).unwrap_or(0);

    // Load from two clients over all agents (plain tokens: no state touched), the kill in the
    // middle.
    let clients = 2;
    let load = Mutex::new(Load::default());
    let stop = AtomicBool::new(false);
    let plain: Vec<String> = agents.iter().map(|a| token(a)).collect();
    let began = Instant::now();
    let (killed_at, detected) = std::thread::scope(|scope| {
        for c in 0..clients {
            let (load, stop, plain, fleet) = (&load, &stop, &plain, &*fleet);
            scope.spawn(move || {
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let agent = i % plain.len();
                    let r = fleet.get("/invoices/1", &[("authorization", &plain[agent])]);
                    let entry = (began.elapsed().as_secs_f64(), agent, r.status, served_by(&r));
                    load.lock().unwrap_or_else(|e| e.into_inner()).results.push(entry);
                    i += clients;
                }
            });
        }
        std::thread::sleep(scale.load_before);
        let killed_at = began.elapsed().as_secs_f64();
        fleet.kill(victim);
        let detected = fleet.wait_healthy(BACKS - 1, DETECTION_BOUND);
        std::thread::sleep(scale.load_after);
        stop.store(true, Ordering::Relaxed);
        (killed_at, detected)
    });
    let detected = detected.unwrap_or_else(|| panic!("the front still routes to the killed instance"));
    let results = load.into_inner().unwrap_or_else(|e| e.into_inner()).results;
    let detected_at = killed_at + detected.as_secs_f64();

    // Served throughout: only requests in flight at the kill may fail (the front retries the
    // next instance on the ring on a refused connection or a reset).
    let failed: Vec<_> = results.iter().filter(|r| r.2 != 200).collect();
    let after_kill: Vec<_> = results.iter().filter(|r| r.0 > killed_at).collect();
    let victim_agents: BTreeSet<usize> = (0..agents.len()).filter(|&a| home[a] == victim).collect();
    let served_late_by_victim = after_kill.iter().filter(|r| r.3 == Some(victim) && r.0 > detected_at).count();
    // Who served the victim's agents between the kill and the ring's rebuild (retries), and
    // after it.
    let mut interim: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for r in after_kill.iter().filter(|r| victim_agents.contains(&r.1) && r.2 == 200) {
        if let Some(i) = r.3 {
            interim.entry(r.1).or_default().insert(i);
        }
    }
    let two_owners = interim.values().filter(|s| s.len() > 1).count();
    println!(
        "fleet: kill -9 of instance {victim} (home of {} of {} agents) {killed_at:.2} s into {} requests \
         from {clients} clients: {} failed ({:?}), {} after the kill all served by the others; the front's \
         health checks took it out after {:.0} ms; {two_owners} of its agents were served by two instances in \
         between (a retry goes to another instance, not always the new owner)",
        victim_agents.len(),
        agents.len(),
        results.len(),
        failed.len(),
        failed.iter().map(|r| r.2).collect::<Vec<_>>(),
        after_kill.len(),
        detected.as_secs_f64() * 1000.0,
    );
    assert!(failed.len() <= clients, "only requests in flight at the kill may fail: {failed:?}");
    assert_eq!(served_late_by_victim, 0);
    assert!(after_kill.iter().any(|r| r.0 > detected_at && victim_agents.contains(&r.1) && r.2 == 200));

    // What the moved agents gain: their single-use token once more, and one more burst. The
    // killed instance's memory is gone.
    seen.retain(|&(_, i)| i != victim);
    let (moved, after) = replay_everywhere(fleet, &agents, &tokens, &mut seen);
    let from_victim = moved.iter().filter(|&&a| home[a] == victim).count();
    assert_eq!(from_victim, victim_agents.len(), "every agent of the killed instance moved");
    assert!(moved.iter().all(|&a| after[a] != home[a]), "only agents on another instance gain");
    println!(
        "fleet: after the kill {} of {} agents moved: {from_victim} from the killed instance, {} between the \
         survivors ({} rebuilt over two instances); each moved agent's used token was accepted \
         once more and then refused, and it got exactly one more burst of {BURST}; the {} others: nothing",
        moved.len(),
        agents.len(),
        moved.len() - from_victim,
        scale.lb,
        agents.len() - moved.len()
    );

    if scale.rejoin {
        let started = Instant::now();
        fleet.restart(victim).unwrap_or_else(|e| panic!("{e}"));
        let restarted = started.elapsed();
        let rejoined = fleet.wait_healthy(BACKS, DETECTION_BOUND);
        assert!(rejoined.is_some(), "the instance rejoins");
        let (again, now_at) = replay_everywhere(fleet, &agents, &tokens, &mut seen);
        let back_home = (0..agents.len()).filter(|&a| now_at[a] == home[a]).count();
        println!(
            "fleet: instance {victim} rejoined (restarted on its ports with empty memory in {:.1} s, healthy in the \
             front {:.0} ms later): {back_home} of {} agents are on their first instance again; {} gained once more \
             (those of the empty instance), those back on a survivor nothing (it still remembers)",
            restarted.as_secs_f64(),
            rejoined.unwrap_or_default().as_secs_f64() * 1000.0,
            agents.len(),
            again.len(),
        );
        assert_eq!(back_home, agents.len(), "the ring is the old one again");
        assert_eq!(again.len(), victim_agents.len());
    }
}

/// Replays every agent's used single-use token and spends its `/limited` bucket through the
/// front. Each instance remembers what it saw (`seen`: agent, instance): on an instance that
/// has not seen the agent, the token is accepted once more (then `replayed`) and a fresh
/// burst is allowed; on one that has, neither. Returns the agents that gained, and where each
/// agent is now.
fn replay_everywhere(
    fleet: &Fleet,
    agents: &[String],
    tokens: &[String],
    seen: &mut BTreeSet<(usize, usize)>,
) -> (Vec<usize>, Vec<usize>) {
    let mut gained = Vec::new();
    let mut at = Vec::new();
    for (a, agent) in agents.iter().enumerate() {
        let first = fleet.get("/invoices/1", &[("authorization", &tokens[a])]);
        let now_at = owner(&first);
        let second = fleet.get("/invoices/1", &[("authorization", &tokens[a])]);
        assert_eq!(owner(&second), now_at, "{agent} stays put");
        assert_eq!(last_reason(fleet, now_at), "replayed");
        let (burst, statuses) = allowed(fleet, false, agent, "/limited/1", BURST + 1);
        let fresh = seen.insert((a, now_at));
        let expected = if fresh { (200, 401, BURST) } else { (401, 401, 0) };
        assert_eq!(
            (first.status, second.status, burst),
            expected,
            "{agent} on instance {now_at}, which has {}seen it: {statuses:?}",
            if fresh { "not " } else { "" }
        );
        if fresh {
            gained.push(a);
        }
        at.push(now_at);
    }
    (gained, at)
}

fn run(scale: &Scale) {
    let started = Instant::now();
    println!("fleet: the {} run", scale.name);
    let mut fleet = start(scale.lb);
    single_use_is_fleet_wide(&fleet, scale);
    rate_limits_hold_fleet_wide(&fleet, scale);
    revocation_reaches_every_instance(&mut fleet);
    kill_one_instance(&mut fleet, scale);
    println!("fleet: {} run took {:.1} s", scale.name, started.elapsed().as_secs_f64());
}

#[test]
fn fleet_short() {
    run(&SHORT);
}

#[test]
#[ignore = "the long simulation: `make fleet`"]
fn fleet_long() {
    run(&LONG);
    run(&LONG_MAGLEV);
}
