//! Operating the relay: many relays in one process from YAML, SIGHUP reloads, Prometheus metrics
//! agreeing with INFO, and the deploy files checked against a live scrape.

mod common;

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// `redis-relay --config FILE` as a child process, killed on drop.
struct ConfiguredRelays {
    child: Child,
    config_path: PathBuf,
    stderr_path: PathBuf,
    _work: tempfile::TempDir,
}

impl ConfiguredRelays {
    fn start(yaml: &str) -> ConfiguredRelays {
        ConfiguredRelays::start_with(yaml, &[])
    }

    fn start_with(yaml: &str, args: &[&str]) -> ConfiguredRelays {
        let work = tempfile::tempdir().expect("temp dir");
        let config_path = work.path().join("relay.yaml");
        std::fs::write(&config_path, yaml).expect("write config");
        let stderr_path = work.path().join("relay.stderr");
        let stderr = OpenOptions::new().create(true).append(true).open(&stderr_path).expect("stderr file");
        let child = Command::new(relay_bin())
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn redis-relay");
        ConfiguredRelays { child, config_path, stderr_path, _work: work }
    }

    fn rewrite(&self, yaml: &str) {
        std::fs::write(&self.config_path, yaml).expect("rewrite config");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} failed");
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for ConfiguredRelays {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- redis-relay stderr ---\n{}", self.stderr());
        }
    }
}

fn relay_entry(name: &str, master: &RedisServer, listen: u16) -> String {
    format!("  - {{name: {name}, upstream: {{addr: '127.0.0.1:{}'}}, listen: '127.0.0.1:{listen}'}}\n", master.port())
}

fn config_yaml(data_dir: &Path, metrics: Option<u16>, entries: &[String]) -> String {
    let mut yaml = format!("data_dir: '{}'\ndefaults: {{log_size: 64mb, log_memory: 8mb}}\n", data_dir.display());
    if let Some(port) = metrics {
        yaml.push_str(&format!("metrics: {{listen: '127.0.0.1:{port}'}}\n"));
    }
    yaml.push_str("relays:\n");
    for entry in entries {
        yaml.push_str(entry);
    }
    yaml
}

fn info_of(port: u16, section: &str) -> String {
    connect(port, None, None)
        .and_then(|mut con| redis::cmd("INFO").arg(section).query::<String>(&mut con))
        .unwrap_or_default()
}

fn field(port: u16, section: &str, name: &str) -> Option<String> {
    parse_info_field(&info_of(port, section), name)
}

fn wait_relay_up(port: u16) {
    wait_until(SYNC_TIMEOUT, &format!("relay on {port} has master_link_status:up"), || {
        field(port, "replication", "master_link_status").as_deref() == Some("up")
    });
}

fn write_keys(master: &RedisServer, prefix: &str, count: usize) {
    let mut con = master.conn();
    for i in 0..count {
        let _: () = redis::cmd("SET").arg(format!("{prefix}:{i}")).arg(value_of(i as u64, 64)).query(&mut con).unwrap();
    }
}

fn wait_digest_equal(master: &RedisServer, replica: &RedisServer) {
    wait_until(SYNC_TIMEOUT, "replica digest equals the master's", || master.digest() == replica.digest());
}

fn metric_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect()
}

