//! Configuration: one pipeline from the YAML file and the command line to one [`Config`] (a list of
//! relays, so one process can relay several masters).
//!
//! The file is read into [`RelaySettings`] layers (the top-level `defaults` and each entry of
//! `relays`); the command line gives one more layer ([`Overrides`]), merged over the file: a flag
//! wins over the relay's own field, which wins over `defaults`, which wins over the defaults of
//! [`DEFAULTS`] (the one place they are written). [`Config::load`] resolves the layers and runs the
//! one validation pass. Without a file, the flags describe one relay named `default`.
//!
//! Sizes and durations use Redis's units ([`Size`], [`Duration`]): a bare number is bytes or
//! seconds as in redis.conf, `64mb` is 64 × 1024², `1gb` 1024³, `1m` 10⁶; `10s`, `5m`, `500ms`.
//! Booleans take `yes`, `no`, `true`, `false`. `${VAR}` is replaced in every value of the file; an
//! unset variable is an error. Every error names the file, the field path
//! (`relays[2].upstream.addr`, or the flag `--upstream`) and the value.

mod units;

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::downstream::pubsub::OutputBufferLimit;
use crate::downstream::users::{PasswordDigest, Role, Roles, User};
use crate::downstream::ReplicaofPolicy;
use crate::log::{FsyncPolicy, LogOptions};
use crate::tls::{ClientAuth, DownstreamTls, UpstreamTls};
use crate::upstream::history::{HistoryResetPolicy, DEFAULT_MIN_KEY_RATIO};
use crate::upstream::AckMode;

pub(crate) use units::parse_size;
pub use units::{Duration, List, Size, Text, YesNo};

/// The defaults of every setting, in one place (redis-server's where it has the setting).
pub struct Defaults {
    pub log_size: u64,
    pub log_memory: u64,
    pub log_segment_size: u64,
    pub appendfsync: FsyncPolicy,
    pub repl_timeout: std::time::Duration,
    pub repl_diskless_sync: bool,
    pub history_reset: HistoryResetPolicy,
    pub history_reset_min_key_ratio: f64,
    pub replicaof: ReplicaofPolicy,
    pub upstream_ack: AckMode,
    pub ack_replicas: usize,
    pub client_output_buffer_limit_pubsub: OutputBufferLimit,
    pub snapshot_sources: &'static [SnapshotSource],
    /// Least time between two snapshot fetches from the master (as XPipe's keeper spaces its dumps).
    pub snapshot_min_interval: std::time::Duration,
    pub maxclients: u64,
    pub timeout: std::time::Duration,
    /// redis-server's is 0 (off); README "Security" says why the relay's is not.
    pub maxmemory_clients: u64,
    pub client_query_buffer_limit: u64,
    /// `tls_auth_clients`: redis-server's `tls-auth-clients yes`.
    pub tls_auth_clients: ClientAuth,
    /// The RDB version guard's backoff for a replica caught in a full-sync loop, doubling up to
    /// the max (no redis-server setting: the relay's own).
    pub replica_resync_backoff: std::time::Duration,
    pub replica_resync_backoff_max: std::time::Duration,
    /// The relay name when the flags describe the only relay.
    pub name: &'static str,
}

pub const DEFAULTS: Defaults = Defaults {
    log_size: 1 << 30,
    // redis-server's default hard output-buffer limit for a replica (`client-output-buffer-limit
    // replica 256mb`): a master already holds that much for each slow replica; the relay holds it once
    // for all of them, and only while some replica has not acknowledged it.
    log_memory: 256 << 20,
    log_segment_size: 64 << 20,
    appendfsync: FsyncPolicy::EverySec,
    repl_timeout: std::time::Duration::from_secs(60),
    repl_diskless_sync: false,
    history_reset: HistoryResetPolicy::Hold,
    history_reset_min_key_ratio: DEFAULT_MIN_KEY_RATIO,
    replicaof: ReplicaofPolicy::Allow,
    upstream_ack: AckMode::Fack,
    ack_replicas: 0,
    client_output_buffer_limit_pubsub: OutputBufferLimit::PUBSUB_DEFAULT,
    snapshot_sources: &[SnapshotSource::Replicas, SnapshotSource::Master],
    snapshot_min_interval: std::time::Duration::from_secs(15 * 60),
    maxclients: crate::limits::DEFAULT_MAXCLIENTS,
    timeout: std::time::Duration::ZERO,
    maxmemory_clients: crate::downstream::memory::DEFAULT_MAXMEMORY_CLIENTS,
    client_query_buffer_limit: crate::downstream::memory::DEFAULT_QUERY_BUFFER_LIMIT,
    tls_auth_clients: ClientAuth::Yes,
    replica_resync_backoff: std::time::Duration::from_secs(30),
    replica_resync_backoff_max: std::time::Duration::from_secs(30 * 60),
    name: "default",
};

/// redis-server refuses a `client-query-buffer-limit` under 1mb.
pub const MIN_QUERY_BUFFER_LIMIT: u64 = 1 << 20;

/// The smallest log the relay runs with, and the smallest segment file.
const MIN_LOG_SIZE: u64 = 16 * 1024;
const MIN_SEGMENT_SIZE: u64 = 64 * 1024;

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
    pub master_min_interval: std::time::Duration,
}

impl Default for SnapshotSourcing {
    fn default() -> Self {
        SnapshotSourcing {
            sources: DEFAULTS.snapshot_sources.to_vec(),
            exclude: Vec::new(),
            password: None,
            master_min_interval: DEFAULTS.snapshot_min_interval,
        }
    }
}

/// Parses a `replicas,master` list; an empty or repeated entry is an error.
fn parse_sources(items: &[String]) -> Result<Vec<SnapshotSource>, String> {
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
    /// The file could not be read or is not the expected YAML (serde's message has the field path
    /// and the line).
    #[error("{file}: {message}")]
    File { file: String, message: String },
    /// A value refused after parsing; `file` is `None` for a flag.
    #[error("{}", render_field_error(file.as_deref(), field, value.as_deref(), message))]
    Field { file: Option<String>, field: String, value: Option<String>, message: String },
}

fn render_field_error(file: Option<&str>, field: &str, value: Option<&str>, message: &str) -> String {
    let mut text = String::new();
    if let Some(file) = file {
        text.push_str(file);
        text.push_str(": ");
    }
    text.push_str(field);
    text.push_str(": ");
    text.push_str(message);
    if let Some(value) = value {
        text.push_str(&format!(" (value: {value:?})"));
    }
    text
}

fn field_error(field: &str, value: &str, message: &str) -> ConfigError {
    ConfigError::Field {
        file: None,
        field: field.to_string(),
        value: Some(value.to_string()),
        message: message.to_string(),
    }
}

/// An error about a field that has no value to show (a missing one, or a secret).
fn field_error_without_value(field: &str, message: &str) -> ConfigError {
    ConfigError::Field { file: None, field: field.to_string(), value: None, message: message.to_string() }
}

/// Everything one process runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub metrics: Option<SocketAddr>,
    /// Credentials `/metrics` requires (`metrics.auth`: `bearer:TOKEN` or `basic:USER:PASSWORD`).
    pub metrics_auth: Option<crate::metrics::http::MetricsAuth>,
    /// HTTPS for `/metrics` (`metrics.tls_cert_file` and `tls_key_file`, optionally
    /// `tls_ca_cert_file` to require client certificates).
    pub metrics_tls: Option<MetricsTls>,
    /// Worker threads of the runtime that serves every relay's clients and replicas (`threads`).
    pub threads: usize,
    /// How the kernel schedules those threads beside the master (`fanout_priority`).
    pub fanout_priority: FanoutPriority,
    pub relays: Vec<RelayConfig>,
}

/// Most worker threads `threads` may ask for.
const MAX_THREADS: usize = 256;

/// The default `threads`: one worker per four CPUs, at least one. A relay is a sidecar beside a
/// master on the same host; the master's clients pay for every core its fan-out takes (measured on
/// 2 CPUs with 32 replicas: the master's write burst took 1.65 s with two workers, 1.49 s with one,
/// and the relay's peak RSS fell from 135 to 79 MB, at the same delivery time).
pub fn default_threads(cpus: usize) -> usize {
    (cpus / 4).max(1)
}

/// `threads` from the flag or the file: a number of worker threads, or `auto` for the default.
fn resolve_threads(flag: Option<&Text>, file: Option<&Text>) -> Result<usize, ConfigError> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (value, field) = match (flag, file) {
        (Some(value), _) => (value, "--threads"),
        (None, Some(value)) => (value, "threads"),
        (None, None) => return Ok(default_threads(cpus)),
    };
    match value.as_str() {
        "auto" => Ok(default_threads(cpus)),
        text => match text.parse::<usize>() {
            Ok(n @ 1..=MAX_THREADS) => Ok(n),
            _ => {
                Err(field_error(field, text, &format!("expected auto or a number of threads from 1 to {MAX_THREADS}")))
            }
        },
    }
}

/// How the kernel schedules the threads that serve clients and replicas (the runtime's workers
/// and its blocking pool, where the disk tier's reads and `sendfile`s run): `fanout_priority`.
/// The upstream link and the log writers always keep the normal priority, so reading the master
/// never waits behind the fan-out, whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanoutPriority {
    /// The kernel's default (`SCHED_OTHER`, nice 0): the fan-out competes with the master as an equal.
    Normal,
    /// `SCHED_OTHER` at nice 19: the fan-out gets a small share of a CPU the master wants, never
    /// none.
    Low,
    /// `SCHED_IDLE`: the fan-out runs on the CPU time that nothing else on the host wants, so a
    /// master's write burst on the same host runs first and the replicas catch up after it (from
    /// the memory tail, or from disk). While the host's CPUs are full, the replicas, client
    /// commands (Sentinel's too) and `/metrics` wait until they are not.
    Idle,
}

