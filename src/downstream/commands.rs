//! The node commands tools send to any Redis: `HELLO`, `COMMAND`, `CONFIG`, `CLIENT`, `SELECT`,
//! `DBSIZE`, `TIME`, `LASTSAVE`, `ECHO`, answered with redis-server's reply shapes and error
//! wording, and with the relay's real values (it holds no keys; its settings are fixed at start).
//! Replies are RESP2-shaped except where a RESP3 client (`HELLO 3`) gets a map: `HELLO`,
//! `CONFIG GET`, `COMMAND DOCS`.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::clients::{ClientType, ReplyMode};
use super::glob::glob_match_nocase;
use super::{wrong_arity, Session};
use crate::context::RelayContext;
use crate::protocol::{string2ll, ClientCommand, Reply};

/// `databases`: SELECT takes 0 to 15, like a default redis-server (every database is empty).
pub(crate) const DATABASES: u32 = 16;

/// A command the relay answers, as `COMMAND` describes it: name, arity (negative: at least),
/// flags, and the summary `COMMAND DOCS` gives.
struct CommandSpec {
    name: &'static str,
    arity: i64,
    flags: &'static [&'static str],
    group: &'static str,
    summary: &'static str,
}

const fn spec(
    name: &'static str,
    arity: i64,
    flags: &'static [&'static str],
    group: &'static str,
    summary: &'static str,
) -> CommandSpec {
    CommandSpec { name, arity, flags, group, summary }
}

/// Every command the relay answers; anything else is `-ERR unknown command`.
const COMMANDS: &[CommandSpec] = &[
    spec(
        "auth",
        -2,
        &["noscript", "loading", "stale", "fast", "no_auth", "allow_busy"],
        "connection",
        "Authenticates the connection.",
    ),
    spec("client", -2, &[], "connection", "A container for client connection commands."),
    spec("command", -1, &["loading", "stale"], "server", "Returns detailed information about all commands."),
    spec("config", -2, &[], "server", "A container for server configuration commands."),
    spec(
        "dbsize",
        1,
        &["readonly", "fast"],
        "server",
        "Returns the number of keys in the database (always 0: the relay holds no keys).",
    ),
    spec(
        "discard",
        1,
        &["noscript", "loading", "stale", "fast", "allow_busy"],
        "transactions",
        "Discards a transaction.",
    ),
    spec("echo", 2, &["fast"], "connection", "Returns the given string."),
    spec(
        "exec",
        1,
        &["noscript", "loading", "stale", "skip_slowlog"],
        "transactions",
        "Executes all commands in a transaction.",
    ),
    spec(
        "hello",
        -1,
        &["noscript", "loading", "stale", "fast", "no_auth", "allow_busy"],
        "connection",
        "Handshakes with the Redis server.",
    ),
    spec("info", -1, &["loading", "stale"], "server", "Returns information and statistics about the server."),
    spec(
        "lastsave",
        1,
        &["loading", "stale", "fast"],
        "server",
        "Returns the Unix timestamp of the relay's cached snapshot.",
    ),
    spec(
        "latency",
        -2,
        &[],
        "server",
        "A container for latency diagnostics commands (the relay records no latency events).",
    ),
    spec("multi", 1, &["noscript", "loading", "stale", "fast", "allow_busy"], "transactions", "Starts a transaction."),
    spec("ping", -1, &["fast"], "connection", "Returns the server's liveliness response."),
    spec(
        "psubscribe",
        -2,
        &["pubsub", "noscript", "loading", "stale"],
        "pubsub",
        "Listens for messages published to channels that match one or more patterns.",
    ),
    spec(
        "psync",
        -3,
        &["admin", "noscript", "no_async_loading", "no_multi"],
        "server",
        "An internal command used in replication.",
    ),
    spec(
        "publish",
        3,
        &["pubsub", "loading", "stale", "fast"],
        "pubsub",
        "Posts a message to the relay's subscribers.",
    ),
    spec(
        "punsubscribe",
        -1,
        &["pubsub", "noscript", "loading", "stale"],
        "pubsub",
        "Stops listening to messages published to channels that match one or more patterns.",
    ),
    spec(
        "quit",
        -1,
        &["noscript", "loading", "stale", "fast", "no_auth", "allow_busy"],
        "connection",
        "Closes the connection.",
    ),
    spec("relay", -2, &["admin"], "server", "redis-relay's own commands (RELAY HELP)."),
    spec(
        "replconf",
        -1,
        &["admin", "noscript", "loading", "stale", "allow_busy"],
        "server",
        "An internal command for configuring the replication stream.",
    ),
    spec(
        "replicaof",
        3,
        &["admin", "noscript", "stale", "no_async_loading"],
        "server",
        "Configures the relay as a replica of another master.",
    ),
    spec(
        "reset",
        1,
        &["noscript", "loading", "stale", "fast", "no_auth", "allow_busy"],
        "connection",
        "Resets the connection.",
    ),
    spec("role", 1, &["noscript", "loading", "stale", "fast"], "server", "Returns the replication role."),
    spec("select", 2, &["loading", "stale", "fast"], "connection", "Changes the selected database."),
    spec(
        "slaveof",
        3,
        &["admin", "noscript", "stale", "no_async_loading"],
        "server",
        "Sets a Redis server as a replica of another, or promotes it to being a master.",
    ),
    spec("slowlog", -2, &[], "server", "A container for slow log commands (the relay's slow log stays empty)."),
    spec(
        "subscribe",
        -2,
        &["pubsub", "noscript", "loading", "stale"],
        "pubsub",
        "Listens for messages published to channels.",
    ),
    spec(
        "sync",
        1,
        &["admin", "noscript", "no_async_loading", "no_multi"],
        "server",
        "An internal command used in replication.",
    ),
    spec("time", 1, &["loading", "stale", "fast"], "server", "Returns the server time."),
    spec(
        "unsubscribe",
        -1,
        &["pubsub", "noscript", "loading", "stale"],
        "pubsub",
        "Stops listening to messages posted to channels.",
    ),
];

