//! Configuration: the command line and the YAML file, both turned into one [`Config`] (a list of
//! relays, so one process can relay several masters).
//!
//! Sizes and durations use Redis's units: `64mb` is 64 × 1024², `1gb` is 1024³, `10s`, `5m`, `500ms`.
//! Every error names the field and the value.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::downstream::pubsub::OutputBufferLimit;
use crate::downstream::ReplicaofPolicy;
use crate::log::{FsyncPolicy, LogOptions};
use crate::tls::{ClientAuth, DownstreamTls, UpstreamTls};
use crate::upstream::history::{HistoryResetPolicy, DEFAULT_MIN_KEY_RATIO};
use crate::upstream::AckMode;

pub const DEFAULT_LOG_SIZE: u64 = 1 << 30;
pub const DEFAULT_LOG_MEMORY: u64 = 64 << 20;
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;
pub const DEFAULT_REPL_TIMEOUT: Duration = Duration::from_secs(60);
/// Least time between two snapshot fetches from the master (as XPipe's keeper spaces its dumps).
pub const DEFAULT_SNAPSHOT_MIN_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// Where fresh snapshots come from, in order of preference (`snapshot_sources`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotSource {
    /// An online replica below the relay (a redis-server or another relay), on a side connection.
    Replicas,
    /// The master, on a side connection: a fork there, so rate-limited.
    Master,
}

impl SnapshotSource {
    pub fn parse(text: &str) -> Option<SnapshotSource> {
        match text.trim().to_ascii_lowercase().as_str() {
            "replicas" | "replica" => Some(SnapshotSource::Replicas),
            "master" => Some(SnapshotSource::Master),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SnapshotSource::Replicas => "replicas",
            SnapshotSource::Master => "master",
        }
    }
}

/// How the relay refreshes its snapshot cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSourcing {
    pub sources: Vec<SnapshotSource>,
    /// Replica addresses (`ip:port`, as announced) never asked for a snapshot.
    pub exclude: Vec<String>,
    /// `AUTH` to a replica source; `None` means the relay's upstream password.
    pub password: Option<String>,
    /// Least time between two fetches from the master.
    pub master_min_interval: Duration,
}

impl Default for SnapshotSourcing {
    fn default() -> Self {
        SnapshotSourcing {
            sources: vec![SnapshotSource::Replicas, SnapshotSource::Master],
            exclude: Vec::new(),
            password: None,
            master_min_interval: DEFAULT_SNAPSHOT_MIN_INTERVAL,
        }
    }
}

/// Parses a `replicas,master` list; an empty or repeated entry is an error.
pub fn parse_sources(items: &[String]) -> Result<Vec<SnapshotSource>, String> {
    let mut sources = Vec::new();
    for item in items {
        let source = SnapshotSource::parse(item)
            .ok_or_else(|| format!("unknown snapshot source {item:?} (expected replicas or master)"))?;
        if sources.contains(&source) {
            return Err(format!("snapshot source {item:?} given twice"));
        }
        sources.push(source);
    }
    Ok(sources)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error("{field}: {message} (value: {value:?})")]
    Field { field: String, value: String, message: String },
}

fn field_error(field: &str, value: &str, message: &str) -> ConfigError {
    ConfigError::Field { field: field.to_string(), value: value.to_string(), message: message.to_string() }
}

/// Everything one process runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub metrics: Option<SocketAddr>,
    /// Credentials `/metrics` requires (`metrics.auth`: `bearer:TOKEN` or `basic:USER:PASSWORD`).
    pub metrics_auth: Option<crate::metrics::http::MetricsAuth>,
    pub relays: Vec<RelayConfig>,
}

/// One relay: one master upstream, one listen address, one data directory.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    pub name: String,
    pub upstream: String,
    pub upstream_user: Option<String>,
    pub upstream_password: Option<String>,
    pub listen: SocketAddr,
    pub dir: PathBuf,
    pub log: LogOptions,
    pub repl_timeout: Duration,
    /// Serve full syncs in the EOF-marked form to replicas that announce `capa eof` (Redis's
    /// `repl-diskless-sync`); otherwise the `$<len>` form.
    pub downstream_eof_form: bool,
    /// The password clients and replicas must give with `AUTH` (like redis.conf `requirepass`), so
    /// replicas configured with `masterauth` for a protected master can use the relay too.
    pub requirepass: Option<String>,
    /// What to do when the master presents another history with far fewer keys (`history_reset`).
    pub history_reset: HistoryResetPolicy,
    /// A new history with fewer than this fraction of the cached snapshot's keys is a shrink.
    pub history_reset_min_key_ratio: f64,
    /// Whether clients may repoint the relay (`replicaof: allow | deny`).
    pub replicaof: ReplicaofPolicy,
    /// What the relay ACKs upstream (`upstream_ack: fack | durable`).
    pub upstream_ack: AckMode,
    /// TLS to the master (`upstream.tls: yes` and its files).
    pub upstream_tls: Option<UpstreamTls>,
    /// The TLS listener below the relay (`tls_listen` and its files).
    pub tls: Option<DownstreamTls>,
    /// End-to-end ACKs: with K >= 1 the relay ACKs upstream only what K of its replicas have ACKed.
    pub ack_replicas: usize,
    /// `client-output-buffer-limit pubsub`: a subscriber holding more unsent messages is dropped.
    pub pubsub_output_limit: OutputBufferLimit,
    /// Where fresh snapshots come from.
    pub snapshot: SnapshotSourcing,
    /// Clients (replicas included) this relay serves at once, like redis.conf `maxclients`;
    /// lowered at start when the descriptor limit cannot be raised far enough.
    pub maxclients: u64,
    /// Idle normal clients are closed after this (redis.conf `timeout`); zero is off.
    pub timeout: Duration,
}

