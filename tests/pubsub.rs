//! Pub/sub on the relay's client connections, checked against a real redis-server replica: the
//! same raw command scripts must produce the same bytes; `redis-cli SUBSCRIBE` receives what
//! `redis-cli PUBLISH` sends on the relay; `CLIENT KILL TYPE pubsub|normal` ends those clients; a
//! subscriber that does not read is dropped at its output-buffer limit.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Sends `script` on a fresh connection and reads until the server closes it (every script
/// ends with `QUIT`).
fn run_script(port: u16, script: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    stream.write_all(script.as_bytes()).expect("write script");
    let mut out = Vec::new();
    stream.read_to_end(&mut out).expect("read until the server closes");
    out
}

fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace("\r\n", "\\r\\n")
}

/// A replica of `master`, as the relay is: the reference for what a Redis replica answers.
fn reference_replica(master: &RedisServer) -> RedisServer {
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &master.port().to_string()]);
    wait_link_up(&replica, SYNC_TIMEOUT);
    replica
}

#[test]
fn subscribe_replies_are_byte_exact_with_redis_server() {
    let master = RedisServer::start(&[]);
    let replica = reference_replica(&master);
    let relay = Relay::start(&master);
    wait_link_up(&relay, SYNC_TIMEOUT);
    let scripts = [
        // Leaving nothing, outside subscribed mode: one reply with a nil name and count 0.
        "UNSUBSCRIBE\r\nPUNSUBSCRIBE\r\nPING\r\nQUIT\r\n",
        // Subscribed mode: counts over channels and patterns, PING's array form, refused commands,
        // unknown ones, unsubscribing what was never subscribed, leaving subscribed mode again.
        "SUBSCRIBE a b\r\nSUBSCRIBE a\r\nPING\r\nPING hello\r\nINFO\r\nROLE\r\nMULTI\r\nFOO bar\r\n\
         PSUBSCRIBE p* q?\r\nUNSUBSCRIBE a zz\r\nUNSUBSCRIBE\r\nPING\r\nPUNSUBSCRIBE q?\r\nPUNSUBSCRIBE\r\n\
         PING\r\nPUNSUBSCRIBE\r\nQUIT\r\n",
        // QUIT in subscribed mode; arity errors.
        "SUBSCRIBE\r\nPSUBSCRIBE\r\nPUBLISH a\r\nPING a b\r\nPSUBSCRIBE x\r\nPING a b\r\nQUIT\r\n",
        // RESET leaves subscribed mode; RESET and QUIT run at once inside MULTI.
        "SUBSCRIBE a\r\nRESET\r\nPING\r\nQUIT\r\n",
        "MULTI\r\nRESET\r\nPING\r\nMULTI\r\nQUIT\r\n",
        // PUBLISH with nobody listening; SUBSCRIBE inside MULTI.
        "PUBLISH nobody hears\r\nMULTI\r\nSUBSCRIBE m\r\nEXEC\r\nPING\r\nQUIT\r\n",
        // CLIENT KILL forms and errors (the caller is skipped unless SKIPME no).
        "CLIENT KILL TYPE normal\r\nCLIENT KILL TYPE pubsub\r\nCLIENT KILL TYPE nonsense\r\n\
         CLIENT KILL 127.0.0.1:1\r\nCLIENT KILL TYPE normal SKIPME maybe\r\nCLIENT KILL ID 0\r\n\
         CLIENT KILL TYPE\r\nQUIT\r\n",
    ];
    for script in scripts {
        // Each side then has exactly one other normal client (the harness's connections are
        // killed first, and reopen when used), so `CLIENT KILL TYPE normal` counts the same.
        for port in [replica.port(), relay.port()] {
            run_script(port, "CLIENT KILL TYPE normal\r\nQUIT\r\n");
        }
        // A round trip each, so both servers have registered their bystander before the script
        // counts clients (a connection the server has not accepted yet is not killed by TYPE normal).
        let mut bystanders = [replica.conn(), relay.conn()];
        for bystander in &mut bystanders {
            let pong: String = redis::cmd("PING").query(bystander).expect("bystander PING");
            assert_eq!(pong, "PONG");
        }
        let expected = run_script(replica.port(), script);
        let got = run_script(relay.port(), script);
        assert_eq!(
            printable(&got),
            printable(&expected),
            "script {:?}: relay (left) vs redis-server replica (right)",
            printable(script.as_bytes())
        );
    }
}