#[test]
fn two_relays_in_one_process_are_isolated() {
    let master_a = RedisServer::start(&[]);
    let master_b = RedisServer::start(&[]);
    let (port_a, port_b) = (free_port(), free_port());
    let work = tempfile::tempdir().unwrap();
    let relays = ConfiguredRelays::start(&config_yaml(
        &work.path().join("data"),
        None,
        &[relay_entry("a", &master_a, port_a), relay_entry("b", &master_b, port_b)],
    ));
    wait_relay_up(port_a);
    wait_relay_up(port_b);
    let replica_a = RedisServer::start(&["--replicaof", "127.0.0.1", &port_a.to_string()]);
    let replica_b = RedisServer::start(&["--replicaof", "127.0.0.1", &port_b.to_string()]);
    write_keys(&master_a, "a", 500);
    write_keys(&master_b, "b", 500);
    wait_digest_equal(&master_a, &replica_a);
    wait_digest_equal(&master_b, &replica_b);
    assert_ne!(master_a.digest(), master_b.digest(), "the two shards hold different data");

    // Stopping one master leaves the other shard fully working.
    drop(master_a);
    wait_until(SYNC_TIMEOUT, "relay a sees its master down", || {
        field(port_a, "replication", "master_link_status").as_deref() == Some("down")
    });
    write_keys(&master_b, "b2", 300);
    wait_digest_equal(&master_b, &replica_b);
    assert_eq!(field(port_b, "replication", "master_link_status").as_deref(), Some("up"));
    assert_eq!(field(port_b, "relay", "upstream_reconnects").as_deref(), Some("0"));
    assert!(relays.stderr().contains("relay=a"), "logs carry the relay name");
}

#[test]
fn sighup_adds_and_removes_relays_without_touching_the_others() {
    let master = RedisServer::start(&[]);
    let (port_keep, port_drop, port_new) = (free_port(), free_port(), free_port());
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let keep = relay_entry("keep", &master, port_keep);
    let relays =
        ConfiguredRelays::start(&config_yaml(&data, None, &[keep.clone(), relay_entry("gone", &master, port_drop)]));
    wait_relay_up(port_keep);
    wait_relay_up(port_drop);
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &port_keep.to_string()]);
    write_keys(&master, "k", 200);
    wait_digest_equal(&master, &replica);
    let run_id = field(port_keep, "server", "run_id");
    let served_before = (field(port_keep, "stats", "sync_full"), field(port_keep, "stats", "sync_partial_ok"));

    // An invalid file is refused and the running topology stays.
    relays.rewrite("relays: [{name: broken}]\n");
    relays.signal("HUP");
    wait_until(SYNC_TIMEOUT, "the invalid reload is refused in the log", || relays.stderr().contains("reload refused"));
    assert!(connect(port_drop, None, None).is_ok(), "relay 'gone' still runs after a refused reload");

    relays.rewrite(&config_yaml(&data, None, &[keep, relay_entry("new", &master, port_new)]));
    relays.signal("HUP");
    wait_relay_up(port_new);
    wait_until(SYNC_TIMEOUT, "the removed relay stops listening", || connect(port_drop, None, None).is_err());

    write_keys(&master, "k2", 200);
    wait_digest_equal(&master, &replica);
    assert_eq!(field(port_keep, "server", "run_id"), run_id, "the untouched relay was not restarted");
    assert_eq!(field(port_keep, "relay", "upstream_reconnects").as_deref(), Some("0"));
    assert_eq!(
        (field(port_keep, "stats", "sync_full"), field(port_keep, "stats", "sync_partial_ok")),
        served_before,
        "its replica kept its link: no new sync of any kind"
    );
    assert_eq!(parse_info_field(&replica.info("replication"), "master_link_status").as_deref(), Some("up"));
}

/// A master and one relay `name` of it with a metrics endpoint: (master, relays, listen port, metrics port).
fn relay_with_metrics(name: &str, data: &Path) -> (RedisServer, ConfiguredRelays, u16, u16) {
    let master = RedisServer::start(&[]);
    let (port, metrics_port) = (free_port(), free_port());
    let relays = ConfiguredRelays::start(&config_yaml(data, Some(metrics_port), &[relay_entry(name, &master, port)]));
    wait_relay_up(port);
    (master, relays, port, metrics_port)
}