impl FanoutPriority {
    pub fn as_str(self) -> &'static str {
        match self {
            FanoutPriority::Normal => "normal",
            FanoutPriority::Low => "low",
            FanoutPriority::Idle => "idle",
        }
    }
}

/// The default `fanout_priority` (see [`FanoutPriority`] and the README's benchmark figures): `low`,
/// not `idle`. A `SCHED_IDLE` fan-out gets nothing while normal tasks fill every CPU: under the test
/// suite's load a relay then missed a Sentinel repoint for 30 s. At nice 19 it still gets a small
/// share, and the master's write bursts measured the same.
pub const DEFAULT_FANOUT_PRIORITY: FanoutPriority = FanoutPriority::Low;

/// `fanout_priority` from the flag or the file.
fn resolve_fanout_priority(flag: Option<&Text>, file: Option<&Text>) -> Result<FanoutPriority, ConfigError> {
    let (value, field) = match (flag, file) {
        (Some(value), _) => (value, "--fanout-priority"),
        (None, Some(value)) => (value, "fanout_priority"),
        (None, None) => return Ok(DEFAULT_FANOUT_PRIORITY),
    };
    match value.as_str() {
        "normal" => Ok(FanoutPriority::Normal),
        "low" => Ok(FanoutPriority::Low),
        "idle" => Ok(FanoutPriority::Idle),
        text => Err(field_error(field, text, "expected normal, low or idle")),
    }
}

/// The metrics endpoint's certificate, key and optional client CA (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// With it, a scraper must present a certificate that chains to this CA.
    pub ca_cert_file: Option<PathBuf>,
}

impl MetricsTls {
    /// The settings of the rustls acceptor the endpoint shares with the relays' TLS listeners.
    pub fn acceptor_settings(&self, listen: SocketAddr) -> DownstreamTls {
        DownstreamTls {
            listen,
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            ca_cert_file: self.ca_cert_file.clone(),
            auth_clients: if self.ca_cert_file.is_some() { ClientAuth::Yes } else { ClientAuth::No },
        }
    }
}

/// Checks the metrics endpoint's TLS files (each with the field that set it).
fn metrics_tls(
    cert: Option<Sourced<String>>,
    key: Option<Sourced<String>>,
    ca: Option<Sourced<String>>,
    metrics: Option<&Sourced<SocketAddr>>,
) -> Result<Option<MetricsTls>, ConfigError> {
    match (cert, key) {
        (None, None) => match ca {
            Some(ca) => Err(field_error(&ca.field, &ca.value, "a client CA needs the endpoint's cert and key files")),
            None => Ok(None),
        },
        (Some(cert), Some(key)) => match metrics {
            None => Err(field_error(&cert.field, &cert.value, "TLS files are set but there is no metrics endpoint")),
            Some(_) => Ok(Some(MetricsTls {
                cert_file: cert.value.into(),
                key_file: key.value.into(),
                ca_cert_file: ca.map(|c| c.value.into()),
            })),
        },
        (Some(cert), None) => Err(field_error(
            &cert.field.replace("cert", "key"),
            "",
            &format!("the certificate {} needs its key file", cert.value),
        )),
        (None, Some(key)) => Err(field_error(
            &key.field.replace("key", "cert"),
            "",
            &format!("the key {} needs its certificate file", key.value),
        )),
    }
}

/// One relay: one master upstream, one listen address, one data directory.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    pub name: String,
    pub upstream: String,
    pub upstream_user: Option<String>,
    pub upstream_password: Option<String>,
    /// The plain listener; `None` when the relay listens only with TLS (`tls_listen`).
    pub listen: Option<SocketAddr>,
    pub dir: PathBuf,
    pub log: LogOptions,
    pub repl_timeout: std::time::Duration,
    /// Serve full syncs in the EOF-marked form to replicas that announce `capa eof` (Redis's
    /// `repl-diskless-sync`); otherwise the `$<len>` form.
    pub downstream_eof_form: bool,
    /// The password clients and replicas must give with `AUTH` (like redis.conf `requirepass`), so
    /// replicas configured with `masterauth` for a protected master can use the relay too.
    pub requirepass: Option<String>,
    /// Named users with roles (`users:`, `--user`); `requirepass` stays the `default` user's.
    pub users: Vec<User>,
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
    pub timeout: std::time::Duration,
    /// Total memory of the clients' buffers (redis.conf `maxmemory-clients`); past it the biggest
    /// clients are evicted. Zero is off.
    pub maxmemory_clients: u64,
    /// One client's query buffer plus MULTI queue (redis.conf `client-query-buffer-limit`).
    pub client_query_buffer_limit: u64,
    /// `REPLCONF version <v>` sent to the master (`upstream.announce_version`), so a Valkey 9 master
    /// writes the RDB format the relay's replicas load; `None` sends nothing.
    pub upstream_announce_version: Option<String>,
    /// The RDB version guard's backoff for a replica caught in a full-sync loop
    /// (`replica_resync_backoff`, doubling up to `replica_resync_backoff_max`); zero turns the loop
    /// detection off.
    pub replica_resync_backoff: std::time::Duration,
    pub replica_resync_backoff_max: std::time::Duration,
}

impl RelayConfig {
    /// The port the relay announces to its master (`REPLCONF listening-port`): the plain
    /// listener's, or the TLS one's when that is the only one (as a redis-server with
    /// `tls-replication yes` announces its `tls-port`).
    pub fn announced_port(&self) -> u16 {
        self.listen.or(self.tls.as_ref().map(|tls| tls.listen)).map_or(0, |addr| addr.port())
    }

    /// The address `CONFIG GET bind` shows: the plain listener's, else the TLS one's.
    pub fn bind_addr(&self) -> Option<SocketAddr> {
        self.listen.or(self.tls.as_ref().map(|tls| tls.listen))
    }
}

/// The `upstream` block of one layer. The flags spell these `--upstream` (the address),
/// `--upstream-user`, `--upstream-tls-ca-cert-file`, ...
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    pub addr: Option<Text>,
    pub user: Option<Text>,
    pub password: Option<Text>,
    pub tls: Option<YesNo>,
    pub tls_ca_cert_file: Option<Text>,
    pub tls_cert_file: Option<Text>,
    pub tls_key_file: Option<Text>,
    pub tls_server_name: Option<Text>,
    /// `REPLCONF version` to announce (`x.y.z`).
    pub announce_version: Option<Text>,
}

/// One layer of a relay's settings: the file's `defaults`, one entry of `relays`, or the command
/// line. Every field is optional here; [`Config::load`] picks the first layer that sets it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    pub name: Option<Text>,
    pub upstream: Option<UpstreamSettings>,
    pub listen: Option<Text>,
    pub dir: Option<Text>,
    pub requirepass: Option<Text>,
    pub tls_listen: Option<Text>,
    pub tls_cert_file: Option<Text>,
    pub tls_key_file: Option<Text>,
    pub tls_ca_cert_file: Option<Text>,
    pub tls_auth_clients: Option<Text>,
    pub snapshot_source_password: Option<Text>,
    pub log_size: Option<Size>,
    pub log_memory: Option<Size>,
    pub log_segment_size: Option<Size>,
    pub log_max_size: Option<Size>,
    pub log_max_age: Option<Duration>,
    pub appendfsync: Option<Text>,
    pub repl_timeout: Option<Duration>,
    pub repl_diskless_sync: Option<YesNo>,
    pub history_reset: Option<Text>,
    pub history_reset_min_key_ratio: Option<Text>,
    pub replicaof: Option<Text>,
    pub upstream_ack: Option<Text>,
    pub ack_replicas: Option<Text>,
    pub client_output_buffer_limit_pubsub: Option<Text>,
    pub snapshot_sources: Option<List>,
    pub snapshot_source_exclude: Option<List>,
    pub snapshot_min_interval: Option<Duration>,
    pub maxclients: Option<Text>,
    pub timeout: Option<Duration>,
    pub maxmemory_clients: Option<Size>,
    pub client_query_buffer_limit: Option<Size>,
    pub replica_resync_backoff: Option<Duration>,
    pub replica_resync_backoff_max: Option<Duration>,
    pub users: Option<Vec<UserSettings>>,
}

/// One entry of `users:` (the flag `--user NAME:ROLES:PASSWORD` gives the same three).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSettings {
    pub name: Option<Text>,
    pub password: Option<Text>,
    /// A file holding the password; one trailing newline is not part of it.
    pub password_file: Option<Text>,
    pub role: Option<Text>,
    pub roles: Option<List>,
}

impl UserSettings {
    /// `--user NAME:ROLES:PASSWORD`: ROLES is one role or several joined by commas
    /// (`monitor,admin`); the password is everything after the second colon. `None` when the
    /// text has fewer than three parts.
    pub fn from_flag(text: &str) -> Option<UserSettings> {
        let mut parts = text.splitn(3, ':');
        let (name, roles, password) = (parts.next()?, parts.next()?, parts.next()?);
        Some(UserSettings {
            name: Some(Text(name.to_string())),
            password: Some(Text(password.to_string())),
            password_file: None,
            role: None,
            roles: Some(List(roles.split(',').map(str::to_string).collect())),
        })
    }
}

/// The top-level `metrics` block (`--metrics`, `--metrics-auth`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    pub listen: Option<Text>,
    pub auth: Option<Text>,
    pub tls_cert_file: Option<Text>,
    pub tls_key_file: Option<Text>,
    pub tls_ca_cert_file: Option<Text>,
}

/// The command line's layer, merged over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub metrics: MetricsSettings,
    pub relay: RelaySettings,
    /// `--threads`.
    pub threads: Option<Text>,
    /// `--fanout-priority`.
    pub fanout_priority: Option<Text>,
}