/// The settings about the master's lifecycle, with their defaults.
pub const DEFAULT_HISTORY_RESET: HistoryResetPolicy = HistoryResetPolicy::Hold;
pub const DEFAULT_REPLICAOF: ReplicaofPolicy = ReplicaofPolicy::Allow;
pub const DEFAULT_UPSTREAM_ACK: AckMode = AckMode::Fack;

/// Parses `history_reset_min_key_ratio`: a fraction from 0 to 1.
pub fn parse_ratio(text: &str) -> Option<f64> {
    text.trim().parse::<f64>().ok().filter(|r| (0.0..=1.0).contains(r))
}

/// Parses a size in Redis's units (`1024`, `64kb`, `64mb`, `1gb`, `1k` = 1000, `1m`, `1g`).
pub fn parse_size(text: &str) -> Option<u64> {
    let lower = text.trim().to_ascii_lowercase();
    let split = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
    let (digits, unit) = lower.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let multiplier: u64 = match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// Parses a duration (`60`, `60s`, `500ms`, `5m`, `1h`); a bare number is seconds, as in redis.conf.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let lower = text.trim().to_ascii_lowercase();
    let split = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
    let (digits, unit) = lower.split_at(split);
    let number: u64 = digits.parse().ok()?;
    Some(match unit {
        "" | "s" => Duration::from_secs(number),
        "ms" => Duration::from_millis(number),
        "m" => Duration::from_secs(number.checked_mul(60)?),
        "h" => Duration::from_secs(number.checked_mul(3600)?),
        _ => return None,
    })
}

/// The YAML file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    metrics: Option<FileMetrics>,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    defaults: FileDefaults,
    relays: Vec<FileRelay>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    listen: String,
    auth: Option<String>,
}

