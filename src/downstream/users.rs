//! Who may connect to a relay and what each one may run: the `default` user (`requirepass`) and
//! the named users of `users:`, each with roles (`replica`, `monitor`, `admin`).
//!
//! Passwords are kept only as SHA-256 digests (as redis-server keeps them) and compared in
//! constant time, so neither the time an `AUTH` takes nor a memory dump gives a password away.
//! The permission check follows redis-server's `processCommand`: unknown commands and wrong
//! arities are answered first, unknown subcommands by the command itself, then the roles decide,
//! and a refusal is `-NOPERM this user has no permissions to run the '<cmd>' command` with
//! redis-server 7.0's wording and its `parent|sub` names.

use std::fmt;

use subtle::ConstantTimeEq;

use crate::protocol::ClientCommand;

/// What a user may do. A user may hold several.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The replica handshake and the stream: `PING`, `REPLCONF`, `PSYNC`, `SYNC`.
    Replica,
    /// Read-only operation: `INFO`, `ROLE`, `CONFIG GET`, `CLIENT LIST|INFO|...`, `COMMAND`,
    /// pub/sub (Sentinel's hello channel), `MULTI`/`EXEC` around what the user may run.
    Monitor,
    /// Everything, `REPLICAOF`, `CLIENT KILL`, `CONFIG SET|REWRITE` and `RELAY` included.
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text.trim().to_ascii_lowercase().as_str() {
            "replica" => Some(Role::Replica),
            "monitor" => Some(Role::Monitor),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        match self {
            Role::Replica => 1,
            Role::Monitor => 2,
            Role::Admin => 4,
        }
    }
}

/// A set of roles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    pub const NONE: Roles = Roles(0);
    pub const ADMIN: Roles = Roles(4);

    pub fn with(self, role: Role) -> Roles {
        Roles(self.0 | role.bit())
    }

    pub fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    pub fn from_list(roles: &[Role]) -> Roles {
        roles.iter().fold(Roles::NONE, |set, role| set.with(*role))
    }
}

/// A password's SHA-256 digest. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordDigest([u8; 32]);

impl PasswordDigest {
    pub fn of(password: &[u8]) -> PasswordDigest {
        let digest = ring::digest::digest(&ring::digest::SHA256, password);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        PasswordDigest(bytes)
    }

    /// Whether `password` is this one, in time independent of where they differ (digests have
    /// one length, so the length of the password is not given away either).
    pub fn matches(&self, password: &[u8]) -> bool {
        bool::from(PasswordDigest::of(password).0.ct_eq(&self.0))
    }
}

impl fmt::Debug for PasswordDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordDigest(<redacted>)")
    }
}

/// One named user of `users:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub password: PasswordDigest,
    pub roles: Roles,
}

/// Who a session is: the user name `CLIENT LIST` shows and the roles that decide what it may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub roles: Roles,
}

impl Identity {
    pub fn default_user() -> Identity {
        Identity { user: "default".into(), roles: Roles::ADMIN }
    }
}

/// How the `default` user is set up, as redis-server's `user default ...` would be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultUser<'a> {
    /// No `requirepass` and no users: `on nopass`, every connection is `default` (admin).
    NoPass,
    /// `requirepass`: `on >password`.
    Password(&'a str),
    /// No `requirepass` but named users: `off`, so every client must `AUTH` as a named user.
    Off,
}

impl DefaultUser<'_> {
    pub fn of<'a>(requirepass: Option<&'a str>, users: &[User]) -> DefaultUser<'a> {
        match requirepass {
            Some(password) => DefaultUser::Password(password),
            None if users.is_empty() => DefaultUser::NoPass,
            None => DefaultUser::Off,
        }
    }
}

/// Why an `AUTH` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// redis-server's `-WRONGPASS invalid username-password pair or user is disabled.`
    WrongPass,
    /// `AUTH <password>` while the default user has no password.
    NoPasswordConfigured,
}

