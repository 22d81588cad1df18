//! redis-relay: a Redis replication relay.
//!
//! Upstream it is an ordinary replica of one master; in the middle it keeps the master's stream in a
//! replication log and the master's RDB in a snapshot cache; downstream it is a master to many replicas,
//! answering `PSYNC` with `+CONTINUE` from the log or `+FULLRESYNC` from the cached RDB plus the log. The
//! replication id, offsets and bytes below are exactly the master's.
//!
//! # Layout
//!
//! - [`protocol`]: RESP framing in one place: the stream's command-boundary scanner, client command
//!   parsing, reply encoding.
//! - `upstream`: the replica link to the master (handshake, PSYNC, RDB receipt, applied offset, ACKs),
//!   `upstream::fetch`: the one fetcher of fresh RDBs on side connections, from the relay's own
//!   replicas first and the master rate-limited (it also pins the log at the snapshot), `upstream::version`: the master's version read after
//!   each connect, and `upstream::history`: the hold on a master's new,
//!   much smaller history (a master restarted empty) until an operator accepts it.
//! - [`log`]: the replication log, the one fan-out buffer, addressed by master offset, with the
//!   replication ids of its history: an in-memory tail of shared chunks over checksummed segment
//!   files ([`log::format`](mod@log::format) is the on-disk format, [`log::disk`] the segments and their recovery,
//!   [`log::writer`] the one writer, on its own thread, [`log::verified`] the places of records a
//!   reader has checked, sent from the file after that). [`fs`]: the file-system seam of the log and
//!   the snapshot cache (a fault-injecting implementation for tests).
//! - [`offset`]: [`offset::Position`], the offset of the last byte held, and its conversions to
//!   Redis's next-byte offsets (`PSYNC`, `second_repl_offset`): the one place with the ±1.
//! - [`snapshot`]: the on-disk cache of the master's RDB; [`snapshot::format`] holds the RDB checks
//!   and the streaming key count.
//! - `downstream`: the listener: client commands (`INFO`, `ROLE`, ...; the node commands tools
//!   send, `HELLO`, `COMMAND`, `CONFIG`, `CLIENT`, ..., in `downstream::commands` over the client
//!   table of `downstream::clients`) and replicas served from the snapshot and the log;
//!   `downstream::guard` is the RDB version guard (full syncs refused to replicas that cannot load
//!   the snapshot's RDB version, announced or caught in a failure loop).
//!   `downstream::glob`: redis-server's glob matching, bounded, for `PSUBSCRIBE` and `CONFIG GET`;
//!   `downstream::users`: the `default` user and the named users with roles, `AUTH` and the
//!   `NOPERM` check; `downstream::zero_copy`: checked disk records sent to plain-TCP replicas with
//!   `sendfile`; `downstream::tail`: the memory tail released behind what the slowest replica was sent.
//! - [`tls`]: TLS both ways (rustls): certificates from PEM files, the one `Stream` type of plain
//!   and TLS connections.
//! - [`relay`]: only composes: wires one relay's pieces together and stops them; `context`: the
//!   state they share (`context::RelayContext`, each field with its one writer);
//!   `shutdown`: the relay's one stop signal; `util`: ids, transfer progress logs, and tasks on a
//!   thread of their own (the upstream link's);
//!   `report`: the figures INFO and the metrics both render (`RelayReport`).
//! - [`config`]: the one configuration pipeline (YAML file and flags merged, many relays per
//!   process); `metrics`: the Prometheus endpoint and the per-relay collector.
//!
//! Every relay has one shutdown signal (a `watch`); the binary supervises relays by name and
//! reloads them on SIGHUP.

// The crate's public surface: what the binary (src/main.rs), the examples and the tests use. Every
// other module is crate-private, so that an item nothing uses is dead code the compiler reports.
pub mod config;
pub mod fs;
pub mod limits;
pub mod log;
pub mod offset;
pub mod protocol;
pub mod relay;
pub mod snapshot;
pub mod tls;
pub use metrics::install as install_metrics;

pub(crate) mod context;
pub(crate) mod downstream;
pub(crate) mod metrics;
pub(crate) mod report;
pub(crate) mod shutdown;
pub(crate) mod upstream;
pub(crate) mod util;
