//! Pub/sub on the relay's client connections: the one registry of channel and pattern
//! subscriptions of a relay, and delivery of `PUBLISH`ed messages to each subscriber's mailbox.
//!
//! Sentinel subscribes to `__sentinel__:hello` on every instance it monitors and publishes its hello
//! there; an instance whose pub/sub link fails counts as disconnected and is skipped by failover
//! reconfiguration. Messages stay on the relay, as `PUBLISH` on a Redis replica delivers only to that
//! replica's subscribers.
//!
//! The registry (behind one mutex, held only to look up or change subscriptions and to enqueue) owns
//! who is subscribed to what; each subscriber's session owns its mailbox's receiving end and drains
//! it into its socket. A message is framed once per channel (or matching pattern) and shared by all
//! mailboxes. What a subscriber has not written yet counts against `client-output-buffer-limit
//! pubsub`: past the hard limit, or past the soft limit for longer than its period, the subscriber is
//! disconnected, so a client that does not read costs at most its limit.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::clients::Killer;
use super::glob::glob_match;

/// `client-output-buffer-limit` for one client class: disconnect at `hard` bytes pending, or after
/// more than `soft` bytes pending for longer than `soft_seconds`. Zero disables a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputBufferLimit {
    pub hard: u64,
    pub soft: u64,
    pub soft_seconds: Duration,
}

impl OutputBufferLimit {
    /// redis-server's default for the pubsub class: `32mb 8mb 60`.
    pub const PUBSUB_DEFAULT: OutputBufferLimit =
        OutputBufferLimit { hard: 32 << 20, soft: 8 << 20, soft_seconds: Duration::from_secs(60) };

    /// Parses `<hard> <soft> <soft seconds>` as redis.conf writes it (`32mb 8mb 60`).
    pub fn parse(text: &str) -> Option<OutputBufferLimit> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [hard, soft, seconds] = parts.as_slice() else {
            return None;
        };
        Some(OutputBufferLimit {
            hard: crate::config::parse_size(hard)?,
            soft: crate::config::parse_size(soft)?,
            soft_seconds: Duration::from_secs(seconds.parse().ok()?),
        })
    }
}

/// One subscriber's queue of framed messages, and what it holds.
struct Mailbox {
    sender: mpsc::UnboundedSender<Bytes>,
    /// Bytes enqueued and not yet written to the socket (the subscriber subtracts after writing).
    pending: Arc<AtomicU64>,
    /// Since when `pending` has been above the soft limit.
    over_soft_since: Mutex<Option<Instant>>,
    client: Killer,
    /// The registry's count of limit disconnections.
    disconnections: Arc<AtomicU64>,
}

impl Mailbox {
    /// Enqueues a message unless that would pass the subscriber's limit, in which case the
    /// subscriber is disconnected instead (as redis-server closes it asynchronously).
    fn deliver(&self, frame: &Bytes, limit: &OutputBufferLimit) {
        let pending = self.pending.load(Ordering::Relaxed) + frame.len() as u64;
        if limit.hard > 0 && pending > limit.hard {
            self.overflow(pending, "hard");
            return;
        }
        if limit.soft > 0 {
            let mut since = self.over_soft_since.lock().unwrap_or_else(|p| p.into_inner());
            if pending > limit.soft {
                let started = *since.get_or_insert_with(Instant::now);
                if started.elapsed() > limit.soft_seconds {
                    drop(since);
                    self.overflow(pending, "soft");
                    return;
                }
            } else {
                *since = None;
            }
        }
        self.pending.fetch_add(frame.len() as u64, Ordering::Relaxed);
        // A closed receiver means the session is ending; its subscriptions go with it.
        let _ = self.sender.send(frame.clone());
    }

    fn overflow(&self, pending: u64, which: &str) {
        if self.client.kill() {
            self.disconnections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                client = %self.client.addr(),
                pending_bytes = pending,
                "pub/sub client disconnected: client-output-buffer-limit pubsub ({which} limit) reached"
            );
        }
    }
}

#[derive(Default)]
struct Registry {
    channels: HashMap<Bytes, BTreeMap<u64, Arc<Mailbox>>>,
    patterns: HashMap<Bytes, BTreeMap<u64, Arc<Mailbox>>>,
}

/// A relay's pub/sub registry.
pub struct PubSub {
    limit: OutputBufferLimit,
    next_id: AtomicU64,
    registry: Mutex<Registry>,
    disconnections: Arc<AtomicU64>,
}