/// Subscribes on a raw connection and reads exactly the subscribe replies.
fn raw_subscriber(port: u16, subscribe: &str, replies: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    stream.write_all(subscribe.as_bytes()).expect("subscribe");
    let mut got = vec![0; replies.len()];
    stream.read_exact(&mut got).expect("subscribe replies");
    assert_eq!(printable(&got), printable(replies));
    stream
}

#[test]
fn messages_reach_channel_and_pattern_subscribers_as_on_redis_server() {
    let master = RedisServer::start(&[]);
    let replica = reference_replica(&master);
    let relay = Relay::start(&master);
    wait_link_up(&relay, SYNC_TIMEOUT);
    // One matching pattern per message at most: redis-server walks its patterns in hash order.
    let subscribe = "SUBSCRIBE news\r\nPSUBSCRIBE ne[wx]? no*\r\n";
    let replies = b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n\
                    *3\r\n$10\r\npsubscribe\r\n$7\r\nne[wx]?\r\n:2\r\n*3\r\n$10\r\npsubscribe\r\n$3\r\nno*\r\n:3\r\n";
    let mut outputs = Vec::new();
    for port in [replica.port(), relay.port()] {
        let mut subscriber = raw_subscriber(port, subscribe, replies);
        let publisher = connect(port, None, None).expect("publisher");
        let mut publisher = publisher;
        let counts: Vec<i64> = ["news", "next", "nothing", "other"]
            .iter()
            .map(|channel| redis::cmd("PUBLISH").arg(*channel).arg("hello").query(&mut publisher).unwrap())
            .collect();
        assert_eq!(counts, vec![2, 1, 1, 0], "receivers per PUBLISH on port {port}");
        subscriber.write_all(b"QUIT\r\n").expect("quit");
        let mut out = Vec::new();
        subscriber.read_to_end(&mut out).expect("read messages");
        outputs.push(out);
    }
    assert_eq!(printable(&outputs[1]), printable(&outputs[0]), "relay (left) vs redis-server (right)");
    let info = relay.info("stats");
    assert_eq!(parse_info_field(&info, "pubsub_channels").as_deref(), Some("0"), "all left after QUIT");
}