/// The top-level `defaults` every relay inherits.
#[derive(Debug, Default, Deserialize)]
struct FileDefaults {
    #[serde(flatten)]
    tunables: Tunables,
    #[serde(flatten)]
    unknown: std::collections::BTreeMap<String, serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
struct FileRelay {
    name: String,
    upstream: FileUpstream,
    listen: String,
    dir: Option<PathBuf>,
    requirepass: Option<String>,
    tls_listen: Option<String>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    tls_ca_cert_file: Option<String>,
    tls_auth_clients: Option<String>,
    snapshot_source_password: Option<String>,
    #[serde(flatten)]
    tunables: Tunables,
    /// serde cannot deny unknown fields next to a flattened struct: they land here and are refused.
    #[serde(flatten)]
    unknown: std::collections::BTreeMap<String, serde_yaml_ng::Value>,
}

/// Settings a relay may set itself or inherit from `defaults`.
#[derive(Debug, Default, Deserialize)]
struct Tunables {
    log_size: Option<String>,
    log_memory: Option<String>,
    log_segment_size: Option<String>,
    log_max_age: Option<String>,
    appendfsync: Option<String>,
    repl_timeout: Option<String>,
    repl_diskless_sync: Option<bool>,
    history_reset: Option<String>,
    /// A YAML number or string: kept as written, parsed with the others.
    history_reset_min_key_ratio: Option<serde_yaml_ng::Value>,
    replicaof: Option<String>,
    upstream_ack: Option<String>,
    /// A YAML number (or string), checked with the others so the error names the field.
    ack_replicas: Option<serde_yaml_ng::Value>,
    client_output_buffer_limit_pubsub: Option<String>,
    log_max_size: Option<String>,
    snapshot_sources: Option<Vec<String>>,
    snapshot_source_exclude: Option<Vec<String>>,
    snapshot_min_interval: Option<String>,
    maxclients: Option<u64>,
    /// A duration, or a bare number of seconds as in redis.conf.
    timeout: Option<serde_yaml_ng::Value>,
}

/// The settings of one relay after inheritance.
struct Resolved {
    log: LogOptions,
    repl_timeout: Duration,
    downstream_eof_form: bool,
    history_reset: HistoryResetPolicy,
    history_reset_min_key_ratio: f64,
    replicaof: ReplicaofPolicy,
    upstream_ack: AckMode,
    ack_replicas: usize,
    pubsub_output_limit: OutputBufferLimit,
    snapshot: SnapshotSourcing,
    maxclients: u64,
    timeout: Duration,
}

/// A scalar YAML value as text (`300` and `"300s"` alike).
fn yaml_text(value: &Option<serde_yaml_ng::Value>) -> Option<String> {
    value.as_ref().map(|v| match v {
        serde_yaml_ng::Value::String(s) => s.clone(),
        serde_yaml_ng::Value::Number(n) => n.to_string(),
        other => format!("{other:?}"),
    })
}

fn resolve(at: &dyn Fn(&str) -> String, own: &Tunables, defaults: &Tunables) -> Result<Resolved, ConfigError> {
    let pick = |own: &Option<String>, default: &Option<String>, name: &str| match own {
        Some(v) => Some((at(name), v.clone())),
        None => default.clone().map(|v| (format!("defaults.{name}"), v)),
    };
    let size =
        |name: &str, own: &Option<String>, default: &Option<String>, fallback: u64| match pick(own, default, name) {
            None => Ok(fallback),
            Some((field, v)) => {
                parse_size(&v).ok_or_else(|| field_error(&field, &v, "expected a size such as 64mb or 1gb"))
            }
        };
    let retention = size("log_size", &own.log_size, &defaults.log_size, DEFAULT_LOG_SIZE)?;
    let memory = size("log_memory", &own.log_memory, &defaults.log_memory, DEFAULT_LOG_MEMORY.min(retention))?;
    let segment_size =
        size("log_segment_size", &own.log_segment_size, &defaults.log_segment_size, DEFAULT_SEGMENT_SIZE)?;
    if retention < 16 * 1024 {
        let field = if own.log_size.is_some() { at("log_size") } else { "defaults.log_size".into() };
        return Err(field_error(&field, &retention.to_string(), "the log must hold at least 16kb"));
    }
    let max_size = size("log_max_size", &own.log_max_size, &defaults.log_max_size, retention.saturating_mul(2))?;
    if max_size < retention {
        let (field, value) = pick(&own.log_max_size, &defaults.log_max_size, "log_max_size").unwrap_or_default();
        return Err(field_error(&field, &value, "log_max_size must be at least log_size"));
    }
    let mut snapshot = SnapshotSourcing::default();
    if let Some(list) = own.snapshot_sources.as_ref().or(defaults.snapshot_sources.as_ref()) {
        let field =
            if own.snapshot_sources.is_some() { at("snapshot_sources") } else { "defaults.snapshot_sources".into() };
        snapshot.sources = parse_sources(list).map_err(|m| field_error(&field, &list.join(","), &m))?;
    }
    if let Some(list) = own.snapshot_source_exclude.as_ref().or(defaults.snapshot_source_exclude.as_ref()) {
        for (i, addr) in list.iter().enumerate() {
            let field = if own.snapshot_source_exclude.is_some() {
                at(&format!("snapshot_source_exclude[{i}]"))
            } else {
                format!("defaults.snapshot_source_exclude[{i}]")
            };
            check_upstream(&field, addr)?;
        }
        snapshot.exclude = list.clone();
    }
    if let Some((field, v)) = pick(&own.snapshot_min_interval, &defaults.snapshot_min_interval, "snapshot_min_interval")
    {
        snapshot.master_min_interval =
            parse_duration(&v).ok_or_else(|| field_error(&field, &v, "expected a duration such as 15m"))?;
    }
    let fsync = match pick(&own.appendfsync, &defaults.appendfsync, "appendfsync") {
        None => FsyncPolicy::EverySec,
        Some((field, v)) => {
            FsyncPolicy::parse(&v).ok_or_else(|| field_error(&field, &v, "expected always, everysec or no"))?
        }
    };
    let max_age = match pick(&own.log_max_age, &defaults.log_max_age, "log_max_age") {
        None => None,
        Some((field, v)) => {
            Some(parse_duration(&v).ok_or_else(|| field_error(&field, &v, "expected a duration such as 6h"))?)
        }
    };
    let repl_timeout = match pick(&own.repl_timeout, &defaults.repl_timeout, "repl_timeout") {
        None => DEFAULT_REPL_TIMEOUT,
        Some((field, v)) => {
            parse_duration(&v).ok_or_else(|| field_error(&field, &v, "expected a duration such as 60s or 5m"))?
        }
    };
    let choice = |name: &str, own: &Option<String>, default: &Option<String>| pick(own, default, name);
    let history_reset = match choice("history_reset", &own.history_reset, &defaults.history_reset) {
        None => DEFAULT_HISTORY_RESET,
        Some((field, v)) => {
            HistoryResetPolicy::parse(&v).ok_or_else(|| field_error(&field, &v, "expected hold or follow"))?
        }
    };
    let as_text = |value: &Option<serde_yaml_ng::Value>| match value {
        Some(serde_yaml_ng::Value::Number(n)) => Some(n.to_string()),
        Some(serde_yaml_ng::Value::String(s)) => Some(s.clone()),
        Some(other) => Some(format!("{other:?}")),
        None => None,
    };
    let history_reset_min_key_ratio = match choice(
        "history_reset_min_key_ratio",
        &as_text(&own.history_reset_min_key_ratio),
        &as_text(&defaults.history_reset_min_key_ratio),
    ) {
        None => DEFAULT_MIN_KEY_RATIO,
        Some((field, v)) => {
            parse_ratio(&v).ok_or_else(|| field_error(&field, &v, "expected a fraction from 0 to 1, e.g. 0.5"))?
        }
    };
    let replicaof = match choice("replicaof", &own.replicaof, &defaults.replicaof) {
        None => DEFAULT_REPLICAOF,
        Some((field, v)) => {
            ReplicaofPolicy::parse(&v).ok_or_else(|| field_error(&field, &v, "expected allow or deny"))?
        }
    };
    let upstream_ack = match choice("upstream_ack", &own.upstream_ack, &defaults.upstream_ack) {
        None => DEFAULT_UPSTREAM_ACK,
        Some((field, v)) => AckMode::parse(&v).ok_or_else(|| field_error(&field, &v, "expected fack or durable"))?,
    };
    let ack_replicas = match choice("ack_replicas", &as_text(&own.ack_replicas), &as_text(&defaults.ack_replicas)) {
        None => 0,
        Some((field, v)) => v
            .parse::<usize>()
            .map_err(|_| field_error(&field, &v, "expected a number of replicas (0 turns end-to-end ACKs off)"))?,
    };
    let pubsub_output_limit = match pick(
        &own.client_output_buffer_limit_pubsub,
        &defaults.client_output_buffer_limit_pubsub,
        "client_output_buffer_limit_pubsub",
    ) {
        None => OutputBufferLimit::PUBSUB_DEFAULT,
        Some((field, v)) => OutputBufferLimit::parse(&v)
            .ok_or_else(|| field_error(&field, &v, "expected <hard> <soft> <soft seconds>, such as \"32mb 8mb 60\""))?,
    };
    Ok(Resolved {
        pubsub_output_limit,
        log: LogOptions { retention, max_size, memory, segment_size: segment_size.max(64 * 1024), max_age, fsync },
        repl_timeout,
        downstream_eof_form: own.repl_diskless_sync.or(defaults.repl_diskless_sync).unwrap_or(false),
        history_reset,
        history_reset_min_key_ratio,
        replicaof,
        upstream_ack,
        ack_replicas,
        snapshot,
        timeout: match pick(&yaml_text(&own.timeout), &yaml_text(&defaults.timeout), "timeout") {
            None => Duration::ZERO,
            Some((field, v)) => {
                parse_duration(&v).ok_or_else(|| field_error(&field, &v, "expected a duration such as 300s, or 0"))?
            }
        },
        maxclients: match own
            .maxclients
            .map(|v| (at("maxclients"), v))
            .or(defaults.maxclients.map(|v| ("defaults.maxclients".to_string(), v)))
        {
            None => crate::limits::DEFAULT_MAXCLIENTS,
            Some((field, 0)) => return Err(field_error(&field, "0", "maxclients must be at least 1")),
            Some((_, v)) => v,
        },
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    addr: String,
    user: Option<String>,
    password: Option<String>,
    /// `yes` | `no` (or a YAML bool).
    tls: Option<serde_yaml_ng::Value>,
    tls_ca_cert_file: Option<String>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    tls_server_name: Option<String>,
}

/// TLS to the master as both pipelines give it (flags and YAML fields have the same names).
#[derive(Debug, Default)]
pub struct UpstreamTlsFields {
    pub tls: Option<String>,
    pub ca_cert_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub server_name: Option<String>,
}

/// The TLS listener as both pipelines give it.
#[derive(Debug, Default)]
pub struct DownstreamTlsFields {
    pub listen: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub ca_cert_file: Option<String>,
    pub auth_clients: Option<String>,
}

/// `yes`/`no` as redis.conf writes booleans (`true`/`false` too).
pub fn parse_yes_no(field: &str, text: &str) -> Result<bool, ConfigError> {
    match text.to_ascii_lowercase().as_str() {
        "yes" | "true" => Ok(true),
        "no" | "false" => Ok(false),
        _ => Err(field_error(field, text, "expected yes or no")),
    }
}

fn yaml_yes_no(value: &Option<serde_yaml_ng::Value>) -> Option<String> {
    value.as_ref().map(|v| match v {
        serde_yaml_ng::Value::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
        serde_yaml_ng::Value::String(text) => text.clone(),
        other => format!("{other:?}"),
    })
}

/// A TLS field's name as its pipeline spells it: `--tls-cert-file` or `relays[0].tls_cert_file`.
fn tls_field_name(prefix: &str, field: &str) -> String {
    if prefix.ends_with('_') {
        format!("{prefix}{}", field.replace('-', "_"))
    } else {
        format!("{prefix}{field}")
    }
}

/// Checks TLS-to-the-master settings; `prefix` names the fields (`--upstream-tls-` or
/// `relays[0].upstream.tls_`).
pub fn upstream_tls(prefix: &str, fields: &UpstreamTlsFields) -> Result<Option<UpstreamTls>, ConfigError> {
    let name = |field: &str| tls_field_name(prefix, field);
    let enabled = match &fields.tls {
        Some(text) => parse_yes_no(prefix.trim_end_matches(['-', '_']), text)?,
        None => false,
    };
    let given = [&fields.ca_cert_file, &fields.cert_file, &fields.key_file, &fields.server_name];
    if !enabled {
        if given.iter().any(|f| f.is_some()) {
            return Err(field_error(prefix.trim_end_matches(['-', '_']), "no", "TLS files are set but TLS is off"));
        }
        return Ok(None);
    }
    let Some(ca) = &fields.ca_cert_file else {
        return Err(field_error(
            &name("ca-cert-file"),
            "",
            "TLS to the master needs the CA that signed its certificate",
        ));
    };
    if fields.cert_file.is_some() != fields.key_file.is_some() {
        return Err(field_error(&name("cert-file"), "", "a client certificate needs both a cert file and a key file"));
    }
    Ok(Some(UpstreamTls {
        ca_cert_file: ca.into(),
        cert_file: fields.cert_file.as_ref().map(Into::into),
        key_file: fields.key_file.as_ref().map(Into::into),
        server_name: fields.server_name.clone(),
    }))
}

/// Checks the TLS listener's settings; `prefix` names the fields (`--tls-` or `relays[0].tls_`).
pub fn downstream_tls(prefix: &str, fields: &DownstreamTlsFields) -> Result<Option<DownstreamTls>, ConfigError> {
    let name = |field: &str| tls_field_name(prefix, field);
    let Some(listen) = &fields.listen else {
        if fields.cert_file.is_some() || fields.key_file.is_some() {
            return Err(field_error(&name("listen"), "", "TLS certificates are set but there is no TLS listener"));
        }
        return Ok(None);
    };
    let listen = parse_listen(&name("listen"), listen)?;
    let (Some(cert), Some(key)) = (&fields.cert_file, &fields.key_file) else {
        return Err(field_error(&name("cert-file"), "", "a TLS listener needs a cert file and a key file"));
    };
    let auth_clients = match &fields.auth_clients {
        Some(text) => ClientAuth::parse(text)
            .ok_or_else(|| field_error(&name("auth-clients"), text, "expected yes, no or optional"))?,
        None => ClientAuth::Yes,
    };
    if auth_clients != ClientAuth::No && fields.ca_cert_file.is_none() {
        return Err(field_error(
            &name("ca-cert-file"),
            "",
            "tls-auth-clients yes or optional needs the CA that client certificates chain to",
        ));
    }
    Ok(Some(DownstreamTls {
        listen,
        cert_file: cert.into(),
        key_file: key.into(),
        ca_cert_file: fields.ca_cert_file.as_ref().map(Into::into),
        auth_clients,
    }))
}

/// Replaces `${NAME}` with the environment variable NAME; an unset variable is an error.
fn substitute_env(field: &str, text: &str) -> Result<String, ConfigError> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            return Err(field_error(field, text, "unterminated ${...}"));
        };
        let name = &rest[start + 2..start + end];
        let value = std::env::var(name)
            .map_err(|_| field_error(field, text, &format!("environment variable {name} is not set")))?;
        out.push_str(&value);
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

pub fn parse_listen(field: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| field_error(field, text, "expected HOST:PORT with an IP address, e.g. 127.0.0.1:6380"))
}

pub fn check_upstream(field: &str, text: &str) -> Result<String, ConfigError> {
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(text.to_string()),
        _ => Err(field_error(field, text, "expected HOST:PORT")),
    }
}

