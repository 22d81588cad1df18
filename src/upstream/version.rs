//! The master's version, as its `INFO server` reports it: read over a short side connection each
//! time the replica link comes up, so the relay's `INFO server` and `HELLO` give clients the version
//! of the data they replicate (`redis_version`), next to the relay's own (`relay_version`).

use tokio::sync::watch;

use super::connection::MasterConnection;
use super::{LinkError, LinkState, UpstreamConfig, UpstreamStatus};
use crate::protocol::encode_command;

/// What `INFO server` says before the master was ever asked (the oldest version whose replication
/// protocol the relay speaks in full: PSYNC2, `REPLCONF rdb-only`).
pub const FALLBACK_REDIS_VERSION: &str = "7.0.0";

/// The longest `INFO server` reply the relay reads (a master's is about 1 KiB).
const MAX_INFO_REPLY: usize = 64 * 1024;

/// A version `x.y.z` as one number, `0x00XXYYZZ`, read as Valkey's `version2num` reads
/// `REPLCONF version`: digits and exactly two dots, each part at most 255 (an empty part is 0).
pub fn version_number(text: &str) -> Option<u32> {
    let (mut value, mut part, mut dots) = (0u32, 0u32, 0);
    if text.is_empty() {
        return None;
    }
    for byte in text.bytes() {
        match byte {
            b'0'..=b'9' => {
                part = part * 10 + u32::from(byte - b'0');
                if part > 255 {
                    return None;
                }
            }
            b'.' => {
                dots += 1;
                if dots > 2 {
                    return None;
                }
                value = (value << 8) | part;
                part = 0;
            }
            _ => return None,
        }
    }
    (dots == 2).then_some((value << 8) | part)
}

/// The version fields of the master's `INFO server`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MasterVersion {
    pub redis_version: String,
    /// `server_name` and `valkey_version`, when the master is Valkey.
    pub server_name: Option<String>,
    pub valkey_version: Option<String>,
}

impl MasterVersion {
    /// Reads the fields out of an `INFO server` payload; `None` without `redis_version`.
    pub fn parse(info: &str) -> Option<MasterVersion> {
        let field = |name: &str| {
            info.lines()
                .filter_map(|line| line.trim_end().split_once(':'))
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        };
        Some(MasterVersion {
            redis_version: field("redis_version")?,
            server_name: field("server_name"),
            valkey_version: field("valkey_version"),
        })
    }
}

/// Asks the master for its version after every connect of the replica link; publishes it on
/// `version` (kept across failures: the last version read is the best guess).
pub async fn follow(
    config: UpstreamConfig,
    mut status: watch::Receiver<UpstreamStatus>,
    version: watch::Sender<Option<MasterVersion>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut was_connected = false;
    loop {
        let connected = status.borrow_and_update().state == LinkState::Connected;
        if connected && !was_connected {
            match tokio::time::timeout(config.repl_timeout, read_version(&config)).await {
                Ok(Ok(read)) => {
                    tracing::debug!(redis_version = %read.redis_version, "master version read");
                    version.send_replace(Some(read));
                }
                Ok(Err(error)) => tracing::info!("could not read the master's INFO server: {error}"),
                Err(_) => tracing::info!("could not read the master's INFO server: timed out"),
            }
        }
        was_connected = connected;
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        }
    }
}

async fn read_version(config: &UpstreamConfig) -> Result<MasterVersion, LinkError> {
    let mut conn = MasterConnection::connect(&config.addr(), config.repl_timeout, config.tls.as_deref()).await?;
    let mut request = Vec::new();
    match (&config.user, &config.password) {
        (Some(user), Some(password)) => {
            request.extend_from_slice(&encode_command(&[b"AUTH", user.as_bytes(), password.as_bytes()]))
        }
        (None, Some(password)) => request.extend_from_slice(&encode_command(&[b"AUTH", password.as_bytes()])),
        _ => {}
    }
    request.extend_from_slice(&encode_command(&[b"INFO", b"server"]));
    conn.send(&request).await?;
    if config.password.is_some() {
        let reply = conn.read_reply("waiting for the AUTH reply (version check)").await?;
        if reply.starts_with('-') {
            return Err(LinkError::Auth(reply));
        }
    }
    let header = conn.read_reply("waiting for the INFO reply (version check)").await?;
    let len = header
        .strip_prefix('$')
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n <= MAX_INFO_REPLY)
        .ok_or_else(|| LinkError::BadPayload(format!("unexpected reply to INFO server: {header}")))?;
    while conn.buf.len() < len {
        conn.fill("reading the INFO reply (version check)").await?;
    }
    let info = String::from_utf8_lossy(&conn.buf[..len]).into_owned();
    MasterVersion::parse(&info)
        .ok_or_else(|| LinkError::BadPayload("the master's INFO server has no redis_version".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_numbers_read_as_valkey_reads_them() {
        assert_eq!(version_number("7.2.0"), Some(0x070200));
        assert_eq!(version_number("9.0.1"), Some(0x090001));
        assert_eq!(version_number("255.255.255"), Some(0xffffff));
        assert_eq!(version_number(".."), Some(0));
        for bad in ["", "8", "8.0", "8.0.0.1", "8.256.0", "8.0.0-rc1", " 8.0.0", "v8.0.0"] {
            assert_eq!(version_number(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parses_redis_and_valkey_versions() {
        let redis = MasterVersion::parse("# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n");
        assert_eq!(
            redis,
            Some(MasterVersion { redis_version: "7.0.15".into(), server_name: None, valkey_version: None })
        );
        let valkey =
            MasterVersion::parse("# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:9.0.0\r\n");
        assert_eq!(valkey.as_ref().and_then(|v| v.valkey_version.as_deref()), Some("9.0.0"));
        assert_eq!(valkey.as_ref().and_then(|v| v.server_name.as_deref()), Some("valkey"));
        assert_eq!(MasterVersion::parse("# Server\r\nos:Linux\r\n"), None);
    }
}