#[test]
fn redis_cli_subscribe_receives_what_redis_cli_publishes_on_the_relay() {
    let master = RedisServer::start(&[]);
    let relay = Relay::start(&master);
    // Killed on drop, so a failure before the CLIENT KILL below leaves no redis-cli behind.
    let mut child = KillOnDrop(
        Command::new("redis-cli")
            .args(["-p", &relay.port().to_string(), "SUBSCRIBE", "__sentinel__:hello"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli"),
    );
    let (lines, receiver) = std::sync::mpsc::channel();
    let stdout = child.0.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let publish = |message: &str| -> i64 {
        let out = Command::new("redis-cli")
            .args(["-p", &relay.port().to_string(), "PUBLISH", "__sentinel__:hello", message])
            .output()
            .expect("redis-cli PUBLISH");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(-1)
    };
    wait_for(SYNC_TIMEOUT, "redis-cli's subscription to be registered", || match publish("first") {
        1 => Ok(()),
        other => Err(format!("PUBLISH returned {other}")),
    });
    assert_eq!(parse_info_field(&relay.info("stats"), "pubsub_channels").as_deref(), Some("1"));
    let mut seen = Vec::new();
    wait_for(SYNC_TIMEOUT, "the message in redis-cli's output", || {
        while let Ok(line) = receiver.try_recv() {
            seen.push(line);
        }
        let want = ["message", "__sentinel__:hello", "first"];
        if seen.windows(3).any(|w| w == want) {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    });
    // Sentinel's reconfiguration ends pub/sub clients with CLIENT KILL TYPE pubsub.
    let killed: i64 = relay.query(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"));
    assert_eq!(killed, 1);
    wait_for(SYNC_TIMEOUT, "redis-cli to see its connection closed", || match child.0.try_wait() {
        Ok(Some(_)) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    wait_until(SYNC_TIMEOUT, "the subscription to be gone", || publish("second") == 0);
}

#[test]
fn client_kill_type_normal_ends_other_clients_and_skipme_no_the_caller_after_its_reply() {
    let master = RedisServer::start(&[]);
    let relay = Relay::start(&master);
    let mut victim = relay.conn();
    let _: String = redis::cmd("PING").query(&mut victim).unwrap();
    let mut killer = relay.conn();
    let id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut killer).unwrap();
    assert!(id > 0);
    // The start-up probe's connection may still be closing on the relay's side: count only ours.
    wait_until(SYNC_TIMEOUT, "only the victim and the killer connected", || {
        let info: String = redis::cmd("INFO").arg("clients").query(&mut killer).unwrap_or_default();
        parse_info_field(&info, "connected_clients").as_deref() == Some("2")
    });
    // As Sentinel sends it: inside MULTI, after SLAVEOF.
    let replies: Vec<i64> = redis::pipe()
        .atomic()
        .cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut killer)
        .unwrap();
    assert_eq!(replies, vec![1, 0], "the victim is killed, the caller skipped");
    assert!(redis::cmd("PING").query::<String>(&mut victim).is_err(), "the victim's connection is closed");
    let _: String = redis::cmd("PING").query(&mut killer).expect("the caller lives on");
    let killed: i64 =
        redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id).arg("SKIPME").arg("no").query(&mut killer).unwrap();
    assert_eq!(killed, 1, "the reply still arrives");
    assert!(redis::cmd("PING").query::<String>(&mut killer).is_err(), "then the connection closes");
}

#[test]
fn a_subscriber_that_does_not_read_is_dropped_at_its_output_buffer_limit() {
    let master = RedisServer::start(&[]);
    let relay = Relay::builder(master.port()).arg("--client-output-buffer-limit-pubsub").arg("1mb 0 0").start();
    // Subscribes and then never reads again.
    let _stuck =
        raw_subscriber(relay.port(), "SUBSCRIBE firehose\r\n", b"*3\r\n$9\r\nsubscribe\r\n$8\r\nfirehose\r\n:1\r\n");
    let reader = raw_subscriber(relay.port(), "SUBSCRIBE other\r\n", b"*3\r\n$9\r\nsubscribe\r\n$5\r\nother\r\n:1\r\n");
    let mut publisher = relay.conn();
    let payload = "x".repeat(64 * 1024);
    let mut published = 0usize;
    wait_for(Duration::from_secs(60), "the stuck subscriber to be dropped", || {
        let receivers: i64 = redis::cmd("PUBLISH").arg("firehose").arg(&payload).query(&mut publisher).unwrap();
        published += payload.len();
        if receivers == 0 {
            Ok(())
        } else {
            Err(format!("{published} bytes published, still {receivers} receiver(s)"))
        }
    });
    // Bounded: the limit plus what the kernel's socket buffers took before the relay held any.
    eprintln!("stuck subscriber dropped after {published} bytes published to it (limit 1mb)");
    assert!(published < 64 << 20, "dropped only after {published} bytes");
    let info = relay.info("stats");
    assert_eq!(parse_info_field(&info, "client_output_buffer_limit_disconnections").as_deref(), Some("1"));
    assert_eq!(parse_info_field(&info, "pubsub_channels").as_deref(), Some("1"), "the reading subscriber stays");
    let receivers: i64 = redis::cmd("PUBLISH").arg("other").arg("still here").query(&mut publisher).unwrap();
    assert_eq!(receivers, 1);
    drop(reader);
}
