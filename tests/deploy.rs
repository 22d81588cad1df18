//! The deploy files as shipped: the Docker image's defaults run a relay from the environment alone,
//! the Kubernetes manifest's relay YAML passes the relay's own validation and agrees with the ports
//! and volume around it, and the Helm chart's values cover everything its templates read.
//! (Neither docker images nor helm can be fetched here, so the files are checked for structure and
//! the binary is run with exactly the settings the image gives it.)

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use serde_yaml_ng::Value;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `KEY=value` pairs of the Dockerfile's `ENV` instructions (continued lines joined).
fn dockerfile_env(dockerfile: &str) -> Vec<(String, String)> {
    let joined = dockerfile.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|line| line.trim().strip_prefix("ENV "))
        .flat_map(|rest| rest.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter_map(|pair| pair.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

fn instruction<'a>(dockerfile: &'a str, name: &str) -> Vec<&'a str> {
    dockerfile.lines().filter_map(|line| line.trim().strip_prefix(name)).map(str::trim).collect()
}

fn port_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(_, port)| port).unwrap_or_else(|| panic!("{addr:?} has no port"))
}

#[test]
fn the_docker_image_defaults_run_one_relay_from_the_environment() {
    let dockerfile = read("deploy/Dockerfile");
    let env = dockerfile_env(&dockerfile);
    let value = |key: &str| {
        env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("Dockerfile sets no {key}"))
    };
    let listen = value("REDIS_RELAY_LISTEN");
    let metrics = value("REDIS_RELAY_METRICS");
    assert!(listen.starts_with("0.0.0.0:"), "inside a container the relay must listen on every address: {listen}");
    assert!(metrics.starts_with("0.0.0.0:"), "{metrics}");
    assert_ne!(port_of(&metrics), "9121", "9121 is redis_exporter's port");
    assert_eq!(
        instruction(&dockerfile, "VOLUME"),
        [format!("[\"{}\"]", value("REDIS_RELAY_DIR"))],
        "the data dir is the volume"
    );
    let exposed: BTreeSet<&str> =
        instruction(&dockerfile, "EXPOSE").iter().flat_map(|l| l.split_whitespace()).collect();
    assert_eq!(exposed, BTreeSet::from([port_of(&listen), port_of(&metrics)]), "EXPOSE matches the listeners");
    assert!(instruction(&dockerfile, "CMD").is_empty(), "no built-in config file: the image runs from its ENV");
    assert!(instruction(&dockerfile, "USER").iter().all(|user| !user.starts_with("root")), "runs as non-root");

    // The binary run as the image runs it: no arguments, the same variables (with loopback ports
    // picked here in place of the container's addresses).
    let master = RedisServer::start(&[]);
    let work = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let metrics_port = free_port();
    let run = |extra: &[(&str, String)]| {
        let mut command = Command::new(relay_bin());
        command.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        for (key, value) in &env {
            command.env(key, value);
        }
        command
            .env("REDIS_RELAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("REDIS_RELAY_METRICS", format!("127.0.0.1:{metrics_port}"))
            .env("REDIS_RELAY_DIR", work.path().join("data"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (key, value) in extra {
            command.env(key, value);
        }
        Killed(command.spawn().expect("spawn redis-relay"))
    };

    // Without REDIS_RELAY_UPSTREAM it refuses to start.
    let mut missing = run(&[]);
    let status = wait_for(SYNC_TIMEOUT, "the relay without an upstream to exit", || {
        missing.0.try_wait().map_err(|e| e.to_string())?.ok_or_else(|| "still running".to_string())
    });
    assert!(!status.success(), "a relay without an upstream must exit with an error");

    let _relay = run(&[("REDIS_RELAY_UPSTREAM", format!("127.0.0.1:{}", master.port()))]);
    wait_for(SYNC_TIMEOUT, "the relay started from the environment to be in sync with its master", || {
        let info = connect(port, None, None)
            .and_then(|mut con| redis::cmd("INFO").arg("replication").query::<String>(&mut con))
            .map_err(|e| e.to_string())?;
        match parse_info_field(&info, "master_link_status").as_deref() {
            Some("up") => Ok(()),
            other => Err(format!("master_link_status {other:?}")),
        }
    });
    assert!(work.path().join("data").join("log").is_dir(), "the log lives in REDIS_RELAY_DIR");
}

fn documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| serde::Deserialize::deserialize(document).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

fn get<'a>(value: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(value, |at, key| at.get(key).unwrap_or_else(|| panic!("no {path} in {value:?}")))
}

fn str_at<'a>(value: &'a Value, path: &str) -> &'a str {
    get(value, path).as_str().unwrap_or_else(|| panic!("{path} is not a string"))
}