impl Session {
    /// Runs one of this module's commands; `None` when `command` is not one of them.
    pub(super) fn node_command(&mut self, command: &ClientCommand) -> Option<Reply> {
        let argc = command.args.len();
        Some(match command.name().as_str() {
            "ECHO" if argc == 2 => Reply::Bulk(command.args[1].clone()),
            "ECHO" => wrong_arity("echo"),
            "HELLO" => self.hello(command),
            "COMMAND" => command_command(command),
            "CONFIG" => {
                let admin = self.identity.as_ref().is_some_and(|i| i.roles.contains(super::users::Role::Admin));
                config_command(&self.context, command, self.resp(), admin)
            }
            "CLIENT" => self.client_command(command),
            "SELECT" if argc != 2 => wrong_arity("select"),
            // `getIntFromObjectOrReply`, then the range of `databases`.
            "SELECT" => match string2ll(&command.args[1]) {
                Some(db) if (0..i64::from(DATABASES)).contains(&db) => {
                    self.client.update(|row| row.db = db as u32);
                    Reply::ok()
                }
                Some(db) if i32::try_from(db).is_ok() => Reply::error("ERR DB index is out of range"),
                Some(_) => Reply::error("ERR value is out of range, value must between -2147483648 and 2147483647"),
                None => Reply::error("ERR value is not an integer or out of range"),
            },
            "DBSIZE" if argc == 1 => Reply::Integer(0),
            "DBSIZE" => wrong_arity("dbsize"),
            "TIME" if argc == 1 => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                Reply::Array(vec![Reply::bulk(now.as_secs().to_string()), Reply::bulk(now.subsec_micros().to_string())])
            }
            "TIME" => wrong_arity("time"),
            "LASTSAVE" if argc == 1 => Reply::Integer(last_save(&self.context) as i64),
            "LASTSAVE" => wrong_arity("lastsave"),
            "LATENCY" => self.latency_command(command),
            "SLOWLOG" => slowlog_command(command),
            _ => return None,
        })
    }

    fn resp(&self) -> u8 {
        self.client.get().map(|row| row.resp).unwrap_or(2)
    }

    /// `LATENCY`: the relay has no latency monitor, so its answers are those of a redis-server with
    /// `latency-monitor-threshold 0` and no command run (redis_exporter asks for `LATEST` on every scrape).
    fn latency_command(&self, command: &ClientCommand) -> Reply {
        let argc = command.args.len();
        match command.arg_str(1).to_ascii_uppercase().as_str() {
            "LATEST" if argc == 2 => Reply::Array(Vec::new()),
            "HISTORY" if argc == 3 => Reply::Array(Vec::new()),
            "RESET" => Reply::Integer(0),
            "HISTOGRAM" if self.resp() == 3 => Reply::Map(Vec::new()),
            "HISTOGRAM" => Reply::Array(Vec::new()),
            _ => Reply::error(format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try LATENCY HELP.",
                command.arg_str(1)
            )),
        }
    }

    /// `HELLO [protover [AUTH username password] [SETNAME clientname]]`.
    fn hello(&mut self, command: &ClientCommand) -> Reply {
        let mut resp = None;
        let mut next = 1;
        if command.args.len() > 1 {
            match string2ll(&command.args[1]) {
                Some(version @ 2..=3) => resp = Some(version as u8),
                Some(_) => return Reply::error("NOPROTO unsupported protocol version"),
                None => return Reply::error("ERR Protocol version is not an integer or out of range"),
            }
            next = 2;
        }
        let mut name = None;
        while next < command.args.len() {
            let left = command.args.len() - next - 1;
            let option = command.arg_str(next).to_ascii_uppercase();
            if option == "AUTH" && left >= 2 {
                let auth = ClientCommand {
                    args: vec![
                        Bytes::from_static(b"AUTH"),
                        command.args[next + 1].clone(),
                        command.args[next + 2].clone(),
                    ],
                };
                if let Reply::Error(error) = self.auth(&auth) {
                    return Reply::Error(error);
                }
                next += 3;
            } else if option == "SETNAME" && left >= 1 {
                let wanted = command.arg_str(next + 1);
                if let Err(error) = check_client_name(&wanted) {
                    return error;
                }
                name = Some(wanted);
                next += 2;
            } else {
                return Reply::error(format!("ERR Syntax error in HELLO option '{}'", command.arg_str(next)));
            }
        }
        if !self.authenticated() {
            return Reply::error(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
            );
        }
        let row = self.client.update(|row| {
            if let Some(resp) = resp {
                row.resp = resp;
            }
            if let Some(name) = name {
                row.name = name;
            }
            (row.id, row.resp)
        });
        let (id, resp) = row.unwrap_or((self.client.id(), 2));
        let fields = vec![
            (Reply::bulk("server"), Reply::bulk("redis")),
            (Reply::bulk("version"), Reply::bulk(super::info::redis_version(&self.context))),
            (Reply::bulk("proto"), Reply::Integer(i64::from(resp))),
            (Reply::bulk("id"), Reply::Integer(id as i64)),
            (Reply::bulk("mode"), Reply::bulk("standalone")),
            (Reply::bulk("role"), Reply::bulk("replica")),
            (Reply::bulk("modules"), Reply::Array(Vec::new())),
        ];
        map_reply(fields, resp)
    }

    /// `CLIENT LIST|INFO|ID|KILL|SETNAME|GETNAME|NO-EVICT|REPLY|HELP` (and the ones that change
    /// nothing on a relay: `SETINFO`, `NO-TOUCH`).
    fn client_command(&mut self, command: &ClientCommand) -> Reply {
        let sub = command.arg_str(1).to_ascii_uppercase();
        let argc = command.args.len();
        match sub.as_str() {
            "ID" if argc == 2 => Reply::Integer(self.client.id() as i64),
            "INFO" if argc == 2 => match self.client.get() {
                Some(row) => Reply::bulk(format!("{}\n", row.render())),
                None => Reply::Nil,
            },
            "LIST" => self.client_list(command),
            "GETNAME" if argc == 2 => match self.client.get() {
                Some(row) if !row.name.is_empty() => Reply::bulk(row.name),
                _ => Reply::Nil,
            },
            "SETNAME" if argc == 3 => {
                let name = command.arg_str(2);
                if let Err(error) = check_client_name(&name) {
                    return error;
                }
                self.client.update(|row| row.name = name);
                Reply::ok()
            }
            "NO-EVICT" if argc == 3 => match command.arg_str(2).to_ascii_uppercase().as_str() {
                "ON" | "OFF" => {
                    let on = command.arg_str(2).eq_ignore_ascii_case("on");
                    self.client.update(|row| row.no_evict = on);
                    Reply::ok()
                }
                _ => Reply::error("ERR syntax error"),
            },
            "REPLY" if argc == 3 => {
                let mode = match command.arg_str(2).to_ascii_uppercase().as_str() {
                    "ON" => ReplyMode::On,
                    "OFF" => ReplyMode::Off,
                    "SKIP" => ReplyMode::Skip,
                    _ => return Reply::error("ERR syntax error"),
                };
                self.client.update(|row| {
                    // SKIP while OFF changes nothing, as on redis-server.
                    if !(mode == ReplyMode::Skip && row.reply == ReplyMode::Off) {
                        row.reply = mode;
                    }
                });
                Reply::ok()
            }
            "KILL" => self.client_kill(command),
            "SETINFO" | "NO-TOUCH" => Reply::ok(),
            "HELP" => Reply::Array(
                [
                    "CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                    "GETNAME",
                    "    Return the name of the current connection.",
                    "ID",
                    "    Return the ID of the current connection.",
                    "KILL <ip:port> | [ID <id>] [TYPE <type>] [ADDR <ip:port>] [SKIPME (YES|NO)]",
                    "    Kill connections.",
                    "INFO",
                    "    Return information about the current client connection.",
                    "LIST [TYPE (NORMAL|MASTER|REPLICA|PUBSUB)] [ID <id> [<id> ...]]",
                    "    Return information about client connections.",
                    "NO-EVICT (ON|OFF)",
                    "    Protect the current client connection from eviction.",
                    "REPLY (ON|OFF|SKIP)",
                    "    Control the replies sent to the current connection.",
                    "SETNAME <name>",
                    "    Assign the name <name> to the current connection.",
                ]
                .iter()
                .map(|line| Reply::Simple(line.to_string()))
                .collect(),
            ),
            _ => Reply::error(format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try CLIENT HELP.",
                command.arg_str(1)
            )),
        }
    }

    /// `CLIENT LIST [TYPE normal|master|replica|pubsub] [ID id ...]`.
    fn client_list(&self, command: &ClientCommand) -> Reply {
        let mut rows = self.context.clients.list();
        match command.arg_str(2).to_ascii_uppercase().as_str() {
            "" => {}
            "TYPE" if command.args.len() == 4 => match command.arg_str(3).to_ascii_lowercase().as_str() {
                "normal" => rows.retain(|r| r.kind == ClientType::Normal),
                "replica" | "slave" => rows.retain(|r| r.kind == ClientType::Replica),
                "pubsub" => rows.retain(|r| r.kind == ClientType::Pubsub),
                // The relay's only master link is its own, outbound.
                "master" => rows.clear(),
                other => return Reply::error(format!("ERR Unknown client type '{other}'")),
            },
            "ID" if command.args.len() >= 4 => {
                let mut ids = Vec::new();
                for arg in &command.args[3..] {
                    match String::from_utf8_lossy(arg).parse::<u64>() {
                        Ok(id) if id > 0 => ids.push(id),
                        _ => return Reply::error("ERR Invalid client ID"),
                    }
                }
                rows.retain(|r| ids.contains(&r.id));
            }
            _ => return Reply::error("ERR syntax error"),
        }
        let mut out = String::new();
        for row in rows {
            out.push_str(&row.render());
            out.push('\n');
        }
        Reply::bulk(out)
    }
}