/// `AUTH [user] password`: the identity it grants, or why not. An unknown user costs the same
/// digest comparison as a known one, so the time taken does not say which names exist.
pub fn authenticate(
    default: DefaultUser<'_>,
    users: &[User],
    user: Option<&[u8]>,
    password: &[u8],
) -> Result<Identity, AuthError> {
    let Some(user) = user.filter(|u| *u != b"default") else {
        return match default {
            DefaultUser::NoPass if user.is_none() => Err(AuthError::NoPasswordConfigured),
            DefaultUser::NoPass => Ok(Identity::default_user()),
            DefaultUser::Password(required) if PasswordDigest::of(required.as_bytes()).matches(password) => {
                Ok(Identity::default_user())
            }
            DefaultUser::Password(_) => Err(AuthError::WrongPass),
            // As redis.conf `user default off` (a user with no password and no rights, disabled).
            DefaultUser::Off => Err(AuthError::WrongPass),
        };
    };
    match users.iter().find(|u| u.name.as_bytes() == user) {
        Some(found) if found.password.matches(password) => {
            Ok(Identity { user: found.name.clone(), roles: found.roles })
        }
        Some(_) => Err(AuthError::WrongPass),
        None => {
            let _ = PasswordDigest([0; 32]).matches(password);
            Err(AuthError::WrongPass)
        }
    }
}

/// Commands every user may run, authenticated or not (redis-server's `no_auth` commands).
const ANY_USER: &[&str] = &["auth", "hello", "quit", "reset"];

/// What the `replica` role runs: what redis-server and a relay send as replicas.
const REPLICA: &[&str] = &["ping", "replconf", "psync", "sync"];

/// What the `monitor` role runs (Sentinel's discovery and hello messages, exporters, redis-cli).
const MONITOR: &[&str] = &[
    "ping",
    "echo",
    "info",
    "role",
    "config|get",
    "client|id",
    "client|info",
    "client|list",
    "client|getname",
    "client|setname",
    "client|setinfo",
    "client|reply",
    "client|help",
    "client|no-touch",
    "command",
    "command|count",
    "command|docs",
    "command|info",
    "command|list",
    "command|help",
    "config|help",
    "select",
    "dbsize",
    "time",
    "lastsave",
    "latency|latest",
    "latency|history",
    "latency|histogram",
    "latency|help",
    "slowlog|get",
    "slowlog|len",
    "slowlog|help",
    "subscribe",
    "unsubscribe",
    "psubscribe",
    "punsubscribe",
    "publish",
    "multi",
    "exec",
    "discard",
];

/// The container commands whose subcommands are checked one by one, with the subcommands the relay
/// answers (anything else is answered by the command as an unknown subcommand, before any check).
const SUBCOMMANDS: &[(&str, &[&str])] = &[
    (
        "client",
        &["id", "info", "list", "getname", "setname", "setinfo", "reply", "help", "no-touch", "no-evict", "kill"],
    ),
    ("config", &["get", "set", "rewrite", "help", "resetstat"]),
    ("command", &["count", "docs", "info", "list", "help"]),
    ("latency", &["latest", "history", "histogram", "reset", "help"]),
    ("slowlog", &["get", "len", "reset", "help"]),
];

