//! Glob matching as redis-server's `stringmatchlen`, the one matcher of the relay's client
//! commands: `PSUBSCRIBE` patterns (case-sensitive) and `CONFIG GET` patterns (case-insensitive).
//! `*`, `?`, `[...]` with ranges and `^` negation, `\\` escaping the next character, with its
//! corners: an empty string matches no pattern, an unterminated `[` class ends the pattern.
//!
//! Patterns come from clients, so the matcher is bounded as redis-server's is: recursion stops at a
//! depth of 1000, and a `*` that has tried every split of the rest of the string stops the outer
//! ones (`*a*a*a…b` stays polynomial).

/// Case-sensitive, as `PSUBSCRIBE` patterns match channels.
pub(crate) fn glob_match(pattern: &[u8], string: &[u8]) -> bool {
    let mut string_exhausted = false;
    glob_from(pattern, string, Case::Sensitive, &mut string_exhausted, 0)
}

/// Case-insensitive (ASCII), as `CONFIG GET` patterns match parameter names.
pub(crate) fn glob_match_nocase(pattern: &[u8], string: &[u8]) -> bool {
    let mut string_exhausted = false;
    glob_from(pattern, string, Case::Insensitive, &mut string_exhausted, 0)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Sensitive,
    Insensitive,
}

impl Case {
    fn fold(self, byte: u8) -> u8 {
        match self {
            Case::Sensitive => byte,
            Case::Insensitive => byte.to_ascii_lowercase(),
        }
    }
}

/// One level of the match. `string_exhausted` is set when a `*` has tried every split of the rest of
/// the string: no outer `*` can do better by consuming more, which keeps `*a*a*a…` polynomial.
fn glob_from(mut pattern: &[u8], mut string: &[u8], case: Case, string_exhausted: &mut bool, nesting: usize) -> bool {
    // redis-server's cap on recursion depth.
    if nesting > 1000 {
        return false;
    }
    while !pattern.is_empty() && !string.is_empty() {
        match pattern[0] {
            b'*' => {
                while pattern.len() > 1 && pattern[1] == b'*' {
                    pattern = &pattern[1..];
                }
                if pattern.len() == 1 {
                    return true;
                }
                while !string.is_empty() {
                    if glob_from(&pattern[1..], string, case, string_exhausted, nesting + 1) {
                        return true;
                    }
                    if *string_exhausted {
                        return false;
                    }
                    string = &string[1..];
                }
                *string_exhausted = true;
                return false;
            }
            b'?' => string = &string[1..],
            b'[' => {
                let c = case.fold(string[0]);
                pattern = &pattern[1..];
                let negate = pattern.first() == Some(&b'^');
                if negate {
                    pattern = &pattern[1..];
                }
                let mut matched = false;
                loop {
                    match pattern {
                        // Unterminated: stop here; the outer step consumes nothing more.
                        [] => break,
                        [b'\\', escaped, ..] => {
                            matched |= case.fold(*escaped) == c;
                            pattern = &pattern[2..];
                        }
                        [b']', ..] => {
                            pattern = &pattern[1..];
                            break;
                        }
                        [low, b'-', high, ..] => {
                            let (low, high) = (case.fold(*low), case.fold(*high));
                            let (low, high) = if low <= high { (low, high) } else { (high, low) };
                            matched |= (low..=high).contains(&c);
                            pattern = &pattern[3..];
                        }
                        [single, ..] => {
                            matched |= case.fold(*single) == c;
                            pattern = &pattern[1..];
                        }
                    }
                }
                if matched == negate {
                    return false;
                }
                string = &string[1..];
                if string.is_empty() {
                    while pattern.first() == Some(&b'*') {
                        pattern = &pattern[1..];
                    }
                    break;
                }
                continue;
            }
            first => {
                let literal = if first == b'\\' && pattern.len() >= 2 {
                    pattern = &pattern[1..];
                    pattern[0]
                } else {
                    first
                };
                if case.fold(string[0]) != case.fold(literal) {
                    return false;
                }
                string = &string[1..];
            }
        }
        pattern = &pattern[1..];
        if string.is_empty() {
            while pattern.first() == Some(&b'*') {
                pattern = &pattern[1..];
            }
            break;
        }
    }
    pattern.is_empty() && string.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn glob_matches_like_stringmatchlen() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "", false),
            ("*", "anything", true),
            ("__sentinel__:*", "__sentinel__:hello", true),
            ("__sentinel__:*", "__sentinel__", false),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h*llo", "hllo", true),
            ("h*llo", "heeeello", true),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h[b-a]llo", "hallo", true),
            ("h[a-b]llo", "hcllo", false),
            ("h\\*llo", "h*llo", true),
            ("h\\*llo", "hello", false),
            ("h[\\]]llo", "h]llo", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("abc", "ab", false),
            ("ab", "abc", false),
            ("a**", "a", true),
            ("[abc", "a", true),
            ("[abc", "ab", false),
            ("a[", "ab", false),
            ("\\", "\\", true),
        ];
        for (pattern, string, expected) in cases {
            assert_eq!(glob_match(pattern.as_bytes(), string.as_bytes()), *expected, "{pattern:?} vs {string:?}");
        }
    }

    #[test]
    fn backtracking_is_bounded() {
        let pattern = "*a".repeat(40) + "b";
        let string = "a".repeat(20_000);
        let started = Instant::now();
        assert!(!glob_match(pattern.as_bytes(), string.as_bytes()));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn nocase_matches_config_names_like_redis() {
        assert!(glob_match_nocase(b"*", b"maxclients"));
        assert!(glob_match_nocase(b"repl-*", b"repl-timeout"));
        assert!(glob_match_nocase(b"REPL-*", b"repl-timeout"));
        assert!(!glob_match(b"REPL-*", b"repl-timeout"), "the pub/sub form is case-sensitive");
        assert!(!glob_match_nocase(b"repl-*", b"port"));
        assert!(glob_match_nocase(b"p?rt", b"port"));
        assert!(glob_match_nocase(b"[PQ]ort", b"port"));
        assert!(!glob_match_nocase(b"[^p]ort", b"port"));
        assert!(glob_match_nocase(b"[A-Z]ort", b"port"));
        assert!(glob_match_nocase(b"\\*", b"*"));
        assert!(!glob_match_nocase(b"\\*", b"x"));
        assert!(!glob_match_nocase(b"port", b"ports"));
    }

    /// A client's pattern must cost only bounded time and stack: 200,000 `*`s (the old recursive
    /// matcher of CONFIG GET overflowed its stack) and `*a*a*…b` against a long name.
    #[test]
    fn hostile_patterns_are_bounded() {
        let started = Instant::now();
        let stars = "*".repeat(200_000) + "x";
        assert!(!glob_match_nocase(stars.as_bytes(), b"maxclients"));
        let nested = "a*".repeat(100_000) + "b";
        assert!(!glob_match_nocase(nested.as_bytes(), "a".repeat(50_000).as_bytes()));
        let backtracking = "*a".repeat(40) + "b";
        assert!(!glob_match_nocase(backtracking.as_bytes(), "A".repeat(20_000).as_bytes()));
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }
}