/// redis-server's rule for client names: printable ASCII without spaces.
fn check_client_name(name: &str) -> Result<(), Reply> {
    if name.bytes().any(|b| !(b'!'..=b'~').contains(&b)) {
        return Err(Reply::error("ERR Client names cannot contain spaces, newlines or special characters."));
    }
    Ok(())
}

/// A map for RESP3 clients, a flat array of keys and values for RESP2 ones.
fn map_reply(fields: Vec<(Reply, Reply)>, resp: u8) -> Reply {
    if resp >= 3 {
        Reply::Map(fields)
    } else {
        Reply::Array(fields.into_iter().flat_map(|(k, v)| [k, v]).collect())
    }
}

/// When the cached snapshot was written, or when the relay started if there is none (redis-server
/// starts `lastsave` at its start time too).
pub(crate) fn last_save(context: &RelayContext) -> u64 {
    context.snapshots.current().map(|s| s.created_unix).unwrap_or(context.started_unix)
}

fn command_info(spec: &CommandSpec) -> Reply {
    Reply::Array(vec![
        Reply::bulk(spec.name),
        Reply::Integer(spec.arity),
        Reply::Array(spec.flags.iter().map(|f| Reply::Simple(f.to_string())).collect()),
        Reply::Integer(0),
        Reply::Integer(0),
        Reply::Integer(0),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
    ])
}