#[test]
fn the_kubernetes_manifest_agrees_with_itself_and_with_the_relay() {
    let docs = documents("deploy/kubernetes/redis-relay.yaml");
    let of_kind = |kind: &str| {
        docs.iter().find(|d| d.get("kind").and_then(Value::as_str) == Some(kind)).unwrap_or_else(|| panic!("no {kind}"))
    };
    let config_text = get(of_kind("ConfigMap"), "data")
        .get("relay.yaml")
        .and_then(Value::as_str)
        .expect("the ConfigMap holds relay.yaml");

    // The relay YAML passes the relay's own check (with the secret's variable set).
    let work = tempfile::tempdir().expect("temp dir");
    let config_path = work.path().join("relay.yaml");
    std::fs::write(&config_path, config_text).expect("write config");
    let check = Command::new(relay_bin())
        .arg("check-config")
        .arg(&config_path)
        .env("SHARD_A_PASSWORD", "secret")
        .output()
        .expect("run check-config");
    assert!(check.status.success(), "check-config: {}", String::from_utf8_lossy(&check.stderr));

    let config: Value = serde_yaml_ng::from_str(config_text).expect("relay YAML");
    let mut wanted_ports: BTreeSet<u64> = get(&config, "relays")
        .as_sequence()
        .expect("relays")
        .iter()
        .map(|relay| port_of(str_at(relay, "listen")).parse().expect("listen port"))
        .collect();
    wanted_ports.insert(port_of(str_at(&config, "metrics.listen")).parse().expect("metrics port"));

    let statefulset = of_kind("StatefulSet");
    let container = &get(statefulset, "spec.template.spec.containers").as_sequence().expect("containers")[0];
    let image = str_at(container, "image");
    assert!(!image.ends_with(":latest") && image.contains(':'), "a pinned image tag: {image}");
    assert!(container.get("imagePullPolicy").is_some(), "imagePullPolicy is set");
    let container_ports: BTreeSet<u64> = get(container, "ports")
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| get(p, "containerPort").as_u64().expect("containerPort"))
        .collect();
    assert_eq!(container_ports, wanted_ports, "container ports are the relay's listen and metrics ports");
    let mounts: Vec<&str> =
        get(container, "volumeMounts").as_sequence().expect("mounts").iter().map(|m| str_at(m, "mountPath")).collect();
    assert!(mounts.contains(&str_at(&config, "data_dir")), "data_dir {:?} is a mounted volume", mounts);
    let secret_envs: Vec<&str> =
        get(container, "env").as_sequence().expect("env").iter().map(|e| str_at(e, "name")).collect();
    assert!(secret_envs.contains(&"SHARD_A_PASSWORD"), "the variable the relay YAML uses is set: {secret_envs:?}");
    let service_ports: BTreeSet<u64> = get(of_kind("Service"), "spec.ports")
        .as_sequence()
        .expect("service ports")
        .iter()
        .map(|p| get(p, "port").as_u64().expect("port"))
        .collect();
    assert_eq!(service_ports, wanted_ports, "the Service exposes the same ports");
}

/// `.Values.a.b` paths a template reads (inside `range .Values.relays`, `.x` is read from each relay).
fn values_paths(template: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut top = BTreeSet::new();
    let mut per_relay = BTreeSet::new();
    let mut in_relays = false;
    for action in template.split("{{").skip(1).filter_map(|part| part.split("}}").next()) {
        let action = action.trim_matches(|c: char| c == '-' || c.is_whitespace());
        // From the range on, a bare `.field` is taken as a relay's (after the range's end only
        // `.Values`, `.Release`, `.Chart` and `$` paths are used, which are told apart).
        if action.starts_with("range .Values.relays") {
            in_relays = true;
        }
        for word in action.split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == '|') {
            if let Some(path) = word.strip_prefix(".Values.") {
                top.insert(path.to_string());
            } else if in_relays && word.starts_with('.') && word.len() > 1 && !word.starts_with(".Values") {
                per_relay.insert(word[1..].split('.').next().unwrap_or_default().to_string());
            }
        }
    }
    (top, per_relay)
}

#[test]
fn the_helm_chart_values_cover_its_templates() {
    let chart: Value = serde_yaml_ng::from_str(&read("deploy/helm/redis-relay/Chart.yaml")).expect("Chart.yaml");
    assert_eq!(str_at(&chart, "apiVersion"), "v2");
    assert_eq!(str_at(&chart, "name"), "redis-relay");
    let values: Value = serde_yaml_ng::from_str(&read("deploy/helm/redis-relay/values.yaml")).expect("values.yaml");
    let templates = repo_file("deploy/helm/redis-relay/templates");
    let mut seen = 0;
    for entry in std::fs::read_dir(&templates).expect("templates") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("template");
        let (top, per_relay) = values_paths(&text);
        for path_in_values in &top {
            get(&values, path_in_values);
            seen += 1;
        }
        let relays = get(&values, "relays").as_sequence().expect("relays is a list");
        assert!(!relays.is_empty(), "values list at least one relay");
        for field in per_relay.iter().filter(|f| !["Values", "Release", "Chart", "Template"].contains(&f.as_str())) {
            for relay in relays {
                assert!(relay.get(field.as_str()).is_some(), "{}: relays[].{field} missing in values", path.display());
            }
        }
    }
    assert!(seen > 10, "the templates read the values ({seen} reads)");
    // The default values make a relay YAML the relay accepts: the same settings, in its own schema.
    let defaults = get(&values, "defaults").as_mapping().expect("defaults");
    let mut yaml = format!(
        "data_dir: /data\nmetrics: {{listen: \"0.0.0.0:{}\"}}\ndefaults:\n",
        get(&values, "metrics.port").as_u64().expect("metrics.port")
    );
    for (key, value) in defaults {
        yaml.push_str(&format!(
            "  {}: {}\n",
            key.as_str().expect("key"),
            serde_yaml_ng::to_string(value).expect("value").trim()
        ));
    }
    yaml.push_str("relays:\n");
    for relay in get(&values, "relays").as_sequence().expect("relays") {
        yaml.push_str(&format!(
            "  - {{name: {}, upstream: {{addr: \"{}\"}}, listen: \"0.0.0.0:{}\"}}\n",
            str_at(relay, "name"),
            str_at(relay, "upstream"),
            get(relay, "port").as_u64().expect("port")
        ));
    }
    let work = tempfile::tempdir().expect("temp dir");
    let config_path = work.path().join("relay.yaml");
    std::fs::write(&config_path, &yaml).expect("write config");
    let check = Command::new(relay_bin()).arg("check-config").arg(&config_path).output().expect("check-config");
    assert!(check.status.success(), "{yaml}\n{}", String::from_utf8_lossy(&check.stderr));
}