/// The YAML file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    metrics: MetricsSettings,
    #[serde(default)]
    threads: Option<Text>,
    #[serde(default)]
    fanout_priority: Option<Text>,
    #[serde(default)]
    data_dir: Option<Text>,
    #[serde(default)]
    defaults: RelaySettings,
    relays: Vec<RelaySettings>,
}

/// Where a layer comes from: it names the fields of its errors.
#[derive(Debug, Clone, Copy)]
enum Place {
    Flags,
    Defaults,
    Relay(usize),
}

impl Place {
    /// The field's name as this source spells it: `--upstream-tls`, `defaults.log_size`,
    /// `relays[2].upstream.addr`.
    fn field(self, name: &str) -> String {
        match self {
            Place::Flags => {
                let flag = name.replace(['.', '_'], "-");
                match flag.as_str() {
                    "upstream-addr" => "--upstream".to_string(),
                    "metrics-listen" => "--metrics".to_string(),
                    _ => format!("--{flag}"),
                }
            }
            Place::Defaults => format!("defaults.{name}"),
            Place::Relay(i) => format!("relays[{i}].{name}"),
        }
    }
}

/// A value with the field path it came from.
#[derive(Debug, Clone)]
struct Sourced<T> {
    value: T,
    field: String,
}

/// The layers of one relay, first wins.
struct Layers<'a> {
    layers: Vec<(&'a RelaySettings, Place)>,
}

impl Layers<'_> {
    fn pick<T: Clone>(&self, name: &str, get: impl Fn(&RelaySettings) -> Option<&T>) -> Option<Sourced<T>> {
        self.layers.iter().find_map(|(settings, place)| {
            get(settings).map(|value| Sourced { value: value.clone(), field: place.field(name) })
        })
    }

    fn text(&self, name: &str, get: impl Fn(&RelaySettings) -> Option<&Text>) -> Option<Sourced<String>> {
        self.pick(name, get).map(|s| Sourced { value: s.value.0, field: s.field })
    }

    fn upstream_text(&self, name: &str, get: impl Fn(&UpstreamSettings) -> Option<&Text>) -> Option<Sourced<String>> {
        self.text(&format!("upstream.{name}"), |s| s.upstream.as_ref().and_then(&get))
    }

    /// The relay's own field path for `name` (where a missing required field belongs).
    fn own_field(&self, name: &str) -> String {
        self.layers
            .iter()
            .rev()
            .find(|(_, place)| !matches!(place, Place::Defaults))
            .map_or_else(|| Place::Flags.field(name), |(_, place)| place.field(name))
    }
}

/// Parses a text setting with `parse`; a refusal names the field, the value and what is expected.
fn parse_with<T>(
    value: Option<Sourced<String>>,
    default: T,
    parse: impl Fn(&str) -> Option<T>,
    expected: &str,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(default),
        Some(Sourced { value, field }) => parse(&value).ok_or_else(|| field_error(&field, &value, expected)),
    }
}

/// Checks a user name as redis-server does (no spaces), and keeps `default` for `requirepass`.
fn check_user_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.bytes().any(|b| !(b'!'..=b'~').contains(&b)) {
        return Err(field_error(field, name, "a user name is printable ASCII without spaces"));
    }
    if name == "default" {
        return Err(field_error(field, name, "the default user's password is requirepass; name this user otherwise"));
    }
    Ok(())
}

/// Parses role names (`replica`, `monitor`, `admin`); at least one.
fn parse_roles(field: &str, names: &[String]) -> Result<Roles, ConfigError> {
    if names.is_empty() {
        return Err(field_error(field, "[]", "a user needs at least one role: replica, monitor or admin"));
    }
    let mut roles = Vec::new();
    for name in names {
        roles.push(Role::parse(name).ok_or_else(|| field_error(field, name, "expected replica, monitor or admin"))?);
    }
    Ok(Roles::from_list(&roles))
}

/// Reads a password file; one trailing newline (`\n` or `\r\n`) is not part of the password.
fn read_password_file(field: &str, path: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| field_error(field, path, &format!("cannot read: {e}")))?;
    let password = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    Ok(password.to_string())
}

/// The relay's users, from the first layer that has `users` (the flags' `--user`s, the relay's
/// own, or `defaults`). Errors name `relays[0].users[1].role`, or `--user` for the flags.
fn resolve_users(layers: &Layers) -> Result<Vec<User>, ConfigError> {
    let Some(Sourced { value: entries, field }) = layers.pick("users", |s| s.users.as_ref()) else {
        return Ok(Vec::new());
    };
    let from_flags = field.starts_with("--");
    let at = |i: usize, name: &str| if from_flags { "--user".to_string() } else { format!("{field}[{i}].{name}") };
    let mut users: Vec<User> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let Some(Text(name)) = &entry.name else {
            return Err(field_error_without_value(&at(i, "name"), "required"));
        };
        check_user_name(&at(i, "name"), name)?;
        let password = match (&entry.password, &entry.password_file) {
            (Some(Text(password)), None) => password.clone(),
            (None, Some(Text(path))) => read_password_file(&at(i, "password_file"), path)?,
            _ => {
                return Err(field_error_without_value(
                    &at(i, "password"),
                    "give exactly one of password and password_file",
                ))
            }
        };
        if password.is_empty() {
            return Err(field_error_without_value(&at(i, "password"), "the password is empty"));
        }
        let roles = match (&entry.role, &entry.roles) {
            (Some(Text(role)), None) => parse_roles(&at(i, "role"), std::slice::from_ref(role))?,
            (None, Some(List(list))) => parse_roles(&at(i, "roles"), list)?,
            _ => return Err(field_error_without_value(&at(i, "role"), "give exactly one of role and roles")),
        };
        if let Some(j) = users.iter().position(|other| other.name == *name) {
            return Err(field_error(&at(i, "name"), name, &format!("duplicate of user {j}")));
        }
        users.push(User { name: name.clone(), password: PasswordDigest::of(password.as_bytes()), roles });
    }
    Ok(users)
}

/// Parses `history_reset_min_key_ratio`: a fraction from 0 to 1.
fn parse_ratio(text: &str) -> Option<f64> {
    text.trim().parse::<f64>().ok().filter(|r| (0.0..=1.0).contains(r))
}

fn parse_listen(field: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| field_error(field, text, "expected HOST:PORT with an IP address, e.g. 127.0.0.1:6380"))
}

fn check_host_port(field: &str, text: &str) -> Result<String, ConfigError> {
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(text.to_string()),
        _ => Err(field_error(field, text, "expected HOST:PORT")),
    }
}

/// A relay name becomes a directory under `data_dir` and a metrics label: letters, digits, `-`,
/// `_` and `.`, not starting with a dot (so never `..` nor a path).
fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() {
        return Err(field_error(field, name, "a relay needs a name"));
    }
    if name.starts_with('.') || !name.chars().all(allowed) {
        return Err(field_error(
            field,
            name,
            "a relay name is letters, digits, '-', '_' and '.', not starting with '.'",
        ));
    }
    Ok(())
}

/// The directory lexically made absolute (against the working directory) without `.` parts, so
/// that `./a` and `a` compare equal and nesting is a prefix test.
fn normalized_dir(dir: &Path) -> PathBuf {
    let absolute = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir().map(|cwd| cwd.join(dir)).unwrap_or_else(|_| dir.to_path_buf())
    };
    absolute.components().filter(|c| !matches!(c, Component::CurDir)).collect()
}

/// Two listeners clash when they share a port and an address, or one is a wildcard (`0.0.0.0` and
/// `[::]` take the port on every address).
fn listeners_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// A resolved relay and the field paths of the values the cross-relay checks compare.
struct Resolved {
    relay: RelayConfig,
    name_field: String,
    listen_field: String,
    tls_listen_field: String,
    dir_field: String,
}

/// Settings that belong to one relay and cannot be shared in `defaults` nor given as flags to a
/// file of several relays.
const PER_RELAY: &[&str] = &["name", "listen", "tls_listen", "dir", "upstream.addr"];

fn per_relay_fields(settings: &RelaySettings) -> Vec<&'static str> {
    let set = [
        settings.name.is_some(),
        settings.listen.is_some(),
        settings.tls_listen.is_some(),
        settings.dir.is_some(),
        settings.upstream.as_ref().is_some_and(|u| u.addr.is_some()),
    ];
    PER_RELAY.iter().zip(set).filter(|(_, set)| *set).map(|(name, _)| *name).collect()
}