#[test]
fn metrics_follow_the_workload_and_agree_with_info() {
    let work = tempfile::tempdir().unwrap();
    let (master, _relays, port, metrics_port) = relay_with_metrics("m", &work.path().join("data"));
    let relay_labels = [("relay", "m")];
    let offset_metric = || metric_value(&scrape(metrics_port), "redis_relay_offset_bytes", &relay_labels);
    wait_until(SYNC_TIMEOUT, "metrics endpoint serves the relay's offset", || offset_metric().is_some());
    let before = offset_metric().unwrap_or(-1.0);

    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &port.to_string()]);
    write_keys(&master, "m", 300);
    wait_digest_equal(&master, &replica);
    let master_offset = offset_of(&master) as f64;
    wait_until(SYNC_TIMEOUT, "the offset metric moves to the master's offset", || {
        offset_metric() == Some(master_offset)
    });
    assert!(master_offset > before);

    // The per-replica series appears, labelled with the address INFO shows, and agrees with it.
    let replica_label = format!("127.0.0.1:{}", replica.port());
    wait_until(SYNC_TIMEOUT, "per-replica ack offset reaches the master offset", || {
        metric_value(&scrape(metrics_port), "redis_relay_replica_ack_offset_bytes", &[("replica", &replica_label)])
            == Some(master_offset)
    });
    let info = info_of(port, "replication");
    let slave_line = info.lines().find(|l| l.starts_with("slave0:")).unwrap_or_default().to_string();
    assert!(slave_line.contains(&format!("port={}", replica.port())), "{slave_line}");
    assert!(slave_line.contains(&format!("offset={}", master_offset as i64)), "{slave_line}");
    let text = scrape(metrics_port);
    assert_eq!(metric_value(&text, "redis_relay_replicas", &[("state", "online")]), Some(1.0));
    assert_eq!(metric_value(&text, "redis_relay_upstream_link_up", &relay_labels), Some(1.0));
    assert_eq!(
        metric_value(&text, "redis_relay_full_syncs_served_total", &relay_labels),
        parse_info_field(&info_of(port, "stats"), "sync_full").and_then(|v| v.parse().ok())
    );

    // ... and disappears with the replica.
    drop(replica);
    wait_until(Duration::from_secs(20), "per-replica series disappear after the replica goes", || {
        let text = scrape(metrics_port);
        !text.is_empty()
            && metric_value(&text, "redis_relay_replica_lag_seconds", &[("replica", &replica_label)]).is_none()
    });
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every `redis_relay_*` name a text mentions.
fn referenced_metrics(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("redis_relay_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn deploy_files_parse_and_use_only_live_metrics() {
    // YAML files parse (the Kubernetes file holds several documents).
    for path in ["deploy/prometheus/alerts.yaml", "deploy/kubernetes/redis-relay.yaml", "config/relay.example.yaml"] {
        let text = std::fs::read_to_string(repo_file(path)).unwrap();
        let mut documents = 0;
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value: serde_yaml_ng::Value =
                serde::Deserialize::deserialize(document).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(!value.is_null(), "{path}: empty document");
            documents += 1;
        }
        assert!(documents >= 1, "{path}");
    }
    // The dashboard is JSON (a YAML subset) with panels.
    let dashboard_text = std::fs::read_to_string(repo_file("deploy/grafana/redis-relay-dashboard.json")).unwrap();
    let dashboard: serde_yaml_ng::Value = serde_yaml_ng::from_str(&dashboard_text).expect("dashboard JSON loads");
    assert!(dashboard.get("panels").and_then(|p| p.as_sequence()).is_some_and(|p| !p.is_empty()));
    let unit = std::fs::read_to_string(repo_file("deploy/systemd/redis-relay.service")).unwrap();
    for needle in ["[Service]", "StateDirectory=", "LimitNOFILE=", "User=", "ExecReload="] {
        assert!(unit.contains(needle), "systemd unit lacks {needle}");
    }

    // Every metric the rules and the dashboard use exists in a live scrape with a replica attached.
    let work = tempfile::tempdir().unwrap();
    let (master, _relays, port, metrics_port) = relay_with_metrics("d", &work.path().join("data"));
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &port.to_string()]);
    write_keys(&master, "d", 50);
    wait_digest_equal(&master, &replica);
    let mut used = referenced_metrics(&std::fs::read_to_string(repo_file("deploy/prometheus/alerts.yaml")).unwrap());
    used.extend(referenced_metrics(&dashboard_text));
    used.extend(referenced_metrics(&std::fs::read_to_string(repo_file("README.md")).unwrap()));
    let mut live = BTreeSet::new();
    wait_until(SYNC_TIMEOUT, "a scrape has every metric the deploy files and README use", || {
        live = metric_names(&scrape(metrics_port));
        used.iter().all(|name| live.contains(name))
    });
    assert!(used.len() > 10, "the files use the relay's metrics: {used:?}");
}