impl PubSub {
    pub fn new(limit: OutputBufferLimit) -> PubSub {
        PubSub {
            limit,
            next_id: AtomicU64::new(0),
            registry: Mutex::new(Registry::default()),
            disconnections: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Channels and patterns with at least one subscriber (`pubsub_channels`, `pubsub_patterns`).
    pub fn counts(&self) -> (usize, usize) {
        let registry = self.registry();
        (registry.channels.len(), registry.patterns.len())
    }

    /// Subscribers disconnected at their output-buffer limit since start.
    pub fn limit_disconnections(&self) -> u64 {
        self.disconnections.load(Ordering::Relaxed)
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new subscriber with no subscriptions; its client is disconnected if it overflows.
    pub fn subscriber(self: &Arc<Self>, client: Killer) -> Subscriber {
        let (sender, receiver) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicU64::new(0));
        let mailbox = Arc::new(Mailbox {
            sender,
            pending: pending.clone(),
            over_soft_since: Mutex::new(None),
            client,
            disconnections: self.disconnections.clone(),
        });
        Subscriber {
            pubsub: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            mailbox,
            receiver,
            pending,
            channels: Vec::new(),
            patterns: Vec::new(),
        }
    }

    /// `PUBLISH channel message`: delivers to channel subscribers, then to each matching pattern's
    /// subscribers, as redis-server does; returns the number of deliveries.
    pub fn publish(&self, channel: &Bytes, message: &Bytes) -> i64 {
        let registry = self.registry();
        let mut receivers = 0;
        if let Some(subscribers) = registry.channels.get(channel) {
            let frame = frame(&[b"message", channel, message]);
            for mailbox in subscribers.values() {
                mailbox.deliver(&frame, &self.limit);
                receivers += 1;
            }
        }
        for (pattern, subscribers) in &registry.patterns {
            if !glob_match(pattern, channel) {
                continue;
            }
            let frame = frame(&[b"pmessage", pattern, channel, message]);
            for mailbox in subscribers.values() {
                mailbox.deliver(&frame, &self.limit);
                receivers += 1;
            }
        }
        receivers
    }
}

/// A session's subscriptions and the receiving end of its mailbox. Dropping it unsubscribes all.
pub struct Subscriber {
    pubsub: Arc<PubSub>,
    id: u64,
    mailbox: Arc<Mailbox>,
    receiver: mpsc::UnboundedReceiver<Bytes>,
    pending: Arc<AtomicU64>,
    /// In subscription order, for `UNSUBSCRIBE` without arguments.
    channels: Vec<Bytes>,
    patterns: Vec<Bytes>,
}

/// Which of the two subscription kinds a command is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Channel,
    Pattern,
}

impl Subscriber {
    /// Channels plus patterns: the count in every (un)subscribe reply.
    pub fn count(&self) -> usize {
        self.channels.len() + self.patterns.len()
    }

    fn own(&mut self, kind: Kind) -> &mut Vec<Bytes> {
        match kind {
            Kind::Channel => &mut self.channels,
            Kind::Pattern => &mut self.patterns,
        }
    }

    /// Subscribes; returns false when already subscribed (redis-server still replies, same count).
    pub fn subscribe(&mut self, kind: Kind, name: &Bytes) -> bool {
        if self.own(kind).contains(name) {
            return false;
        }
        let mut registry = self.pubsub.registry();
        let map = match kind {
            Kind::Channel => &mut registry.channels,
            Kind::Pattern => &mut registry.patterns,
        };
        map.entry(name.clone()).or_default().insert(self.id, self.mailbox.clone());
        drop(registry);
        self.own(kind).push(name.clone());
        true
    }

    pub fn unsubscribe(&mut self, kind: Kind, name: &Bytes) -> bool {
        let Some(position) = self.own(kind).iter().position(|n| n == name) else {
            return false;
        };
        self.own(kind).remove(position);
        let mut registry = self.pubsub.registry();
        let map = match kind {
            Kind::Channel => &mut registry.channels,
            Kind::Pattern => &mut registry.patterns,
        };
        if let Some(subscribers) = map.get_mut(name) {
            subscribers.remove(&self.id);
            if subscribers.is_empty() {
                map.remove(name);
            }
        }
        true
    }

    /// The subscriptions of one kind, in subscription order.
    pub fn names(&self, kind: Kind) -> Vec<Bytes> {
        match kind {
            Kind::Channel => self.channels.clone(),
            Kind::Pattern => self.patterns.clone(),
        }
    }

    /// The next message (cancel-safe).
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.receiver.recv().await
    }

    /// A message already waiting, if any.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        self.receiver.try_recv().ok()
    }

    /// Messages of `bytes` in total have been written to the socket.
    pub fn written(&self, bytes: u64) {
        self.pending.fetch_sub(bytes.min(self.pending.load(Ordering::Relaxed)), Ordering::Relaxed);
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        for kind in [Kind::Channel, Kind::Pattern] {
            for name in self.names(kind) {
                self.unsubscribe(kind, &name);
            }
        }
    }
}

/// A RESP2 array of bulk strings.
fn frame(parts: &[&[u8]]) -> Bytes {
    let mut out = BytesMut::with_capacity(16 + parts.iter().map(|p| p.len() + 16).sum::<usize>());
    out.put_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for part in parts {
        out.put_slice(format!("${}\r\n", part.len()).as_bytes());
        out.put_slice(part);
        out.put_slice(b"\r\n");
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_buffer_limit_parses_redis_form() {
        assert_eq!(OutputBufferLimit::parse("32mb 8mb 60"), Some(OutputBufferLimit::PUBSUB_DEFAULT));
        assert_eq!(
            OutputBufferLimit::parse("0 0 0"),
            Some(OutputBufferLimit { hard: 0, soft: 0, soft_seconds: Duration::ZERO })
        );
        assert_eq!(OutputBufferLimit::parse("32mb 8mb"), None);
        assert_eq!(OutputBufferLimit::parse("32xb 8mb 60"), None);
    }

    #[test]
    fn frames_are_resp2_arrays() {
        assert_eq!(&frame(&[b"message", b"ch", b"hi"])[..], b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n");
    }
}