/// Resolves one relay's layers into its [`RelayConfig`], checking each value.
fn resolve_relay(layers: &Layers, data_dir: Option<&Sourced<String>>) -> Result<Resolved, ConfigError> {
    let name = layers
        .text("name", |s| s.name.as_ref())
        .unwrap_or_else(|| Sourced { value: DEFAULTS.name.to_string(), field: layers.own_field("name") });
    check_name(&name.field, &name.value)?;

    let required = |value: Option<Sourced<String>>, name: &str| {
        value.ok_or_else(|| field_error_without_value(&layers.own_field(name), "required"))
    };
    let upstream = required(layers.upstream_text("addr", |u| u.addr.as_ref()), "upstream.addr")?;
    let upstream = check_host_port(&upstream.field, &upstream.value)?;
    // Optional when there is a TLS listener (checked below, with it).
    let listen = layers.text("listen", |s| s.listen.as_ref());
    let listen_field = listen.as_ref().map_or_else(|| layers.own_field("listen"), |l| l.field.clone());
    let listen = listen.map(|l| parse_listen(&l.field, &l.value)).transpose()?;

    let (dir, dir_field) = match (layers.text("dir", |s| s.dir.as_ref()), data_dir) {
        (Some(dir), _) => (PathBuf::from(dir.value), dir.field),
        (None, Some(data_dir)) => (Path::new(&data_dir.value).join(&name.value), data_dir.field.clone()),
        (None, None) => {
            return Err(field_error_without_value(
                &layers.own_field("dir"),
                "required: set dir here, or data_dir at the top level",
            ))
        }
    };
    if dir.components().any(|c| c == Component::ParentDir) {
        return Err(field_error(&dir_field, &dir.display().to_string(), "a data directory may not contain '..'"));
    }

    let size = |name: &str, get: fn(&RelaySettings) -> Option<&Size>| layers.pick(name, get);
    let retention = size("log_size", |s| s.log_size.as_ref());
    if let Some(Sourced { value, field }) = &retention {
        if value.0 < MIN_LOG_SIZE {
            return Err(field_error(field, &value.to_string(), "the log must hold at least 16kb"));
        }
    }
    let retention = retention.map_or(DEFAULTS.log_size, |s| s.value.0);
    let max_size = match size("log_max_size", |s| s.log_max_size.as_ref()) {
        None => retention.saturating_mul(2),
        Some(Sourced { value, field }) if value.0 < retention => {
            return Err(field_error(&field, &value.to_string(), "log_max_size must be at least log_size"))
        }
        Some(s) => s.value.0,
    };
    let log = LogOptions {
        retention,
        max_size,
        // The memory tail is part of the log: never more than it keeps.
        memory: size("log_memory", |s| s.log_memory.as_ref()).map_or(DEFAULTS.log_memory, |s| s.value.0).min(retention),
        segment_size: size("log_segment_size", |s| s.log_segment_size.as_ref())
            .map_or(DEFAULTS.log_segment_size, |s| s.value.0)
            .max(MIN_SEGMENT_SIZE),
        max_age: layers.pick("log_max_age", |s| s.log_max_age.as_ref()).map(|s| s.value.0),
        fsync: parse_with(
            layers.text("appendfsync", |s| s.appendfsync.as_ref()),
            DEFAULTS.appendfsync,
            FsyncPolicy::parse,
            "expected always, everysec or no",
        )?,
    };

    let repl_timeout = match layers.pick("repl_timeout", |s| s.repl_timeout.as_ref()) {
        None => DEFAULTS.repl_timeout,
        Some(Sourced { value, field }) if value.0.is_zero() => {
            return Err(field_error(
                &field,
                "0",
                "repl_timeout must be more than 0 (a link could never be established)",
            ))
        }
        Some(s) => s.value.0,
    };
    let maxclients = parse_with(
        layers.text("maxclients", |s| s.maxclients.as_ref()),
        DEFAULTS.maxclients,
        |t| t.trim().parse::<u64>().ok().filter(|n| *n >= 1),
        "expected a number of clients, at least 1",
    )?;

    let maxmemory_clients =
        size("maxmemory_clients", |s| s.maxmemory_clients.as_ref()).map_or(DEFAULTS.maxmemory_clients, |s| s.value.0);
    let client_query_buffer_limit = match size("client_query_buffer_limit", |s| s.client_query_buffer_limit.as_ref()) {
        None => DEFAULTS.client_query_buffer_limit,
        Some(Sourced { value, field }) if value.0 < MIN_QUERY_BUFFER_LIMIT => {
            return Err(field_error(
                &field,
                &value.to_string(),
                "client_query_buffer_limit must be at least 1mb, as in redis-server",
            ))
        }
        Some(s) => s.value.0,
    };

    let mut snapshot = SnapshotSourcing::default();
    if let Some(Sourced { value, field }) = layers.pick("snapshot_sources", |s| s.snapshot_sources.as_ref()) {
        snapshot.sources = parse_sources(&value.0).map_err(|m| field_error(&field, &value.0.join(","), &m))?;
    }
    if let Some(Sourced { value, field }) =
        layers.pick("snapshot_source_exclude", |s| s.snapshot_source_exclude.as_ref())
    {
        for (i, addr) in value.0.iter().enumerate() {
            check_host_port(&format!("{field}[{i}]"), addr)?;
        }
        snapshot.exclude = value.0;
    }
    if let Some(s) = layers.pick("snapshot_min_interval", |s| s.snapshot_min_interval.as_ref()) {
        snapshot.master_min_interval = s.value.0;
    }
    snapshot.password =
        layers.text("snapshot_source_password", |s| s.snapshot_source_password.as_ref()).map(|s| s.value);

    let replica_resync_backoff = layers
        .pick("replica_resync_backoff", |s| s.replica_resync_backoff.as_ref())
        .map_or(DEFAULTS.replica_resync_backoff, |s| s.value.0);

    let upstream_tls = upstream_tls(layers)?;
    let tls_listen_field = layers.own_field("tls_listen");
    let tls = downstream_tls(layers)?;
    if listen.is_none() && tls.is_none() {
        let which = if listen_field.starts_with("--") { "--listen, --tls-listen" } else { "listen, tls_listen" };
        return Err(field_error_without_value(
            &listen_field,
            &format!("required: a relay needs a listener ({which} or both)"),
        ));
    }
    let tls_listen_field = layers.text("tls_listen", |s| s.tls_listen.as_ref()).map_or(tls_listen_field, |s| s.field);

    let relay = RelayConfig {
        name: name.value,
        upstream,
        upstream_user: layers.upstream_text("user", |u| u.user.as_ref()).map(|s| s.value),
        upstream_password: layers.upstream_text("password", |u| u.password.as_ref()).map(|s| s.value),
        listen,
        dir,
        log,
        repl_timeout,
        downstream_eof_form: layers
            .pick("repl_diskless_sync", |s| s.repl_diskless_sync.as_ref())
            .map_or(DEFAULTS.repl_diskless_sync, |s| s.value.0),
        requirepass: layers.text("requirepass", |s| s.requirepass.as_ref()).map(|s| s.value),
        users: resolve_users(layers)?,
        history_reset: parse_with(
            layers.text("history_reset", |s| s.history_reset.as_ref()),
            DEFAULTS.history_reset,
            HistoryResetPolicy::parse,
            "expected hold or follow",
        )?,
        history_reset_min_key_ratio: parse_with(
            layers.text("history_reset_min_key_ratio", |s| s.history_reset_min_key_ratio.as_ref()),
            DEFAULTS.history_reset_min_key_ratio,
            parse_ratio,
            "expected a fraction from 0 to 1, e.g. 0.5",
        )?,
        replicaof: parse_with(
            layers.text("replicaof", |s| s.replicaof.as_ref()),
            DEFAULTS.replicaof,
            ReplicaofPolicy::parse,
            "expected allow or deny",
        )?,
        upstream_ack: parse_with(
            layers.text("upstream_ack", |s| s.upstream_ack.as_ref()),
            DEFAULTS.upstream_ack,
            AckMode::parse,
            "expected fack or durable",
        )?,
        upstream_tls,
        tls,
        ack_replicas: parse_with(
            layers.text("ack_replicas", |s| s.ack_replicas.as_ref()),
            DEFAULTS.ack_replicas,
            |t| t.trim().parse::<usize>().ok(),
            "expected a number of replicas (0 turns end-to-end ACKs off)",
        )?,
        pubsub_output_limit: parse_with(
            layers.text("client_output_buffer_limit_pubsub", |s| s.client_output_buffer_limit_pubsub.as_ref()),
            DEFAULTS.client_output_buffer_limit_pubsub,
            OutputBufferLimit::parse,
            "expected <hard> <soft> <soft seconds>, such as \"32mb 8mb 60\"",
        )?,
        snapshot,
        maxclients,
        timeout: layers.pick("timeout", |s| s.timeout.as_ref()).map_or(DEFAULTS.timeout, |s| s.value.0),
        maxmemory_clients,
        client_query_buffer_limit,
        upstream_announce_version: parse_with(
            layers
                .upstream_text("announce_version", |u| u.announce_version.as_ref())
                .map(|s| Sourced { value: s.value.trim().to_string(), field: s.field }),
            None,
            |text| crate::upstream::version::version_number(text).map(|_| Some(text.to_string())),
            "expected a version x.y.z (each part 0 to 255), such as 9.0.0",
        )?,
        replica_resync_backoff,
        replica_resync_backoff_max: layers
            .pick("replica_resync_backoff_max", |s| s.replica_resync_backoff_max.as_ref())
            .map_or(DEFAULTS.replica_resync_backoff_max, |s| s.value.0)
            .max(replica_resync_backoff),
    };
    Ok(Resolved { relay, name_field: name.field, listen_field, tls_listen_field, dir_field })
}

/// TLS to the master: `upstream.tls` and its files.
fn upstream_tls(layers: &Layers) -> Result<Option<UpstreamTls>, ConfigError> {
    let enabled = layers.pick("upstream.tls", |s| s.upstream.as_ref().and_then(|u| u.tls.as_ref()));
    let ca = layers.upstream_text("tls_ca_cert_file", |u| u.tls_ca_cert_file.as_ref());
    let cert = layers.upstream_text("tls_cert_file", |u| u.tls_cert_file.as_ref());
    let key = layers.upstream_text("tls_key_file", |u| u.tls_key_file.as_ref());
    let server_name = layers.upstream_text("tls_server_name", |u| u.tls_server_name.as_ref());
    if !enabled.as_ref().is_some_and(|e| e.value.0) {
        if let Some(given) = [&ca, &cert, &key, &server_name].into_iter().flatten().next() {
            let field = enabled.map_or_else(|| layers.own_field("upstream.tls"), |e| e.field);
            return Err(field_error(&field, "no", &format!("{} is set but TLS is off", given.field)));
        }
        return Ok(None);
    }
    let Some(ca) = ca else {
        return Err(field_error_without_value(
            &layers.own_field("upstream.tls_ca_cert_file"),
            "TLS to the master needs the CA that signed its certificate",
        ));
    };
    match (&cert, &key) {
        (Some(_), None) => {
            return Err(field_error_without_value(
                &layers.own_field("upstream.tls_key_file"),
                "a client certificate needs both a cert file and a key file",
            ))
        }
        (None, Some(_)) => {
            return Err(field_error_without_value(
                &layers.own_field("upstream.tls_cert_file"),
                "a client certificate needs both a cert file and a key file",
            ))
        }
        _ => {}
    }
    Ok(Some(UpstreamTls {
        ca_cert_file: ca.value.into(),
        cert_file: cert.map(|c| c.value.into()),
        key_file: key.map(|k| k.value.into()),
        server_name: server_name.map(|s| s.value),
    }))
}

