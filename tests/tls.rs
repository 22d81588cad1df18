//! TLS both ways with real redis-server (Debian's build has TLS): the master's TLS port, the relay's
//! TLS listener, real replicas with `tls-replication yes`, and redis-cli `--tls`. Certificates are
//! made for each test with openssl in a temporary directory.
//!
//! The harness's redis-servers keep a plain loopback port for its own checks (`DEBUG DIGEST`,
//! offsets); the relay's link is shown to use the master's TLS port by the master's `CLIENT LIST`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A CA and one certificate it signed for 127.0.0.1 and localhost, usable by servers and clients
/// (as redis's own test certificates are).
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::Builder::new().prefix("relay-tls-").tempdir().expect("temp dir");
        let certs = Certs { dir };
        certs.make_ca("ca");
        certs.make_leaf("leaf", "ca");
        certs
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn file(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn openssl(&self, args: &[&str]) {
        let output = Command::new("openssl").args(args).current_dir(self.dir.path()).output().expect("run openssl");
        assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// `NAME.crt` and `NAME.key`: a self-signed CA.
    fn make_ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-subj",
            &format!("/CN=redis-relay test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }

    /// `NAME.crt` and `NAME.key`, signed by the CA `ca`.
    fn make_leaf(&self, name: &str, ca: &str) {
        self.openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            self.path(&format!("{name}.ext")),
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("write extensions");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }

    /// redis-server arguments for a TLS port with these certificates.
    fn server_args(&self, tls_port: u16) -> Vec<String> {
        vec![
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            self.file("leaf.crt"),
            "--tls-key-file".into(),
            self.file("leaf.key"),
            "--tls-ca-cert-file".into(),
            self.file("ca.crt"),
            "--tls-replication".into(),
            "yes".into(),
        ]
    }
}

/// A master with a TLS port (clients must present a certificate: redis-server's default).
fn tls_master(certs: &Certs) -> (RedisServer, u16) {
    let tls_port = free_port();
    (RedisServer::builder().args(certs.server_args(tls_port)).start(), tls_port)
}

fn relay_over_tls(certs: &Certs, master_tls_port: u16, ca: &str, auth_clients: &str) -> (Relay, u16) {
    relay_over_tls_with(certs, master_tls_port, ca, auth_clients, &[])
}

fn relay_over_tls_with(
    certs: &Certs,
    master_tls_port: u16,
    ca: &str,
    auth_clients: &str,
    extra: &[&str],
) -> (Relay, u16) {
    // The listener's own copies, which a test may replace to renew them.
    for ext in ["crt", "key"] {
        std::fs::copy(certs.path(&format!("leaf.{ext}")), certs.path(&format!("listener.{ext}"))).expect("copy");
    }
    let tls_port = free_port();
    let mut builder = Relay::builder(master_tls_port);
    for arg in [
        "--upstream-tls",
        "yes",
        "--upstream-tls-ca-cert-file",
        &certs.file(ca),
        "--upstream-tls-cert-file",
        &certs.file("leaf.crt"),
        "--upstream-tls-key-file",
        &certs.file("leaf.key"),
        "--tls-listen",
        &format!("127.0.0.1:{tls_port}"),
        "--tls-cert-file",
        &certs.file("listener.crt"),
        "--tls-key-file",
        &certs.file("listener.key"),
        "--tls-ca-cert-file",
        &certs.file("ca.crt"),
        "--tls-auth-clients",
        auth_clients,
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        builder = builder.arg(arg);
    }
    let relay = builder.start();
    (relay, tls_port)
}

/// redis-cli over TLS to `port`; with `client_cert`, it presents the test certificate.
fn redis_cli_tls(certs: &Certs, port: u16, client_cert: bool, args: &[&str]) -> std::process::Output {
    redis_cli_tls_trusting(certs, "ca.crt", port, client_cert, args)
}

/// Like [`redis_cli_tls`], trusting the CA in `ca` for the server's certificate.
fn redis_cli_tls_trusting(
    certs: &Certs,
    ca: &str,
    port: u16,
    client_cert: bool,
    args: &[&str],
) -> std::process::Output {
    let mut command = Command::new("redis-cli");
    command.args(["-h", "127.0.0.1", "-p", &port.to_string(), "--tls", "--cacert", &certs.file(ca)]);
    if client_cert {
        command.args(["--cert", &certs.file("leaf.crt"), "--key", &certs.file("leaf.key")]);
    }
    command.args(args).output().expect("run redis-cli")
}

#[test]
fn master_relay_and_two_replicas_all_over_tls() {
    let certs = Certs::new();
    let (master, master_tls_port) = tls_master(&certs);
    master.query::<()>(redis::cmd("DEBUG").arg("POPULATE").arg(20_000).arg("tls").arg(64));
    let (relay, relay_tls_port) = relay_over_tls(&certs, master_tls_port, "ca.crt", "yes");
    let replicas: Vec<RedisServer> = (0..2)
        .map(|_| {
            let mut args = certs.server_args(free_port());
            args.extend(["--replicaof".into(), "127.0.0.1".into(), relay_tls_port.to_string()]);
            RedisServer::builder().args(args).start()
        })
        .collect();
    let mut con = master.conn();
    for i in 0..2_000 {
        redis::cmd("SET").arg(format!("after:{i}")).arg(i).exec(&mut con).expect("SET");
    }
    for replica in &replicas {
        wait_in_sync(&master, replica, SYNC_TIMEOUT);
        assert_eq!(replica.digest(), master.digest(), "a replica below the TLS relay has the master's data");
    }
    // The relay's link came in on the master's TLS port.
    let clients: String = master.query(redis::cmd("CLIENT").arg("LIST"));
    let link = clients.lines().find(|l| l.contains(" flags=S ")).unwrap_or_else(|| panic!("no replica in {clients}"));
    assert!(
        link.contains(&format!("laddr=127.0.0.1:{master_tls_port} ")),
        "the relay's link is on the TLS port: {link}"
    );
    assert_eq!(relay.info_field("relay", "upstream_tls").as_deref(), Some("yes"));
    assert_eq!(relay.info_field("relay", "tls_port"), Some(relay_tls_port.to_string()));
    assert_eq!(stat_of(&master, "sync_full"), 1, "one full sync on the master: the relay's");
    assert_eq!(stat_of(&relay, "sync_full"), 2, "the relay served both replicas' full syncs");

    // redis-cli over TLS with a client certificate.
    let pong = redis_cli_tls(&certs, relay_tls_port, true, &["PING"]);
    assert_eq!(String::from_utf8_lossy(&pong.stdout).trim(), "PONG", "{}", String::from_utf8_lossy(&pong.stderr));
}

#[test]
fn the_tls_listener_wants_a_client_certificate_unless_told_otherwise() {
    let certs = Certs::new();
    let (_master, master_tls_port) = tls_master(&certs);
    let (_relay, tls_port) = relay_over_tls(&certs, master_tls_port, "ca.crt", "yes");
    let refused = redis_cli_tls(&certs, tls_port, false, &["PING"]);
    assert_ne!(
        String::from_utf8_lossy(&refused.stdout).trim(),
        "PONG",
        "tls-auth-clients yes: no certificate, no PING"
    );
    let answered = redis_cli_tls(&certs, tls_port, true, &["PING"]);
    assert_eq!(String::from_utf8_lossy(&answered.stdout).trim(), "PONG");

    let (_relay, optional_port) = relay_over_tls(&certs, master_tls_port, "ca.crt", "optional");
    let answered = redis_cli_tls(&certs, optional_port, false, &["PING"]);
    assert_eq!(String::from_utf8_lossy(&answered.stdout).trim(), "PONG", "tls-auth-clients optional");
}

#[test]
fn a_wrong_ca_upstream_is_reported_and_retried() {
    let certs = Certs::new();
    certs.make_ca("other-ca");
    let (master, master_tls_port) = tls_master(&certs);
    let (relay, _) = relay_over_tls(&certs, master_tls_port, "other-ca.crt", "yes");
    let failures = |relay: &Relay| -> u64 {
        relay.info_field("relay", "upstream_tls_failures").and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    wait_until(SYNC_TIMEOUT, "two failed TLS handshakes with the master (it retries)", || failures(&relay) >= 2);
    let last_error = relay.info_field("relay", "upstream_last_error").unwrap_or_default();
    assert!(last_error.contains("certificate"), "the error says what is wrong: {last_error}");
    assert_eq!(relay.info_field("replication", "master_link_status").as_deref(), Some("down"));
    assert_eq!(stat_of(&master, "sync_full"), 0, "nothing was synced over the untrusted link");
    assert!(Path::new(&certs.file("other-ca.crt")).exists());
}

#[test]
fn renewed_listener_certificates_are_loaded_on_sighup() {
    let certs = Certs::new();
    certs.make_ca("new-ca");
    certs.make_leaf("renewed", "new-ca");
    let (_master, master_tls_port) = tls_master(&certs);
    let (relay, tls_port) = relay_over_tls(&certs, master_tls_port, "ca.crt", "yes");
    let pong = |ca: &str| {
        String::from_utf8_lossy(&redis_cli_tls_trusting(&certs, ca, tls_port, true, &["PING"]).stdout).trim() == "PONG"
    };
    assert!(pong("ca.crt") && !pong("new-ca.crt"), "the listener starts with the first certificate");

    for ext in ["crt", "key"] {
        std::fs::copy(certs.path(&format!("renewed.{ext}")), certs.path(&format!("listener.{ext}"))).expect("renew");
    }
    let pid = relay.pid().expect("relay pid").to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().is_ok_and(|s| s.success()), "kill -HUP");
    wait_until(SYNC_TIMEOUT, "the listener to present the renewed certificate", || pong("new-ca.crt"));
    assert!(!pong("ca.crt"), "the old certificate is no longer presented");
    assert!(relay.ping(), "the relay kept running");
}

/// A redis-server replica over TLS below the relay: `tls-replication yes`, so it announces its TLS
/// port as its listening port.
/// Returns it with its TLS port.
/// A TLS replica behind the memory tail reads the log from disk and gets it copied (a TLS stream is
/// encrypted in user space: never sendfile), checked records read back, digest-equal.
#[test]
fn a_tls_replica_behind_the_memory_tail_gets_the_disk_records_copied_never_by_sendfile() {
    let certs = Certs::new();
    let (master, master_tls_port) = tls_master(&certs);
    let (relay, relay_tls_port) =
        relay_over_tls_with(&certs, master_tls_port, "ca.crt", "yes", &["--log-memory", "1mb"]);
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let (replica, _) = tls_replica(&certs, relay_tls_port);
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    signal_server(&replica, "STOP");
    write_4k_values(&master, "tlsbig", 8000, 3000);
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    signal_server(&replica, "CONT");
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    assert_eq!(replica.digest(), master.digest());
    let from_disk = relay.info_i64("relay", "stream_sent_from_disk");
    assert!(from_disk > 8 << 20, "the TLS replica read the log from disk: {from_disk} bytes");
    assert_eq!(relay.info_i64("relay", "stream_sent_by_sendfile"), 0, "a TLS replica never takes a file");
    assert_eq!(stat_of(&relay, "sync_full"), 1);
}

fn tls_replica(certs: &Certs, relay_tls_port: u16) -> (RedisServer, u16) {
    let tls_port = free_port();
    let mut args = certs.server_args(tls_port);
    args.extend(["--replicaof".into(), "127.0.0.1".into(), relay_tls_port.to_string()]);
    (RedisServer::builder().args(args).start(), tls_port)
}

#[test]
fn a_late_joiner_is_served_from_a_tls_replica_snapshot_without_a_master_fork() {
    let certs = Certs::new();
    let (master, master_tls_port) = tls_master(&certs);
    load_dataset(&mut master.conn(), 20);
    let tls_port = free_port();
    let mut builder = Relay::builder(master_tls_port)
        .args(["--log-size", "4mb", "--log-segment-size", "512kb", "--log-memory", "1mb"])
        .args(["--upstream-tls", "yes", "--upstream-tls-ca-cert-file", &certs.file("ca.crt")])
        .args(["--upstream-tls-cert-file", &certs.file("leaf.crt"), "--upstream-tls-key-file", &certs.file("leaf.key")])
        .args(["--tls-listen", &format!("127.0.0.1:{tls_port}")])
        .args(["--tls-cert-file", &certs.file("leaf.crt"), "--tls-key-file", &certs.file("leaf.key")]);
    builder = builder.args(["--tls-ca-cert-file", &certs.file("ca.crt")]);
    let relay = builder.start();
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let first_snapshot = relay.info_i64("relay", "snapshot_offset");
    let (online, online_tls_port) = tls_replica(&certs, tls_port);
    wait_in_sync(&master, &online, SYNC_TIMEOUT);
    let announced = format!("127.0.0.1:{online_tls_port}");
    let replication = relay.info("replication");
    assert!(replication.contains(&format!("ip=127.0.0.1,port={online_tls_port},")), "{replication}");

    // Three times log_size of stream: the relay refreshes its snapshot from the TLS replica before
    // retention drops the stream after the first one. The replica keeps up step by step, so it stays
    // connected and online as a source.
    write_stream_in_steps(&master, 12 << 20, 1 << 20, "tls", &[&relay, &online], SYNC_TIMEOUT);
    assert!(
        relay.info_i64("replication", "repl_backlog_first_byte_offset") > first_snapshot + 1,
        "12 MB of stream should have passed the first snapshot"
    );
    wait_until(SYNC_TIMEOUT, "a snapshot refreshed from the TLS replica", || {
        relay.info_i64("relay", "snapshot_refreshes_replica") >= 1
    });
    assert_eq!(relay.info_field("relay", "snapshot_source"), Some(format!("replica {announced}")));
    assert_eq!(
        relay.info_i64("relay", "snapshot_refusals"),
        0,
        "{:?}",
        relay.info_field("relay", "snapshot_last_refusal")
    );
    // The request came in on the replica's TLS port: redis-server counts it as a full sync it served.
    assert!(stat_of(&online, "sync_full") >= 1, "the TLS replica served the snapshot");

    let (late, _) = tls_replica(&certs, tls_port);
    wait_in_sync(&master, &late, SYNC_TIMEOUT);
    assert_eq!(late.digest(), master.digest(), "the late joiner has the master's data");
    assert_eq!(stat_of(&master, "sync_full"), 1, "master sync_full: only the relay's first sync");
    assert_eq!(stat_of(&master, "total_forks"), 1, "master forks: only the relay's first sync");
    assert_eq!(relay.info_i64("relay", "snapshot_refreshes_master"), 0);
}

/// A relay started with `--tls-listen` and no `--listen`: the harness's [`Relay`] checks itself
/// over a plain port, so this one is spawned here and read with `redis-cli --tls`.
struct TlsOnlyRelay {
    child: KillOnDrop,
    port: u16,
    certs_dir: PathBuf,
    work: tempfile::TempDir,
}

impl TlsOnlyRelay {
    fn start(certs: &Certs, master_tls_port: u16) -> TlsOnlyRelay {
        let work = tempfile::Builder::new().prefix("redis-relay-tls-only-").tempdir().expect("temp dir");
        let port = free_port();
        let stderr = std::fs::File::create(work.path().join("relay.stderr")).expect("stderr file");
        let child = Command::new(relay_bin())
            .args(["--upstream", &format!("127.0.0.1:{master_tls_port}"), "--dir"])
            .arg(work.path().join("data"))
            .args(["--upstream-tls", "yes", "--upstream-tls-ca-cert-file", &certs.file("ca.crt")])
            .args([
                "--upstream-tls-cert-file",
                &certs.file("leaf.crt"),
                "--upstream-tls-key-file",
                &certs.file("leaf.key"),
            ])
            .args(["--tls-listen", &format!("127.0.0.1:{port}")])
            .args(["--tls-cert-file", &certs.file("leaf.crt"), "--tls-key-file", &certs.file("leaf.key")])
            .args(["--tls-ca-cert-file", &certs.file("ca.crt"), "--tls-auth-clients", "yes"])
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn redis-relay");
        let relay = TlsOnlyRelay { child: KillOnDrop(child), port, certs_dir: certs.path(""), work };
        wait_for(STARTUP_TIMEOUT, "the TLS-only relay to answer PING over TLS", || match relay.cli(&["PING"]) {
            pong if pong == "PONG" => Ok(()),
            other => Err(format!("{other:?}; stderr: {}", relay.stderr())),
        });
        relay
    }

    /// `redis-cli --tls` with the test certificate; its stdout, trimmed.
    fn cli(&self, args: &[&str]) -> String {
        let file = |name: &str| self.certs_dir.join(name).display().to_string();
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--tls", "--cacert", &file("ca.crt")])
            .args(["--cert", &file("leaf.crt"), "--key", &file("leaf.key")])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.work.path().join("relay.stderr")).unwrap_or_default()
    }
}

impl InfoSource for TlsOnlyRelay {
    fn info(&self, section: &str) -> String {
        self.cli(&["INFO", section])
    }
}

impl Drop for TlsOnlyRelay {
    fn drop(&mut self) {
        let _ = self.child.0.kill();
        if std::thread::panicking() {
            eprintln!("--- TLS-only redis-relay stderr ---\n{}", self.stderr());
        }
    }
}

/// `--tls-listen` without `--listen`: a TLS master, a relay with only a TLS listener (it announces
/// that port to the master, and says port 0 as redis-server with `port 0`), a TLS replica below it,
/// digest-equal with the master.
#[test]
fn a_relay_with_only_a_tls_listener_serves_a_tls_replica() {
    let certs = Certs::new();
    let (master, master_tls_port) = tls_master(&certs);
    master.query::<()>(redis::cmd("DEBUG").arg("POPULATE").arg(5_000).arg("tls-only").arg(64));
    let relay = TlsOnlyRelay::start(&certs, master_tls_port);
    let mut args = certs.server_args(free_port());
    args.extend(["--replicaof".into(), "127.0.0.1".into(), relay.port.to_string()]);
    let replica = RedisServer::builder().args(args).start();
    let mut con = master.conn();
    for i in 0..500 {
        redis::cmd("SET").arg(format!("after:{i}")).arg(i).exec(&mut con).expect("SET");
    }
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    assert_eq!(replica.digest(), master.digest());
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    assert_eq!(relay.info_field("server", "tcp_port").as_deref(), Some("0"));
    assert_eq!(relay.cli(&["CONFIG", "GET", "port"]), "port\n0");
    assert_eq!(relay.info_field("relay", "tls_port"), Some(relay.port.to_string()));
    let slave = master.info_field("replication", "slave0").unwrap_or_default();
    assert!(slave.contains(&format!("port={},", relay.port)), "the relay announces its TLS port: {slave}");
    assert_eq!(stat_of(&relay, "sync_full"), 1, "the replica's full sync came from the relay");
}

/// Without `--listen` and `--tls-listen` the relay refuses to start and says which flags it needs;
/// `check-config` accepts a YAML relay with only `tls_listen`.
#[test]
fn a_relay_needs_a_listener_and_tls_alone_is_one() {
    let work = tempfile::tempdir().expect("temp dir");
    // A port of our own, with nothing on it: a relay that wrongly started would only retry it, and
    // the deadline turns that into a failure instead of a hang.
    let upstream = format!("127.0.0.1:{}", free_port());
    let mut command = Command::new(relay_bin());
    command.args(["--upstream", &upstream, "--dir"]).arg(work.path());
    let (success, _, stderr) = run_with_deadline(command, Duration::from_secs(10), work.path());
    assert!(!success, "started without a listener");
    assert!(stderr.contains("--listen") && stderr.contains("--tls-listen"), "{stderr}");
    let yaml = work.path().join("relay.yaml");
    std::fs::write(
        &yaml,
        "data_dir: /var/lib/redis-relay\nrelays:\n  - {name: a, upstream: {addr: '127.0.0.1:6379'}, tls_listen: '127.0.0.1:6381', tls_cert_file: /c, tls_key_file: /k, tls_auth_clients: no}\n",
    )
    .expect("write config");
    let check = Command::new(relay_bin()).arg("check-config").arg(&yaml).output().expect("check-config");
    assert!(check.status.success(), "check-config: {}", String::from_utf8_lossy(&check.stderr));
}

/// `curl` over HTTPS to the metrics endpoint, trusting the test CA; with `client_cert`, it presents
/// the test certificate. Returns (exit status success, body).
fn curl_metrics(certs: &Certs, port: u16, client_cert: bool) -> (bool, String) {
    let mut command = Command::new("curl");
    command.args(["-sS", "--max-time", "10", "--fail", "--cacert", &certs.file("ca.crt")]);
    if client_cert {
        command.args(["--cert", &certs.file("leaf.crt"), "--key", &certs.file("leaf.key")]);
    }
    let output = command.arg(format!("https://127.0.0.1:{port}/metrics")).output().expect("run curl");
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `--metrics-tls-cert-file`/`--metrics-tls-key-file`: `/metrics` over HTTPS (curl verifies the
/// certificate against the test CA), nothing for plain HTTP on that port; with
/// `--metrics-tls-ca-cert-file` a scraper without a client certificate is refused.
#[test]
fn the_metrics_endpoint_serves_https() {
    let certs = Certs::new();
    let master = RedisServer::start(&[]);
    let metrics_port = free_port();
    let relay = Relay::builder(master.port())
        .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
        .args(["--metrics-tls-cert-file", &certs.file("leaf.crt"), "--metrics-tls-key-file", &certs.file("leaf.key")])
        .start();
    wait_link_up(&relay, SYNC_TIMEOUT);
    let body =
        wait_for(SYNC_TIMEOUT, "the relay's series over HTTPS", || match curl_metrics(&certs, metrics_port, false) {
            (true, body) if metric_value(&body, "redis_relay_upstream_link_up", &[]) == Some(1.0) => Ok(body),
            (ok, body) => Err(format!("curl ok={ok}: {}", body.chars().take(200).collect::<String>())),
        });
    assert!(body.contains("# TYPE redis_relay_offset_bytes gauge"), "{body}");
    let plain = scrape(metrics_port);
    assert!(!plain.contains("200 OK") && !plain.contains("redis_relay_"), "plain HTTP got: {plain:?}");
    let untrusted = Command::new("curl")
        .args(["-sS", "--max-time", "10", &format!("https://127.0.0.1:{metrics_port}/metrics")])
        .output()
        .expect("run curl");
    assert!(!untrusted.status.success(), "curl without the CA must not trust the test certificate");

    let mutual_port = free_port();
    let _mutual = Relay::builder(master.port())
        .args(["--metrics", &format!("127.0.0.1:{mutual_port}")])
        .args(["--metrics-tls-cert-file", &certs.file("leaf.crt"), "--metrics-tls-key-file", &certs.file("leaf.key")])
        .args(["--metrics-tls-ca-cert-file", &certs.file("ca.crt")])
        .start();
    wait_until(SYNC_TIMEOUT, "a scrape with a client certificate", || curl_metrics(&certs, mutual_port, true).0);
    assert!(!curl_metrics(&certs, mutual_port, false).0, "no client certificate, no metrics");
}