/// A command's arity as `COMMAND` gives it (negative: at least); `None` for an unknown command.
pub(super) fn arity(name: &[u8]) -> Option<i64> {
    find_spec(name).map(|spec| spec.arity)
}

fn find_spec(name: &[u8]) -> Option<&'static CommandSpec> {
    let name = String::from_utf8_lossy(name).to_ascii_lowercase();
    COMMANDS.iter().find(|spec| spec.name == name)
}

/// `COMMAND`, `COMMAND COUNT|INFO|DOCS|LIST|HELP`, over [`COMMANDS`].
fn command_command(command: &ClientCommand) -> Reply {
    let argc = command.args.len();
    if argc == 1 {
        return Reply::Array(COMMANDS.iter().map(command_info).collect());
    }
    match command.arg_str(1).to_ascii_uppercase().as_str() {
        "COUNT" if argc == 2 => Reply::Integer(COMMANDS.len() as i64),
        "LIST" if argc == 2 => Reply::Array(COMMANDS.iter().map(|s| Reply::bulk(s.name)).collect()),
        "INFO" if argc == 2 => Reply::Array(COMMANDS.iter().map(command_info).collect()),
        "INFO" => Reply::Array(
            command.args[2..].iter().map(|name| find_spec(name).map(command_info).unwrap_or(Reply::Nil)).collect(),
        ),
        "DOCS" => {
            let specs: Vec<&CommandSpec> = if argc == 2 {
                COMMANDS.iter().collect()
            } else {
                command.args[2..].iter().filter_map(|name| find_spec(name)).collect()
            };
            // RESP2-shaped, as redis-server answers a RESP2 client: name, then its doc fields.
            Reply::Array(
                specs
                    .into_iter()
                    .flat_map(|spec| {
                        [
                            Reply::bulk(spec.name),
                            Reply::Array(vec![
                                Reply::bulk("summary"),
                                Reply::bulk(spec.summary),
                                Reply::bulk("since"),
                                Reply::bulk("1.0.0"),
                                Reply::bulk("group"),
                                Reply::bulk(spec.group),
                            ]),
                        ]
                    })
                    .collect(),
            )
        }
        "HELP" => Reply::Array(
            [
                "COMMAND <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "(no subcommand)",
                "    Return details about all commands the relay answers.",
                "COUNT",
                "    Return the total number of commands the relay answers.",
                "DOCS [<command-name> ...]",
                "    Return documentary information about commands.",
                "INFO [<command-name> ...]",
                "    Return details about multiple commands.",
                "LIST",
                "    Return a list of all commands the relay answers.",
            ]
            .iter()
            .map(|line| Reply::Simple(line.to_string()))
            .collect(),
        ),
        _ => Reply::error(format!(
            "ERR unknown subcommand or wrong number of arguments for '{}'. Try COMMAND HELP.",
            command.arg_str(1)
        )),
    }
}