/// The TLS listener: `tls_listen` and its files.
fn downstream_tls(layers: &Layers) -> Result<Option<DownstreamTls>, ConfigError> {
    let cert = layers.text("tls_cert_file", |s| s.tls_cert_file.as_ref());
    let key = layers.text("tls_key_file", |s| s.tls_key_file.as_ref());
    let ca = layers.text("tls_ca_cert_file", |s| s.tls_ca_cert_file.as_ref());
    let Some(listen) = layers.text("tls_listen", |s| s.tls_listen.as_ref()) else {
        if let Some(given) = [&cert, &key].into_iter().flatten().next() {
            return Err(field_error_without_value(
                &layers.own_field("tls_listen"),
                &format!("{} is set but there is no TLS listener", given.field),
            ));
        }
        return Ok(None);
    };
    let listen = parse_listen(&listen.field, &listen.value)?;
    let (Some(cert), Some(key)) = (cert, key) else {
        return Err(field_error_without_value(
            &layers.own_field("tls_cert_file"),
            "a TLS listener needs a cert file and a key file (tls_cert_file, tls_key_file)",
        ));
    };
    let auth_clients = parse_with(
        layers.text("tls_auth_clients", |s| s.tls_auth_clients.as_ref()),
        DEFAULTS.tls_auth_clients,
        ClientAuth::parse,
        "expected yes, no or optional",
    )?;
    if auth_clients != ClientAuth::No && ca.is_none() {
        return Err(field_error_without_value(
            &layers.own_field("tls_ca_cert_file"),
            "tls_auth_clients yes or optional needs the CA that client certificates chain to",
        ));
    }
    Ok(Some(DownstreamTls {
        listen,
        cert_file: cert.value.into(),
        key_file: key.value.into(),
        ca_cert_file: ca.map(|c| c.value.into()),
        auth_clients,
    }))
}

/// Cross-relay checks, the last step of the one validation pass: at least one relay; names,
/// listeners (the metrics endpoint's too) and data directories that do not clash.
fn validate(relays: &[Resolved], metrics: Option<&Sourced<SocketAddr>>) -> Result<(), ConfigError> {
    if relays.is_empty() {
        return Err(field_error("relays", "[]", "at least one relay is required"));
    }
    // Every listener of the process, with the field that set it.
    let mut listeners: Vec<(SocketAddr, String)> = Vec::new();
    if let Some(metrics) = metrics {
        listeners.push((metrics.value, metrics.field.clone()));
    }
    for (i, resolved) in relays.iter().enumerate() {
        let relay = &resolved.relay;
        for (j, other) in relays[..i].iter().enumerate() {
            if relay.name == other.relay.name {
                return Err(field_error(&resolved.name_field, &relay.name, &format!("duplicate of relays[{j}].name")));
            }
            let (mine, theirs) = (normalized_dir(&relay.dir), normalized_dir(&other.relay.dir));
            let clash = if mine == theirs {
                Some("the same directory as")
            } else if mine.starts_with(&theirs) {
                Some("inside the data directory of")
            } else if theirs.starts_with(&mine) {
                Some("the parent of the data directory of")
            } else {
                None
            };
            if let Some(clash) = clash {
                return Err(field_error(
                    &resolved.dir_field,
                    &relay.dir.display().to_string(),
                    &format!("{clash} relays[{j}] ({}, from {})", other.relay.dir.display(), other.dir_field),
                ));
            }
        }
        let own = [
            relay.listen.map(|listen| (listen, &resolved.listen_field)),
            relay.tls.as_ref().map(|t| (t.listen, &resolved.tls_listen_field)),
        ];
        for (addr, field) in own.into_iter().flatten() {
            if let Some((_, other_field)) = listeners.iter().find(|(other, _)| listeners_overlap(addr, *other)) {
                let message = if addr.ip().is_unspecified()
                    || listeners.iter().any(|(o, _)| o.ip().is_unspecified() && o.port() == addr.port())
                {
                    format!("overlaps {other_field} (a wildcard address takes the port on every address)")
                } else {
                    format!("duplicate of {other_field}")
                };
                return Err(field_error(field, &addr.to_string(), &message));
            }
            listeners.push((addr, field.clone()));
        }
    }
    Ok(())
}

impl Config {
    /// The one pipeline: reads `file` (if any), merges the command line's `overrides` over it,
    /// resolves every relay with the defaults and validates the whole. Errors name the file (for
    /// its fields), the field path or flag, and the value.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        match file {
            None => Config::resolve(None, None, overrides),
            Some(path) => {
                let name = path.display().to_string();
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::File { file: name.clone(), message: e.to_string() })?;
                Config::from_yaml_text(&name, &text, overrides)
            }
        }
    }

    /// Reads and validates a YAML file, without command-line overrides (`check-config FILE`).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        Config::load(Some(path), &Overrides::default())
    }

    /// Parses YAML text named `file` in errors, with `overrides` merged over it.
    pub fn from_yaml_text(file: &str, text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let parsed: FileConfig = serde_yaml_ng::from_str(text)
            .map_err(|e| ConfigError::File { file: file.to_string(), message: suggest_field(&e.to_string()) })?;
        Config::resolve(Some(&parsed), Some(file), overrides)
    }

    fn resolve(parsed: Option<&FileConfig>, file: Option<&str>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let in_file = |error: ConfigError| match error {
            ConfigError::Field { file: None, field, value, message } if !field.starts_with("--") => {
                ConfigError::Field { file: file.map(str::to_string), field, value, message }
            }
            other => other,
        };
        Config::resolve_layers(parsed, overrides).map_err(in_file)
    }

    fn resolve_layers(parsed: Option<&FileConfig>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let flags = &overrides.relay;
        let mut relays = Vec::new();
        let metrics_layers = [(&overrides.metrics, "--metrics", "--metrics-auth")]
            .into_iter()
            .chain(parsed.map(|p| (&p.metrics, "metrics.listen", "metrics.auth")));
        let mut metrics = None;
        let mut metrics_auth = None;
        let (mut tls_cert, mut tls_key, mut tls_ca) = (None, None, None);
        for (layer, listen_field, _) in metrics_layers.clone() {
            // The flags spell `--metrics-tls-cert-file`, the file `metrics.tls_cert_file`.
            let field = |name: &str| {
                if listen_field.starts_with("--") {
                    format!("--metrics-{}", name.replace('_', "-"))
                } else {
                    format!("metrics.{name}")
                }
            };
            let take = |slot: &mut Option<Sourced<String>>, value: &Option<Text>, name: &str| {
                if let (None, Some(Text(text))) = (&slot, value) {
                    *slot = Some(Sourced { value: text.clone(), field: field(name) });
                }
            };
            take(&mut tls_cert, &layer.tls_cert_file, "tls_cert_file");
            take(&mut tls_key, &layer.tls_key_file, "tls_key_file");
            take(&mut tls_ca, &layer.tls_ca_cert_file, "tls_ca_cert_file");
        }
        for (layer, listen_field, auth_field) in metrics_layers {
            if let (None, Some(listen)) = (&metrics, &layer.listen) {
                metrics = Some(Sourced {
                    value: parse_listen(listen_field, listen.as_str())?,
                    field: listen_field.to_string(),
                });
            }
            if let (None, Some(auth)) = (&metrics_auth, &layer.auth) {
                metrics_auth = Some(crate::metrics::http::MetricsAuth::parse(auth.as_str()).ok_or_else(|| {
                    field_error_without_value(auth_field, "expected bearer:TOKEN or basic:USER:PASSWORD")
                })?);
            }
        }
        match parsed {
            None => {
                let layers = Layers { layers: vec![(flags, Place::Flags)] };
                if flags.upstream.as_ref().and_then(|u| u.addr.as_ref()).is_none()
                    && flags.listen.is_none()
                    && flags.tls_listen.is_none()
                    && flags.dir.is_none()
                {
                    return Err(field_error_without_value(
                        "--config",
                        "give --config FILE, or --upstream HOST:PORT --listen HOST:PORT --dir PATH (--tls-listen HOST:PORT beside --listen or instead of it)",
                    ));
                }
                relays.push(resolve_relay(&layers, None)?);
            }
            Some(parsed) => {
                if let Some(name) = per_relay_fields(&parsed.defaults).first() {
                    return Err(field_error_without_value(
                        &Place::Defaults.field(name),
                        "set per relay: it cannot be shared in defaults",
                    ));
                }
                if parsed.relays.len() > 1 {
                    if let Some(name) = per_relay_fields(flags).first() {
                        return Err(field_error_without_value(
                            &Place::Flags.field(name),
                            &format!(
                                "applies to one relay, and the file has {}: set it in the file",
                                parsed.relays.len()
                            ),
                        ));
                    }
                }
                let data_dir =
                    parsed.data_dir.as_ref().map(|d| Sourced { value: d.0.clone(), field: "data_dir".to_string() });
                for (i, relay) in parsed.relays.iter().enumerate() {
                    let layers = Layers {
                        layers: vec![
                            (flags, Place::Flags),
                            (relay, Place::Relay(i)),
                            (&parsed.defaults, Place::Defaults),
                        ],
                    };
                    relays.push(resolve_relay(&layers, data_dir.as_ref())?);
                }
            }
        }
        validate(&relays, metrics.as_ref())?;
        let metrics_tls = metrics_tls(tls_cert, tls_key, tls_ca, metrics.as_ref())?;
        let threads = resolve_threads(overrides.threads.as_ref(), parsed.and_then(|p| p.threads.as_ref()))?;
        let fanout_priority = resolve_fanout_priority(
            overrides.fanout_priority.as_ref(),
            parsed.and_then(|p| p.fanout_priority.as_ref()),
        )?;
        Ok(Config {
            metrics: metrics.map(|m| m.value),
            metrics_auth,
            metrics_tls,
            threads,
            fanout_priority,
            relays: relays.into_iter().map(|r| r.relay).collect(),
        })
    }
}