/// Whether `roles` may run `command`; `Err` carries redis-server's `NOPERM` reply text.
pub fn check(roles: Roles, command: &ClientCommand) -> Result<(), String> {
    if roles.contains(Role::Admin) || command.args.is_empty() {
        return Ok(());
    }
    let name = String::from_utf8_lossy(&command.args[0]).to_ascii_lowercase();
    if ANY_USER.contains(&name.as_str()) {
        return Ok(());
    }
    let full = match SUBCOMMANDS.iter().find(|(parent, _)| *parent == name) {
        Some((_, subs)) => match command.args.get(1) {
            Some(sub) => {
                let sub = String::from_utf8_lossy(sub).to_ascii_lowercase();
                if !subs.contains(&sub.as_str()) {
                    // The command itself answers: unknown subcommand.
                    return Ok(());
                }
                format!("{name}|{sub}")
            }
            // `COMMAND` alone is a command of its own; `CLIENT`/`CONFIG` alone are arity errors.
            None if name == "command" => name,
            None => return Ok(()),
        },
        None => name,
    };
    let allowed = (roles.contains(Role::Replica) && REPLICA.contains(&full.as_str()))
        || (roles.contains(Role::Monitor) && MONITOR.contains(&full.as_str()));
    if allowed {
        Ok(())
    } else {
        Err(format!("NOPERM this user has no permissions to run the '{full}' command"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn command(words: &str) -> ClientCommand {
        ClientCommand { args: words.split(' ').map(|w| Bytes::copy_from_slice(w.as_bytes())).collect() }
    }

    fn user(name: &str, password: &str, roles: &[Role]) -> User {
        User { name: name.into(), password: PasswordDigest::of(password.as_bytes()), roles: Roles::from_list(roles) }
    }

    #[test]
    fn roles_allow_what_they_name() {
        let replica = Roles::from_list(&[Role::Replica]);
        let monitor = Roles::from_list(&[Role::Monitor]);
        assert_eq!(check(replica, &command("PSYNC ? -1")), Ok(()));
        assert_eq!(check(replica, &command("REPLCONF listening-port 1")), Ok(()));
        assert_eq!(
            check(replica, &command("REPLICAOF 127.0.0.1 1")),
            Err("NOPERM this user has no permissions to run the 'replicaof' command".into())
        );
        assert_eq!(check(replica, &command("INFO")).map_err(|_| ()), Err(()));
        assert_eq!(check(monitor, &command("INFO replication")), Ok(()));
        assert_eq!(check(monitor, &command("config GET *")), Ok(()));
        assert_eq!(
            check(monitor, &command("CONFIG SET timeout 1")),
            Err("NOPERM this user has no permissions to run the 'config|set' command".into())
        );
        assert_eq!(
            check(monitor, &command("CLIENT KILL TYPE normal")),
            Err("NOPERM this user has no permissions to run the 'client|kill' command".into())
        );
        assert_eq!(check(monitor, &command("SYNC")).map_err(|_| ()), Err(()));
        assert_eq!(check(monitor, &command("CLIENT NOSUCH")), Ok(()), "unknown subcommands answer for themselves");
        assert_eq!(check(monitor, &command("LATENCY LATEST")), Ok(()), "redis_exporter's scrape");
        assert_eq!(check(monitor, &command("SLOWLOG GET 10")), Ok(()));
        assert_eq!(
            check(monitor, &command("SLOWLOG RESET")),
            Err("NOPERM this user has no permissions to run the 'slowlog|reset' command".into())
        );
        assert_eq!(check(Roles::NONE, &command("AUTH a b")), Ok(()));
        assert_eq!(check(monitor.with(Role::Admin), &command("REPLICAOF h 1")), Ok(()));
        assert_eq!(check(Roles::ADMIN, &command("RELAY HISTORY ACCEPT")), Ok(()));
    }

    #[test]
    fn authentication_follows_the_default_user_and_the_users() {
        let users = vec![user("sentinel", "s-pw", &[Role::Monitor, Role::Admin])];
        let ok = |d, u: Option<&str>, p: &str| authenticate(d, &users, u.map(str::as_bytes), p.as_bytes());
        let sentinel = ok(DefaultUser::Off, Some("sentinel"), "s-pw").unwrap();
        assert_eq!(sentinel.user, "sentinel");
        assert!(sentinel.roles.contains(Role::Admin) && !sentinel.roles.contains(Role::Replica));
        assert_eq!(ok(DefaultUser::Off, Some("sentinel"), "s-pw "), Err(AuthError::WrongPass));
        assert_eq!(ok(DefaultUser::Off, Some("nobody"), "s-pw"), Err(AuthError::WrongPass));
        assert_eq!(ok(DefaultUser::Off, Some("default"), "x"), Err(AuthError::WrongPass));
        assert_eq!(ok(DefaultUser::Off, None, "x"), Err(AuthError::WrongPass));
        assert_eq!(ok(DefaultUser::Password("pw"), None, "pw"), Ok(Identity::default_user()));
        assert_eq!(ok(DefaultUser::Password("pw"), Some("default"), "pw"), Ok(Identity::default_user()));
        assert_eq!(ok(DefaultUser::Password("pw"), None, "pw2"), Err(AuthError::WrongPass));
        assert_eq!(ok(DefaultUser::NoPass, Some("default"), "any"), Ok(Identity::default_user()));
        assert_eq!(ok(DefaultUser::NoPass, None, "any"), Err(AuthError::NoPasswordConfigured));
        assert!(!format!("{:?}", users[0]).contains("s-pw"));
    }
}