#[test]
fn a_relay_whose_port_is_taken_is_retried_while_the_others_run() {
    let master_a = RedisServer::start(&[]);
    let master_b = RedisServer::start(&[]);
    let (port_a, port_b, metrics_port) = (free_port(), free_port(), free_port());
    // Someone else holds relay a's port when the process starts.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port_a)).expect("hold port a");
    let work = tempfile::tempdir().unwrap();
    let relays = ConfiguredRelays::start(&config_yaml(
        &work.path().join("data"),
        Some(metrics_port),
        &[relay_entry("a", &master_a, port_a), relay_entry("b", &master_b, port_b)],
    ));
    wait_relay_up(port_b);
    let relay_a = [("relay", "a"), ("listener", "plain")];
    wait_for(SYNC_TIMEOUT, "relay a reported unbound and failing to bind", || {
        let text = scrape(metrics_port);
        let up = metric_value(&text, "redis_relay_listener_up", &relay_a);
        let errors = metric_value(&text, "redis_relay_listen_errors_total", &[("relay", "a")]);
        let link = metric_value(&text, "redis_relay_upstream_link_up", &[("relay", "a")]);
        // Relay a's link to its master runs although nobody can reach it yet.
        match (up, errors, link) {
            (Some(up), Some(errors), Some(link)) if up == 0.0 && errors >= 1.0 && link == 1.0 => Ok(()),
            other => Err(format!("listener_up, listen_errors_total, upstream_link_up: {other:?}")),
        }
    });
    let up_b = metric_value(&scrape(metrics_port), "redis_relay_listener_up", &[("relay", "b"), ("listener", "plain")]);
    assert_eq!(up_b, Some(1.0), "relay b is bound");
    assert_eq!(field(port_b, "relay", "listeners_unbound").as_deref(), Some("0"));

    // The port comes free: relay a binds it on a retry, without a restart.
    drop(squatter);
    wait_relay_up(port_a);
    assert_eq!(field(port_a, "relay", "listeners_unbound").as_deref(), Some("0"));
    let errors: u64 = field(port_a, "relay", "listen_errors").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(errors >= 1, "the failed attempts stay counted: {errors}");
    wait_for(SYNC_TIMEOUT, "relay a's listener reported up", || {
        match metric_value(&scrape(metrics_port), "redis_relay_listener_up", &relay_a) {
            Some(1.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    drop(relays);
}

#[test]
fn log_lines_of_a_relay_carry_its_name_and_replicas_their_listening_port() {
    let master = RedisServer::start(&[]);
    let port = free_port();
    let work = tempfile::tempdir().unwrap();
    let relays = ConfiguredRelays::start_with(
        &config_yaml(&work.path().join("data"), None, &[relay_entry("shard-x", &master, port)]),
        &["--log-format", "json"],
    );
    wait_relay_up(port);
    write_keys(&master, "k", 100);
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &port.to_string()]);
    wait_digest_equal(&master, &replica);
    let replica_name = format!("127.0.0.1:{}", replica.port());
    let lines: Vec<serde_yaml_ng::Value> = relays
        .stderr()
        .lines()
        .map(|line| serde_yaml_ng::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}")))
        .collect();
    let text = |value: &serde_yaml_ng::Value, key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let of_tasks: Vec<&serde_yaml_ng::Value> = lines
        .iter()
        .filter(|line| {
            text(line, "target").is_some_and(|t| {
                ["upstream", "downstream", "log", "snapshot"]
                    .iter()
                    .any(|m| t.starts_with(&format!("redis_relay::{m}")))
            })
        })
        .collect();
    assert!(of_tasks.len() >= 3, "the upstream and downstream tasks logged: {lines:?}");
    let mut replica_lines = 0;
    for line in of_tasks {
        let span = line.get("span").unwrap_or_else(|| panic!("no span on {line:?}"));
        let spans = line.get("spans").and_then(|s| s.as_sequence()).cloned().unwrap_or_default();
        let relay = spans.iter().find_map(|s| text(s, "relay"));
        assert_eq!(relay.as_deref(), Some("shard-x"), "relay= on {line:?}");
        if text(span, "name").as_deref() == Some("replica") {
            replica_lines += 1;
            assert_eq!(text(span, "replica"), Some(replica_name.clone()), "replica named ip:listening-port: {line:?}");
            let addr = text(span, "addr").expect("the connection's address as addr");
            assert_ne!(addr, replica_name, "addr is the connection's own (ephemeral) source address");
        }
    }
    assert!(replica_lines >= 1, "the replica's session logged in its span");
}

/// A thread's name, scheduling policy and nice value from its `stat` file (`man 5 proc`: nice is
/// field 19, policy field 41, numbered from 1 with the name in parentheses as field 2).
fn scheduling_of(stat: &str) -> Option<(String, i64, i64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    // After ") " comes field 3 (state), so field k is at index k - 3.
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    Some((stat[open + 1..close].to_string(), fields.get(41 - 3)?.parse().ok()?, fields.get(19 - 3)?.parse().ok()?))
}

/// Each thread of process `pid`: its name, scheduling policy and nice value.
fn thread_scheduling(pid: u32) -> Vec<(String, i64, i64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the relay's threads");
    // A thread that ended meanwhile has no stat to read.
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
        .filter_map(|s| scheduling_of(&s))
        .collect()
}

#[test]
fn fanout_priority_lowers_the_runtime_threads_and_never_the_upstream_link_or_the_log_writer() {
    const SCHED_IDLE: i64 = 5;
    // The relay starts with this process's scheduling (a `nice cargo test` one is niced too).
    let own = std::fs::read_to_string("/proc/self/stat").expect("own stat");
    let (_, policy, nice) = scheduling_of(&own).expect("own scheduling");
    let master = RedisServer::start(&[]);
    for (setting, worker_policy, worker_nice) in
        [(None, policy, 19), (Some("idle"), SCHED_IDLE, nice), (Some("normal"), policy, nice)]
    {
        let mut builder = Relay::builder(master.port());
        if let Some(setting) = setting {
            builder = builder.args(["--fanout-priority", setting]);
        }
        let relay = builder.start();
        wait_link_up(&relay, Duration::from_secs(20));
        // A replica streaming makes the runtime serve it; its blocking pool ran the log's opening.
        let replica = RedisServer::builder().replica_of(relay.port()).start();
        wait_in_sync(&master, &replica, Duration::from_secs(20));
        let threads = thread_scheduling(relay.pid().expect("the relay runs"));
        let of = |name: &str| threads.iter().filter(|t| t.0 == name).map(|t| (t.1, t.2)).collect::<Vec<_>>();
        let workers = of("relay-worker");
        assert!(!workers.is_empty(), "{setting:?}: no relay-worker thread in {threads:?}");
        assert!(workers.iter().all(|w| *w == (worker_policy, worker_nice)), "{setting:?}: {threads:?}");
        for ingest in ["upstream", "log-writer", "log-syncer"] {
            let found = of(ingest);
            assert!(!found.is_empty(), "{setting:?}: no {ingest} thread in {threads:?}");
            assert!(found.iter().all(|t| *t == (policy, nice)), "{setting:?}: {ingest} lowered: {threads:?}");
        }
        // INFO reads it from the worker that serves the command: what the kernel applied.
        let shown = relay.info_field("server", "fanout_priority");
        assert_eq!(shown.as_deref(), Some(setting.unwrap_or("low")), "{setting:?}: INFO fanout_priority");
    }
}