/// The settings `CONFIG GET` shows, with the relay's values (redis-server's names and formats).
/// `requirepass` shows only to an admin: a monitor user must not read the default user's password.
fn config_values(context: &RelayContext, admin: bool) -> Vec<(&'static str, String)> {
    let config = &context.config;
    let yes_no = |on: bool| if on { "yes" } else { "no" }.to_string();
    let (master_host, master_port) = context.master_host_port();
    vec![
        ("appendonly", "no".into()),
        ("bind", config.bind_addr().map(|a| a.ip().to_string()).unwrap_or_default()),
        ("cluster-enabled", "no".into()),
        ("databases", DATABASES.to_string()),
        ("dir", config.dir.display().to_string()),
        ("client-query-buffer-limit", context.client_memory.query_buffer_limit.to_string()),
        ("maxclients", context.client_slots.effective_max().to_string()),
        ("maxmemory", "0".into()),
        ("maxmemory-clients", context.client_memory.limit().to_string()),
        // 0 with only a TLS listener, as redis-server with `port 0`.
        ("port", config.listen.map_or(0, |a| a.port()).to_string()),
        ("repl-backlog-size", context.log.summary().capacity.to_string()),
        ("repl-diskless-sync", yes_no(config.downstream_eof_form)),
        ("repl-timeout", config.repl_timeout.as_secs().to_string()),
        ("replica-read-only", "yes".into()),
        ("replicaof", format!("{master_host} {master_port}")),
        // As redis-server does, an admin may read it (with the default user nopass, everyone is).
        ("requirepass", if admin { config.requirepass.clone().unwrap_or_default() } else { String::new() }),
        ("save", String::new()),
        ("slave-read-only", "yes".into()),
        ("slaveof", format!("{master_host} {master_port}")),
        ("timeout", config.timeout.as_secs().to_string()),
        ("tls-port", config.tls.as_ref().map(|t| t.listen.port()).unwrap_or(0).to_string()),
    ]
}