impl Config {
    /// Reads and validates a YAML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::File { file: file.clone(), message: e.to_string() })?;
        Config::from_yaml(&text).map_err(|e| match e {
            ConfigError::Field { .. } => ConfigError::File { file, message: e.to_string() },
            other => other,
        })
    }

    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let parsed: FileConfig = serde_yaml_ng::from_str(text)
            .map_err(|e| ConfigError::File { file: "<config>".into(), message: e.to_string() })?;
        let metrics = match &parsed.metrics {
            Some(m) => Some(parse_listen("metrics.listen", &m.listen)?),
            None => None,
        };
        if let Some(field) = parsed.defaults.unknown.keys().next() {
            return Err(field_error(&format!("defaults.{field}"), "", "unknown field"));
        }
        let mut relays = Vec::new();
        for (i, relay) in parsed.relays.iter().enumerate() {
            let at = |name: &str| format!("relays[{i}].{name}");
            if let Some(field) = relay.unknown.keys().next() {
                return Err(field_error(&at(field), "", "unknown field"));
            }
            let resolved = resolve(&at, &relay.tunables, &parsed.defaults.tunables)?;
            let dir = match (&relay.dir, &parsed.data_dir) {
                (Some(dir), _) => dir.clone(),
                (None, Some(data_dir)) => data_dir.join(&relay.name),
                (None, None) => return Err(field_error(&at("dir"), "", "set dir here or data_dir at the top level")),
            };
            let password = match &relay.upstream.password {
                Some(p) => Some(substitute_env(&at("upstream.password"), p)?),
                None => None,
            };
            let user = match &relay.upstream.user {
                Some(u) => Some(substitute_env(&at("upstream.user"), u)?),
                None => None,
            };
            let env = |field: &str, value: &Option<String>| {
                value.as_ref().map(|text| substitute_env(&at(field), text)).transpose()
            };
            let upstream_tls = upstream_tls(
                &at("upstream.tls_"),
                &UpstreamTlsFields {
                    tls: yaml_yes_no(&relay.upstream.tls),
                    ca_cert_file: env("upstream.tls_ca_cert_file", &relay.upstream.tls_ca_cert_file)?,
                    cert_file: env("upstream.tls_cert_file", &relay.upstream.tls_cert_file)?,
                    key_file: env("upstream.tls_key_file", &relay.upstream.tls_key_file)?,
                    server_name: env("upstream.tls_server_name", &relay.upstream.tls_server_name)?,
                },
            )?;
            let tls = downstream_tls(
                &at("tls_"),
                &DownstreamTlsFields {
                    listen: env("tls_listen", &relay.tls_listen)?,
                    cert_file: env("tls_cert_file", &relay.tls_cert_file)?,
                    key_file: env("tls_key_file", &relay.tls_key_file)?,
                    ca_cert_file: env("tls_ca_cert_file", &relay.tls_ca_cert_file)?,
                    auth_clients: relay.tls_auth_clients.clone(),
                },
            )?;
            let mut snapshot = resolved.snapshot;
            snapshot.password = match &relay.snapshot_source_password {
                Some(p) => Some(substitute_env(&at("snapshot_source_password"), p)?),
                None => None,
            };
            relays.push(RelayConfig {
                name: relay.name.clone(),
                upstream_tls,
                tls,
                upstream: check_upstream(
                    &at("upstream.addr"),
                    &substitute_env(&at("upstream.addr"), &relay.upstream.addr)?,
                )?,
                upstream_user: user,
                upstream_password: password,
                listen: parse_listen(&at("listen"), &relay.listen)?,
                dir,
                log: resolved.log,
                repl_timeout: resolved.repl_timeout,
                downstream_eof_form: resolved.downstream_eof_form,
                pubsub_output_limit: resolved.pubsub_output_limit,
                maxclients: resolved.maxclients,
                timeout: resolved.timeout,
                requirepass: match &relay.requirepass {
                    Some(p) => Some(substitute_env(&at("requirepass"), p)?),
                    None => None,
                },
                history_reset: resolved.history_reset,
                history_reset_min_key_ratio: resolved.history_reset_min_key_ratio,
                replicaof: resolved.replicaof,
                upstream_ack: resolved.upstream_ack,
                ack_replicas: resolved.ack_replicas,
                snapshot,
            });
        }
        let metrics_auth = match parsed.metrics.as_ref().and_then(|m| m.auth.as_ref()) {
            None => None,
            Some(text) => {
                let value = substitute_env("metrics.auth", text)?;
                Some(crate::metrics::http::MetricsAuth::parse(&value).ok_or_else(|| {
                    field_error("metrics.auth", "<redacted>", "expected bearer:TOKEN or basic:USER:PASSWORD")
                })?)
            }
        };
        let config = Config { metrics, metrics_auth, relays };
        config.validate()?;
        Ok(config)
    }

    /// Cross-relay checks: at least one relay, unique names, listen addresses and directories.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.relays.is_empty() {
            return Err(field_error("relays", "[]", "at least one relay is required"));
        }
        let listen_addrs = |r: &RelayConfig| [Some(r.listen), r.tls.as_ref().map(|t| t.listen)].into_iter();
        for (i, relay) in self.relays.iter().enumerate() {
            if let Some(tls) = relay.tls.as_ref().filter(|tls| tls.listen == relay.listen) {
                return Err(field_error(&format!("relays[{i}].tls_listen"), &tls.listen.to_string(), "same as listen"));
            }
            for (j, other) in self.relays[..i].iter().enumerate() {
                if relay.name == other.name {
                    return Err(field_error(
                        &format!("relays[{i}].name"),
                        &relay.name,
                        &format!("duplicate of relays[{j}].name"),
                    ));
                }
                if relay.listen == other.listen {
                    return Err(field_error(
                        &format!("relays[{i}].listen"),
                        &relay.listen.to_string(),
                        &format!("duplicate of relays[{j}].listen"),
                    ));
                }
                // Equal plain listen addresses were refused above: a clash here is a TLS listener's.
                if let Some(addr) = listen_addrs(relay).flatten().find(|a| listen_addrs(other).any(|b| b == Some(*a))) {
                    return Err(field_error(
                        &format!("relays[{i}].tls_listen"),
                        &addr.to_string(),
                        &format!("already a listen address of relays[{j}]"),
                    ));
                }
                if relay.dir == other.dir {
                    return Err(field_error(
                        &format!("relays[{i}].dir"),
                        &relay.dir.display().to_string(),
                        &format!("duplicate of relays[{j}].dir"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_use_redis_units() {
        assert_eq!(parse_size("64mb"), Some(64 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("1k"), Some(1000));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("12xb"), None);
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("soon"), None);
    }

    #[test]
    fn yaml_parses_with_defaults_and_env() {
        std::env::set_var("RELAY_TEST_PW", "s3cret");
        let config = Config::from_yaml(
            "metrics: {listen: 127.0.0.1:9121}\ndata_dir: /var/lib/relay\ndefaults: {log_size: 128mb}\nrelays:\n  - name: a\n    upstream: {addr: 127.0.0.1:6379, password: \"${RELAY_TEST_PW}\"}\n    listen: 127.0.0.1:7000\n",
        )
        .unwrap();
        let relay = &config.relays[0];
        assert_eq!(relay.dir, PathBuf::from("/var/lib/relay/a"));
        assert_eq!(relay.log.retention, 128 << 20);
        assert_eq!(relay.log.fsync, FsyncPolicy::EverySec);
        assert_eq!(relay.upstream_password.as_deref(), Some("s3cret"));
        assert_eq!(relay.repl_timeout, DEFAULT_REPL_TIMEOUT);
        assert_eq!(relay.history_reset, HistoryResetPolicy::Hold);
        assert_eq!(relay.history_reset_min_key_ratio, 0.5);
        assert_eq!(relay.replicaof, ReplicaofPolicy::Allow);
        assert_eq!(relay.upstream_ack, AckMode::Fack);
        assert_eq!(relay.log.max_size, 256 << 20, "log_max_size defaults to twice log_size");
        assert_eq!(relay.snapshot, SnapshotSourcing::default());
        let config = Config::from_yaml(
            "relays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', dir: /x, snapshot_sources: [master], snapshot_min_interval: 1h, snapshot_source_exclude: ['10.0.0.1:6379'], snapshot_source_password: pw, log_max_size: 3gb}\n",
        )
        .unwrap();
        let relay = &config.relays[0];
        assert_eq!(relay.snapshot.sources, vec![SnapshotSource::Master]);
        assert_eq!(relay.snapshot.master_min_interval, Duration::from_secs(3600));
        assert_eq!(relay.snapshot.exclude, vec!["10.0.0.1:6379".to_string()]);
        assert_eq!(relay.snapshot.password.as_deref(), Some("pw"));
        assert_eq!(relay.log.max_size, 3 << 30);
    }

    #[test]
    fn lifecycle_settings_parse_and_inherit() {
        let config = Config::from_yaml(
            "data_dir: /d\ndefaults: {history_reset: follow, upstream_ack: durable}\nrelays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', replicaof: deny, history_reset_min_key_ratio: 0.2}\n",
        )
        .unwrap();
        let relay = &config.relays[0];
        assert_eq!(relay.history_reset, HistoryResetPolicy::Follow);
        assert_eq!(relay.history_reset_min_key_ratio, 0.2);
        assert_eq!(relay.replicaof, ReplicaofPolicy::Deny);
        assert_eq!(relay.upstream_ack, AckMode::Durable);
        assert_eq!(relay.ack_replicas, 0);
        let config = Config::from_yaml(
            "data_dir: /d\nrelays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', ack_replicas: 2}\n",
        )
        .unwrap();
        assert_eq!(config.relays[0].ack_replicas, 2);
        let err = Config::from_yaml(
            "data_dir: /d\nrelays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', ack_replicas: some}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("ack_replicas"), "{err}");
    }

    #[test]
    fn pubsub_output_limit_is_inherited_and_checked() {
        let yaml = |own: &str| {
            format!(
                "data_dir: /d\ndefaults: {{client_output_buffer_limit_pubsub: '1mb 0 0'}}\nrelays:\n  - {{name: a, upstream: {{addr: 'h:1'}}, listen: '127.0.0.1:1'{own}}}\n"
            )
        };
        let config = Config::from_yaml(&yaml("")).unwrap();
        assert_eq!(
            config.relays[0].pubsub_output_limit,
            OutputBufferLimit { hard: 1 << 20, soft: 0, soft_seconds: Duration::ZERO }
        );
        let err = Config::from_yaml(&yaml(", client_output_buffer_limit_pubsub: '32mb'")).unwrap_err().to_string();
        assert!(err.contains("relays[0].client_output_buffer_limit_pubsub") && err.contains("32mb"), "{err}");
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let err = Config::from_yaml(
            "data_dir: /d\nrelays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1'}\n  - {name: b, upstream: {addr: 'h:1'}, listen: '127.0.0.1:2', log_size: lots}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("relays[1].log_size") && err.contains("lots"), "{err}");
        let err = Config::from_yaml(
            "relays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', dir: /x, colour: red}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("colour"), "{err}");
        let err = Config::from_yaml(
            "data_dir: /d\nrelays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1'}\n  - {name: a, upstream: {addr: 'h:2'}, listen: '127.0.0.1:2'}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("relays[1].name") && err.contains("duplicate"), "{err}");
    }

    fn error_of(yaml: &str) -> String {
        Config::from_yaml(yaml).unwrap_err().to_string()
    }

    #[test]
    fn tls_settings_parse_with_redis_names_and_errors_name_the_field() {
        let relay = |extra: &str| {
            format!(
                "data_dir: /d\nrelays:\n  - {{name: a, listen: '127.0.0.1:7000', upstream: {{addr: 'h:1'{extra}}}}}\n"
            )
        };
        let config = Config::from_yaml(&relay(", tls: yes, tls_ca_cert_file: /ca.crt")).unwrap();
        let tls = config.relays[0].upstream_tls.clone().expect("upstream TLS");
        assert_eq!((tls.ca_cert_file, tls.cert_file), (PathBuf::from("/ca.crt"), None));
        let config = Config::from_yaml(&relay(", tls: true, tls_ca_cert_file: /ca.crt, tls_server_name: m")).unwrap();
        assert_eq!(config.relays[0].upstream_tls.as_ref().and_then(|t| t.server_name.as_deref()), Some("m"));
        let message = error_of(&relay(", tls: yes"));
        assert!(message.contains("relays[0].upstream.tls_ca_cert_file"), "{message}");
        let message = error_of(&relay(", tls: maybe"));
        assert!(message.contains("relays[0].upstream.tls") && message.contains("maybe"), "{message}");
        let message = error_of(&relay(", tls_ca_cert_file: /ca.crt"));
        assert!(message.contains("TLS is off"), "{message}");

        let listener = |extra: &str| {
            format!("data_dir: /d\nrelays:\n  - {{name: a, listen: '127.0.0.1:7000', upstream: {{addr: 'h:1'}}, tls_listen: '127.0.0.1:7001', tls_cert_file: /c, tls_key_file: /k{extra}}}\n")
        };
        let config = Config::from_yaml(&listener(", tls_auth_clients: no")).unwrap();
        let tls = config.relays[0].tls.clone().expect("TLS listener");
        assert_eq!((tls.listen.port(), tls.auth_clients), (7001, ClientAuth::No));
        let message = error_of(&listener(""));
        assert!(message.contains("relays[0].tls_ca_cert_file"), "auth_clients yes needs a CA: {message}");
        let message = error_of(&listener(", tls_ca_cert_file: /ca, tls_auth_clients: sometimes"));
        assert!(message.contains("relays[0].tls_auth_clients") && message.contains("sometimes"), "{message}");
        let message = error_of(&listener(", tls_auth_clients: no").replace("7001", "7000"));
        assert!(message.contains("relays[0].tls_listen") && message.contains("same as listen"), "{message}");
    }

    #[test]
    fn each_invalid_case_has_its_own_message() {
        let base = "data_dir: /d\nrelays:\n";
        let cases: &[(&str, &[&str])] = &[
            ("  - {name: a, upstream: {addr: 'h:1', adr: x}, listen: '127.0.0.1:1'}\n", &["relays[0].upstream", "adr"]),
            ("  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', log_size: 12xb}\n", &["relays[0].log_size", "12xb"]),
            ("  - {name: a, listen: '127.0.0.1:1'}\n", &["relays[0]", "upstream"]),
            (
                "  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1'}\n  - {name: b, upstream: {addr: 'h:2'}, listen: '127.0.0.1:1'}\n",
                &["relays[1].listen", "127.0.0.1:1", "duplicate"],
            ),
            ("  - {name: a, upstream: {addr: 'h:1', password: '${RELAY_TEST_SURELY_UNSET}'}, listen: '127.0.0.1:1'}\n", &["relays[0].upstream.password", "RELAY_TEST_SURELY_UNSET"]),
            ("  - {name: a, upstream: {addr: 'nohost'}, listen: '127.0.0.1:1'}\n", &["relays[0].upstream.addr", "nohost"]),
            ("  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', appendfsync: sometimes}\n", &["relays[0].appendfsync", "sometimes"]),
            ("  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', history_reset: wipe}\n", &["relays[0].history_reset", "wipe", "hold or follow"]),
            ("  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', history_reset_min_key_ratio: '1.5'}\n", &["relays[0].history_reset_min_key_ratio", "1.5"]),
            ("  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', replicaof: maybe}\n", &["relays[0].replicaof", "maybe", "allow or deny"]),
            ("  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', upstream_ack: all}\n", &["relays[0].upstream_ack", "all", "fack or durable"]),
            ("  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', snapshot_sources: [replicas, disk]}\n", &["relays[0].snapshot_sources", "disk"]),
            ("  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', log_size: 1gb, log_max_size: 1mb}\n", &["relays[0].log_max_size", "1mb"]),
            ("  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', snapshot_source_exclude: [nope]}\n", &["relays[0].snapshot_source_exclude[0]", "nope"]),
            ("  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', snapshot_min_interval: often}\n", &["relays[0].snapshot_min_interval", "often"]),
        ];
        for (relays, needles) in cases {
            let message = error_of(&format!("{base}{relays}"));
            for needle in *needles {
                assert!(message.contains(needle), "{message:?} should contain {needle:?}");
            }
        }
        let message = error_of("relays: []\n");
        assert!(message.contains("relays") && message.contains("at least one"), "{message}");
        let message = error_of("defaults: {log_sise: 1mb}\nrelays: []\n");
        assert!(message.contains("defaults.log_sise"), "{message}");
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, "relays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: 'nope', dir: /x}\n").unwrap();
        let message = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            message.contains("relay.yaml") && message.contains("relays[0].listen") && message.contains("nope"),
            "{message}"
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/relay.example.yaml");
        let config = Config::from_file(&path).unwrap();
        assert!(!config.relays.is_empty());
    }
}