/// Adds "did you mean" to serde's "unknown field `x`, expected one of ..." when one expected name
/// is close to the typo.
fn suggest_field(message: &str) -> String {
    let Some(start) = message.find("unknown field `") else {
        return message.to_string();
    };
    let rest = &message[start + "unknown field `".len()..];
    let Some(end) = rest.find('`') else {
        return message.to_string();
    };
    let typo = &rest[..end];
    let after = &rest[end + 1..];
    let (list, position) = after.find(" at line ").map_or((after, ""), |at| after.split_at(at));
    let expected: Vec<&str> = list.split('`').skip(1).step_by(2).collect();
    match expected.iter().map(|name| (edit_distance(typo, name), *name)).min() {
        Some((distance, name)) if distance <= 2.max(typo.len() / 4) => {
            format!("{}unknown field `{typo}`, did you mean `{name}`?{position}", &message[..start])
        }
        _ => message.to_string(),
    }
}

/// Levenshtein distance, for field-name suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Config {
        fn from_yaml(text: &str) -> Result<Config, ConfigError> {
            Config::from_yaml_text("test.yaml", text, &Overrides::default())
        }
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
        assert_eq!(relay.repl_timeout, DEFAULTS.repl_timeout);
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
        assert_eq!(relay.snapshot.master_min_interval, std::time::Duration::from_secs(3600));
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
    fn client_memory_limits_are_inherited_and_checked() {
        let yaml = |own: &str| {
            format!(
                "data_dir: /d\ndefaults: {{maxmemory_clients: 0}}\nrelays:\n  - {{name: a, upstream: {{addr: 'h:1'}}, listen: '127.0.0.1:1'{own}}}\n"
            )
        };
        let config = Config::from_yaml(&yaml("")).unwrap();
        assert_eq!(config.relays[0].maxmemory_clients, 0);
        assert_eq!(config.relays[0].client_query_buffer_limit, DEFAULTS.client_query_buffer_limit);
        let config = Config::from_yaml(&yaml(", maxmemory_clients: 128mb, client_query_buffer_limit: 16mb")).unwrap();
        assert_eq!(
            (config.relays[0].maxmemory_clients, config.relays[0].client_query_buffer_limit),
            (128 << 20, 16 << 20)
        );
        let err = Config::from_yaml(&yaml(", client_query_buffer_limit: 1kb")).unwrap_err().to_string();
        assert!(err.contains("relays[0].client_query_buffer_limit") && err.contains("1kb"), "{err}");
        let err = Config::from_yaml(&yaml(", maxmemory_clients: lots")).unwrap_err().to_string();
        assert!(err.contains("maxmemory_clients") && err.contains("lots"), "{err}");
        let defaults = Config::from_yaml(&yaml("").replace("{maxmemory_clients: 0}", "{}")).unwrap();
        assert_eq!(defaults.relays[0].maxmemory_clients, 64 << 20);
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
            OutputBufferLimit { hard: 1 << 20, soft: 0, soft_seconds: std::time::Duration::ZERO }
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
        assert!(
            message.contains("relays[0].tls_listen") && message.contains("duplicate of relays[0].listen"),
            "{message}"
        );
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
        assert!(message.contains("defaults: unknown field `log_sise`, did you mean `log_size`?"), "{message}");
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

    /// The command line's layer as main.rs builds it, for the flag side of the tests.
    fn flags(relay: RelaySettings) -> Overrides {
        Overrides { metrics: MetricsSettings::default(), relay, threads: None, fanout_priority: None }
    }

    #[test]
    fn threads_is_a_number_or_auto_and_the_flag_wins() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            Config::from_yaml_text("f.yaml", ONE_RELAY, &Overrides::default()).unwrap().threads,
            default_threads(cpus)
        );
        assert_eq!((default_threads(2), default_threads(4), default_threads(8), default_threads(64)), (1, 1, 2, 16));
        let file = format!("threads: 3\n{ONE_RELAY}");
        assert_eq!(Config::from_yaml_text("f.yaml", &file, &Overrides::default()).unwrap().threads, 3);
        let flag = Overrides { threads: text("2"), ..Overrides::default() };
        assert_eq!(Config::from_yaml_text("f.yaml", &file, &flag).unwrap().threads, 2);
        let auto = format!("threads: auto\n{ONE_RELAY}");
        assert_eq!(
            Config::from_yaml_text("f.yaml", &auto, &Overrides::default()).unwrap().threads,
            default_threads(cpus)
        );
        let zero = format!("threads: 0\n{ONE_RELAY}");
        let message = Config::from_yaml_text("f.yaml", &zero, &Overrides::default()).unwrap_err().to_string();
        assert!(message.starts_with("f.yaml: threads: expected auto or a number"), "{message}");
        assert!(message.ends_with("(value: \"0\")"), "{message}");
        let many = Overrides { threads: text("many"), ..Overrides::default() };
        let message = Config::from_yaml_text("f.yaml", ONE_RELAY, &many).unwrap_err().to_string();
        assert!(message.starts_with("--threads: expected auto"), "{message}");
    }

    #[test]
    fn fanout_priority_is_normal_low_or_idle_and_the_flag_wins() {
        let priority = |yaml: &str, overrides: &Overrides| {
            Config::from_yaml_text("f.yaml", yaml, overrides).map(|config| config.fanout_priority)
        };
        assert_eq!(priority(ONE_RELAY, &Overrides::default()).unwrap(), DEFAULT_FANOUT_PRIORITY);
        let file = format!("fanout_priority: low\n{ONE_RELAY}");
        assert_eq!(priority(&file, &Overrides::default()).unwrap(), FanoutPriority::Low);
        let flag = Overrides { fanout_priority: text("normal"), ..Overrides::default() };
        assert_eq!(priority(&file, &flag).unwrap(), FanoutPriority::Normal);
        let idle = format!("fanout_priority: idle\n{ONE_RELAY}");
        assert_eq!(priority(&idle, &Overrides::default()).unwrap(), FanoutPriority::Idle);
        for name in ["normal", "low", "idle"] {
            let flag = Overrides { fanout_priority: text(name), ..Overrides::default() };
            assert_eq!(priority(ONE_RELAY, &flag).unwrap().as_str(), name);
        }
        let bad = format!("fanout_priority: realtime\n{ONE_RELAY}");
        let message = priority(&bad, &Overrides::default()).unwrap_err().to_string();
        assert!(message.starts_with("f.yaml: fanout_priority: expected normal, low or idle"), "{message}");
        assert!(message.ends_with("(value: \"realtime\")"), "{message}");
        let flag = Overrides { fanout_priority: text("high"), ..Overrides::default() };
        let message = priority(ONE_RELAY, &flag).unwrap_err().to_string();
        assert!(message.starts_with("--fanout-priority: expected normal"), "{message}");
    }

    fn text(value: &str) -> Option<Text> {
        Some(Text(value.to_string()))
    }

    #[test]
    fn a_relay_may_listen_with_tls_only_but_needs_a_listener() {
        let config = Config::from_yaml(
            "data_dir: /d\nrelays:\n  - {name: a, upstream: {addr: 'h:1'}, tls_listen: '127.0.0.1:7001', tls_cert_file: /c, tls_key_file: /k, tls_auth_clients: no}\n  - {name: b, upstream: {addr: 'h:1'}, tls_listen: '127.0.0.1:7002', tls_cert_file: /c, tls_key_file: /k, tls_auth_clients: no}\n",
        )
        .unwrap();
        let relay = &config.relays[0];
        assert_eq!(relay.listen, None);
        assert_eq!(relay.announced_port(), 7001, "a TLS-only relay announces its TLS port upstream");
        assert_eq!(relay.bind_addr().map(|a| a.port()), Some(7001));
        let message = error_of("data_dir: /d\nrelays:\n  - {name: a, upstream: {addr: 'h:1'}}\n");
        assert!(message.contains("relays[0].listen") && message.contains("listen, tls_listen or both"), "{message}");
        let message = error_of(
            "data_dir: /d\nrelays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:7001'}\n  - {name: b, upstream: {addr: 'h:1'}, tls_listen: '127.0.0.1:7001', tls_cert_file: /c, tls_key_file: /k, tls_auth_clients: no}\n",
        );
        assert!(message.contains("relays[1].tls_listen") && message.contains("127.0.0.1:7001"), "{message}");
        let relay = RelaySettings {
            listen: None,
            tls_listen: text("127.0.0.1:7001"),
            tls_cert_file: text("/c"),
            tls_key_file: text("/k"),
            tls_auth_clients: text("no"),
            ..one_relay_flags()
        };
        assert_eq!(Config::load(None, &flags(relay)).unwrap().relays[0].listen, None);
        let message =
            Config::load(None, &flags(RelaySettings { listen: None, ..one_relay_flags() })).unwrap_err().to_string();
        assert!(message.starts_with("--listen: ") && message.contains("--tls-listen or both"), "{message}");
    }

    #[test]
    fn metrics_tls_parses_and_errors_name_the_field() {
        let yaml = |metrics: &str| {
            format!("metrics: {{listen: '127.0.0.1:9480'{metrics}}}\ndata_dir: /d\nrelays:\n  - {{name: a, upstream: {{addr: 'h:1'}}, listen: '127.0.0.1:1'}}\n")
        };
        let listen = "127.0.0.1:9480".parse().unwrap();
        let config = Config::from_yaml(&yaml(", tls_cert_file: /m.crt, tls_key_file: /m.key")).unwrap();
        let tls = config.metrics_tls.clone().expect("metrics TLS");
        assert_eq!((tls.cert_file, tls.key_file, tls.ca_cert_file), ("/m.crt".into(), "/m.key".into(), None));
        assert_eq!(config.metrics_tls.as_ref().unwrap().acceptor_settings(listen).auth_clients, ClientAuth::No);
        let config =
            Config::from_yaml(&yaml(", tls_cert_file: /m.crt, tls_key_file: /m.key, tls_ca_cert_file: /ca")).unwrap();
        let settings = config.metrics_tls.as_ref().unwrap().acceptor_settings(listen);
        assert_eq!(settings.auth_clients, ClientAuth::Yes, "a client CA makes client certificates required");
        assert_eq!(Config::from_yaml(&yaml("")).unwrap().metrics_tls, None);
        let message = error_of(&yaml(", tls_cert_file: /m.crt"));
        assert!(message.contains("metrics.tls_key_file") && message.contains("/m.crt"), "{message}");
        let message = error_of(&yaml(", tls_key_file: /m.key"));
        assert!(message.contains("metrics.tls_cert_file"), "{message}");
        let message = error_of(&yaml(", tls_ca_cert_file: /ca"));
        assert!(message.contains("metrics.tls_ca_cert_file"), "{message}");
        let overrides = Overrides {
            metrics: MetricsSettings { tls_cert_file: text("/c"), tls_key_file: text("/k"), ..Default::default() },
            relay: one_relay_flags(),
            threads: None,
            fanout_priority: None,
        };
        let message = Config::load(None, &overrides).unwrap_err().to_string();
        assert!(
            message.starts_with("--metrics-tls-cert-file: ") && message.contains("no metrics endpoint"),
            "{message}"
        );
    }

    #[test]
    fn users_parse_with_env_files_and_roles() {
        std::env::set_var("RELAY_TEST_SENTINEL_PW", "from-env");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("replica.pass");
        std::fs::write(&file, "from-file\n").unwrap();
        let yaml = format!(
            "data_dir: /d\nrelays:\n  - name: a\n    upstream: {{addr: 'h:1'}}\n    listen: '127.0.0.1:1'\n    users:\n      - {{name: sentinel, password: '${{RELAY_TEST_SENTINEL_PW}}', roles: [monitor, admin]}}\n      - {{name: rep, password_file: '{}', role: replica}}\n",
            file.display()
        );
        let config = Config::from_yaml(&yaml).unwrap();
        let users = &config.relays[0].users;
        assert_eq!(users.len(), 2);
        assert!(users[0].password.matches(b"from-env") && !users[0].password.matches(b"from-file"));
        assert!(users[0].roles.contains(Role::Monitor) && users[0].roles.contains(Role::Admin));
        assert!(users[1].password.matches(b"from-file"), "the trailing newline is not part of the password");
        assert!(users[1].roles.contains(Role::Replica) && !users[1].roles.contains(Role::Monitor));
        assert!(!format!("{config:?}").contains("from-env"), "passwords never show in Debug");

        let user = |entry: &str| {
            format!("data_dir: /d\nrelays:\n  - {{name: a, upstream: {{addr: 'h:1'}}, listen: '127.0.0.1:1', users: [{entry}]}}\n")
        };
        let cases: &[(&str, &[&str])] = &[
            ("{name: x, password: p, role: root}", &["relays[0].users[0].role", "root", "replica, monitor or admin"]),
            ("{name: x, password: p, roles: []}", &["relays[0].users[0].roles", "at least one role"]),
            ("{name: x, role: admin}", &["relays[0].users[0].password", "exactly one of password and password_file"]),
            ("{name: x, password: p, password_file: /f, role: admin}", &["relays[0].users[0].password", "exactly one"]),
            ("{name: x, password: p}", &["relays[0].users[0].role", "exactly one of role and roles"]),
            ("{password: p, role: admin}", &["relays[0].users[0].name", "required"]),
            ("{name: default, password: p, role: admin}", &["relays[0].users[0].name", "requirepass"]),
            ("{name: 'a b', password: p, role: admin}", &["relays[0].users[0].name", "a b"]),
            ("{name: x, password: '', role: admin}", &["relays[0].users[0].password", "empty"]),
            ("{name: x, password: '${RELAY_TEST_SURELY_UNSET}', role: admin}", &["RELAY_TEST_SURELY_UNSET"]),
            (
                "{name: x, password_file: /nonexistent/pw, role: admin}",
                &["relays[0].users[0].password_file", "/nonexistent/pw"],
            ),
            (
                "{name: x, password: p, role: admin}, {name: x, password: q, role: monitor}",
                &["relays[0].users[1].name", "duplicate"],
            ),
            ("{name: x, password: p, role: admin, colour: red}", &["colour"]),
        ];
        for (entry, needles) in cases {
            let message = error_of(&user(entry));
            for needle in *needles {
                assert!(message.contains(needle), "{entry}: {message:?} should contain {needle:?}");
            }
        }
    }

    #[test]
    fn user_flags_parse_and_replace_the_files_users() {
        let user = UserSettings::from_flag("sentinel:monitor,admin:pa:ss").unwrap();
        let relay = RelaySettings { users: Some(vec![user]), ..one_relay_flags() };
        let config = Config::load(None, &flags(relay)).unwrap();
        let users = &config.relays[0].users;
        assert_eq!(users[0].name, "sentinel");
        assert!(users[0].password.matches(b"pa:ss"), "the password is everything after the second colon");
        assert!(users[0].roles.contains(Role::Admin) && users[0].roles.contains(Role::Monitor));
        assert!(UserSettings::from_flag("sentinel:monitor").is_none());
        for bad in ["x:root:pw", "default:admin:pw", "x:admin:", ":admin:pw"] {
            let relay = RelaySettings { users: UserSettings::from_flag(bad).map(|u| vec![u]), ..one_relay_flags() };
            let message = Config::load(None, &flags(relay)).unwrap_err().to_string();
            assert!(message.starts_with("--user: "), "{bad}: {message}");
            assert!(!message.contains(":pw"), "no password in the message: {message}");
        }
    }

    fn one_relay_flags() -> RelaySettings {
        RelaySettings {
            upstream: Some(UpstreamSettings { addr: text("h:1"), ..Default::default() }),
            listen: text("127.0.0.1:7000"),
            dir: text("/d/a"),
            ..Default::default()
        }
    }

    const ONE_RELAY: &str = "relays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:7000', dir: /d/a}\n";

    #[test]
    fn bare_numbers_are_bytes_and_seconds_and_booleans_take_yes_no() {
        let config = Config::from_yaml(
            "relays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', dir: /x, repl_timeout: 90, log_size: 1048576, timeout: 300, repl_diskless_sync: yes}\n",
        )
        .unwrap();
        let relay = &config.relays[0];
        assert_eq!(relay.repl_timeout, std::time::Duration::from_secs(90));
        assert_eq!(relay.log.retention, 1 << 20);
        assert_eq!(relay.timeout, std::time::Duration::from_secs(300));
        assert!(relay.downstream_eof_form);
        let config =
            Config::from_yaml(&ONE_RELAY.replace("dir: /d/a", "dir: /d/a, repl_diskless_sync: false")).unwrap();
        assert!(!config.relays[0].downstream_eof_form);
    }

    #[test]
    fn repl_timeout_zero_is_refused_in_the_file_and_as_a_flag() {
        let message = error_of(&ONE_RELAY.replace("dir: /d/a", "dir: /d/a, repl_timeout: 0"));
        assert!(message.contains("test.yaml: relays[0].repl_timeout") && message.contains("\"0\""), "{message}");
        let relay = RelaySettings { repl_timeout: Some("0s".parse().unwrap()), ..one_relay_flags() };
        let message = Config::load(None, &flags(relay)).unwrap_err().to_string();
        assert!(message.starts_with("--repl-timeout: "), "{message}");
    }

    #[test]
    fn version_settings_parse_and_errors_name_the_field() {
        let config = Config::from_yaml(
            "data_dir: /d\ndefaults: {replica_resync_backoff: 5s}\nrelays:\n  - {name: a, upstream: {addr: 'h:1', announce_version: 8.0.2}, listen: '127.0.0.1:1', replica_resync_backoff_max: 1m}\n  - {name: b, upstream: {addr: 'h:2'}, listen: '127.0.0.1:2'}\n",
        )
        .unwrap();
        let (a, b) = (&config.relays[0], &config.relays[1]);
        assert_eq!(a.upstream_announce_version.as_deref(), Some("8.0.2"));
        assert_eq!(a.replica_resync_backoff, std::time::Duration::from_secs(5));
        assert_eq!(a.replica_resync_backoff_max, std::time::Duration::from_secs(60));
        assert_eq!(b.upstream_announce_version, None);
        assert_eq!(b.replica_resync_backoff_max, DEFAULTS.replica_resync_backoff_max);
        for (yaml, needles) in [
            ("upstream: {addr: 'h:1', announce_version: '8.0'}", ["relays[0].upstream.announce_version", "8.0"]),
            ("upstream: {addr: 'h:1', announce_version: 8.256.0}", ["relays[0].upstream.announce_version", "8.256.0"]),
            ("upstream: {addr: 'h:1'}, replica_resync_backoff: soon", ["relays[0].replica_resync_backoff", "soon"]),
        ] {
            let err = error_of(&format!("relays:\n  - {{name: a, listen: '127.0.0.1:1', dir: /d/a, {yaml}}}\n"));
            for needle in needles {
                assert!(err.contains(needle), "{err} lacks {needle}");
            }
        }
        let relay = RelaySettings {
            upstream: Some(UpstreamSettings {
                addr: text("h:1"),
                announce_version: text("nine"),
                ..Default::default()
            }),
            ..one_relay_flags()
        };
        let message = Config::load(None, &flags(relay)).unwrap_err().to_string();
        assert!(message.starts_with("--upstream-announce-version: ") && message.contains("nine"), "{message}");
    }

    #[test]
    fn log_memory_is_capped_at_log_size_on_both_paths() {
        let capped = |config: Config| (config.relays[0].log.memory, config.relays[0].log.retention);
        let relay = RelaySettings {
            log_size: Some("1mb".parse().unwrap()),
            log_memory: Some("64mb".parse().unwrap()),
            ..one_relay_flags()
        };
        assert_eq!(capped(Config::load(None, &flags(relay)).unwrap()), (1 << 20, 1 << 20), "flags");
        let file = ONE_RELAY.replace("dir: /d/a", "dir: /d/a, log_size: 1mb, log_memory: 64mb");
        assert_eq!(capped(Config::from_yaml(&file).unwrap()), (1 << 20, 1 << 20), "file");
        let file =
            "defaults: {log_memory: 64mb}\n".to_string() + &ONE_RELAY.replace("dir: /d/a", "dir: /d/a, log_size: 1mb");
        assert_eq!(capped(Config::from_yaml(&file).unwrap()), (1 << 20, 1 << 20), "file, inherited");
    }

    #[test]
    fn a_wildcard_listener_overlaps_a_specific_address_on_its_port() {
        let message = error_of(
            "data_dir: /d\nrelays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '0.0.0.0:7000'}\n  - {name: b, upstream: {addr: 'h:1'}, listen: '127.0.0.1:7000'}\n",
        );
        assert!(message.contains("relays[1].listen") && message.contains("overlaps relays[0].listen"), "{message}");
        // Other ports, or two distinct specific addresses, are fine.
        Config::from_yaml(
            "data_dir: /d\nrelays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '0.0.0.0:7000'}\n  - {name: b, upstream: {addr: 'h:1'}, listen: '127.0.0.1:7001'}\n  - {name: c, upstream: {addr: 'h:1'}, listen: '127.0.0.2:7001'}\n",
        )
        .unwrap();
    }

    #[test]
    fn the_metrics_port_may_not_be_a_listen_port() {
        let message = error_of(&format!("metrics: {{listen: '0.0.0.0:7000'}}\n{ONE_RELAY}"));
        assert!(message.contains("relays[0].listen") && message.contains("metrics.listen"), "{message}");
        let overrides = Overrides {
            metrics: MetricsSettings { listen: text("127.0.0.1:7000"), auth: None, ..Default::default() },
            relay: one_relay_flags(),
            threads: None,
            fanout_priority: None,
        };
        let message = Config::load(None, &overrides).unwrap_err().to_string();
        assert!(message.contains("--listen") && message.contains("duplicate of --metrics"), "{message}");
    }

    #[test]
    fn data_dirs_may_not_nest_nor_climb() {
        let two = |a: &str, b: &str| {
            format!("relays:\n  - {{name: a, upstream: {{addr: 'h:1'}}, listen: '127.0.0.1:1', dir: '{a}'}}\n  - {{name: b, upstream: {{addr: 'h:1'}}, listen: '127.0.0.1:2', dir: '{b}'}}\n")
        };
        let message = error_of(&two("/d/a", "/d/a/b"));
        assert!(
            message.contains("relays[1].dir") && message.contains("inside the data directory of relays[0]"),
            "{message}"
        );
        let message = error_of(&two("/d/a/b", "/d/a"));
        assert!(message.contains("relays[1].dir") && message.contains("parent"), "{message}");
        let message = error_of(&two("/d/a", "/d/./a"));
        assert!(message.contains("relays[1].dir") && message.contains("same directory"), "{message}");
        let message = error_of(&two("/d/a", "/d/b/../c"));
        assert!(message.contains("relays[1].dir") && message.contains("'..'"), "{message}");
        Config::from_yaml(&two("/d/a", "/d/ab")).unwrap();
    }

    #[test]
    fn relay_names_are_path_safe() {
        for name in ["../x", "", ".", "a/b", ".hidden"] {
            let message = error_of(&format!(
                "data_dir: /d\nrelays:\n  - {{name: '{name}', upstream: {{addr: 'h:1'}}, listen: '127.0.0.1:1'}}\n"
            ));
            assert!(
                message.contains("relays[0].name") && message.contains(&format!("{name:?}")),
                "{name:?}: {message}"
            );
        }
        Config::from_yaml(
            "data_dir: /d\nrelays:\n  - {name: shard-a_1.eu, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1'}\n",
        )
        .unwrap();
    }

    #[test]
    fn env_variables_are_replaced_in_every_value() {
        std::env::set_var("RELAY_CFG_TEST_ROOT", "/srv");
        std::env::set_var("RELAY_CFG_TEST_PORT", "7010");
        std::env::set_var("RELAY_CFG_TEST_SIZE", "2mb");
        let config = Config::from_yaml(
            "data_dir: ${RELAY_CFG_TEST_ROOT}/data\nrelays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:${RELAY_CFG_TEST_PORT}', log_size: '${RELAY_CFG_TEST_SIZE}', snapshot_source_exclude: ['10.0.0.1:${RELAY_CFG_TEST_PORT}']}\n",
        )
        .unwrap();
        let relay = &config.relays[0];
        assert_eq!(relay.dir, PathBuf::from("/srv/data/a"));
        assert_eq!(relay.listen.map(|l| l.port()), Some(7010));
        assert_eq!(relay.log.retention, 2 << 20);
        assert_eq!(relay.snapshot.exclude, vec!["10.0.0.1:7010".to_string()]);
        let message = error_of("data_dir: ${RELAY_CFG_TEST_SURELY_UNSET}/data\nrelays: []\n");
        assert!(
            message.contains("data_dir") && message.contains("RELAY_CFG_TEST_SURELY_UNSET is not set"),
            "{message}"
        );
    }

    #[test]
    fn errors_name_the_file_and_a_typo_as_unknown() {
        let message = error_of("relays:\n  - {name: a, upstrem: {addr: 'h:1'}, listen: '127.0.0.1:1', dir: /x}\n");
        assert!(
            message.starts_with("test.yaml: relays[0]: unknown field `upstrem`, did you mean `upstream`?"),
            "{message}"
        );
        let message = error_of("relays:\n  - {name: a, listen: '127.0.0.1:1', dir: /x}\n");
        assert_eq!(message, "test.yaml: relays[0].upstream.addr: required");
        for yaml in [
            "relays:\n  - {name: a, listen: '127.0.0.1:1'}\n",
            "relays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', tls_listen: '127.0.0.1:2', dir: /x}\n",
            "relays:\n  - {name: a, upstream: {addr: 'h:1', tls: yes}, listen: '127.0.0.1:1', dir: /x}\n",
        ] {
            let message = error_of(yaml);
            assert!(message.starts_with("test.yaml: relays[0]"), "{message}");
            assert!(!message.contains("(value: \"\")") && !message.contains("<config>"), "{message}");
        }
    }

    #[test]
    fn flags_are_merged_over_the_file() {
        let file = "defaults: {log_size: 2mb, appendfsync: always}\ndata_dir: /d\nrelays:\n  - {name: a, upstream: {addr: 'h:1'}, listen: '127.0.0.1:1', log_size: 4mb}\n  - {name: b, upstream: {addr: 'h:2'}, listen: '127.0.0.1:2'}\n";
        let overrides = flags(RelaySettings { log_size: Some("8mb".parse().unwrap()), ..Default::default() });
        let config = Config::from_yaml_text("f.yaml", file, &overrides).unwrap();
        for relay in &config.relays {
            assert_eq!(relay.log.retention, 8 << 20, "the flag wins for {}", relay.name);
            assert_eq!(relay.log.fsync, FsyncPolicy::Always, "the file's defaults stay for {}", relay.name);
        }
        let message = Config::from_yaml_text("f.yaml", file, &flags(one_relay_flags())).unwrap_err().to_string();
        assert!(message.starts_with("--listen: applies to one relay, and the file has 2"), "{message}");
        // A one-relay file takes them.
        let config = Config::from_yaml_text(
            "f.yaml",
            ONE_RELAY,
            &flags(RelaySettings { listen: text("127.0.0.1:7999"), ..Default::default() }),
        )
        .unwrap();
        assert_eq!((config.relays[0].name.as_str(), config.relays[0].listen.map(|l| l.port())), ("a", Some(7999)));
        // A flag's bad value is reported as the flag, a file's with the file.
        let overrides = flags(RelaySettings { appendfsync: text("sometimes"), ..Default::default() });
        let message = Config::from_yaml_text("f.yaml", file, &overrides).unwrap_err().to_string();
        assert!(message.starts_with("--appendfsync: expected always, everysec or no"), "{message}");
        let message = Config::load(None, &Overrides::default()).unwrap_err().to_string();
        assert!(message.contains("--upstream HOST:PORT --listen HOST:PORT --dir PATH"), "{message}");
        let message =
            Config::load(None, &flags(RelaySettings { dir: None, ..one_relay_flags() })).unwrap_err().to_string();
        assert_eq!(message, "--dir: required: set dir here, or data_dir at the top level");
    }
}