/// `CONFIG GET pattern [pattern ...]`, `CONFIG SET` (nothing is settable at run time: the
/// relay's settings come from its configuration, reloaded on SIGHUP), `CONFIG REWRITE`,
/// `CONFIG RESETSTAT`.
fn config_command(context: &RelayContext, command: &ClientCommand, resp: u8, admin: bool) -> Reply {
    let argc = command.args.len();
    match command.arg_str(1).to_ascii_uppercase().as_str() {
        "GET" if argc >= 3 => {
            let fields = config_values(context, admin)
                .into_iter()
                .filter(|(name, _)| command.args[2..].iter().any(|p| glob_match_nocase(p, name.as_bytes())))
                .map(|(name, value)| (Reply::bulk(name), Reply::bulk(value)))
                .collect();
            map_reply(fields, resp)
        }
        "SET" if argc >= 4 && argc.is_multiple_of(2) => {
            let name = command.arg_str(2).to_ascii_lowercase();
            if config_values(context, admin).iter().any(|(known, _)| *known == name) {
                Reply::error(format!(
                    "ERR CONFIG SET failed (possibly related to argument '{name}') - can't set immutable config (redis-relay takes its settings from its configuration file and flags; reload with SIGHUP)"
                ))
            } else {
                Reply::error(format!("ERR Unknown option or number of arguments for CONFIG SET - '{name}'"))
            }
        }
        // There is no redis.conf to rewrite; the relay's configuration is its YAML file and flags.
        "REWRITE" if argc == 2 => Reply::ok(),
        _ => Reply::error(format!(
            "ERR unknown subcommand or wrong number of arguments for '{}'. Try CONFIG HELP.",
            command.arg_str(1)
        )),
    }
}

/// `SLOWLOG`: nothing the relay runs is slow enough to be logged, so the log is empty.
fn slowlog_command(command: &ClientCommand) -> Reply {
    let argc = command.args.len();
    match command.arg_str(1).to_ascii_uppercase().as_str() {
        "GET" if argc <= 3 => match command.args.get(2).map(|count| string2ll(count)) {
            None | Some(Some(-1..)) => Reply::Array(Vec::new()),
            Some(_) => Reply::error("ERR count should be greater than or equal to -1"),
        },
        "LEN" if argc == 2 => Reply::Integer(0),
        "RESET" if argc == 2 => Reply::ok(),
        _ => Reply::error(format!(
            "ERR unknown subcommand or wrong number of arguments for '{}'. Try SLOWLOG HELP.",
            command.arg_str(1)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_table_is_sorted_and_unique() {
        let names: Vec<&str> = COMMANDS.iter().map(|s| s.name).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
    }

    #[test]
    fn command_table_lists_exactly_what_dispatch_knows() {
        let mut known: Vec<String> = super::super::KNOWN_COMMANDS.iter().map(|n| n.to_ascii_lowercase()).collect();
        known.sort_unstable();
        let table: Vec<String> = COMMANDS.iter().map(|s| s.name.to_string()).collect();
        assert_eq!(table, known);
    }
}
