//! Channel names: `namespace:name` or a bare `name`.
//!
//! The rules, documented in `docs/protocol.md`:
//! - at most [`MAX_CHANNEL_LENGTH`] bytes in all;
//! - the namespace (before the first `:`) is 1–32 of `a-z 0-9 _ -`;
//! - the name (after it, or the whole of a bare name) is one or more of
//!   `A-Z a-z 0-9 _ - . = @ | + ~ :`.
//!
//! Patterns (`team:*`, `group:4*`) appear only in a token's `channels` claim:
//! a trailing `*` matches any suffix.

use std::fmt;
use std::sync::Arc;

/// The longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LENGTH: usize = 128;
/// The longest namespace accepted, in bytes.
pub const MAX_NAMESPACE_LENGTH: usize = 32;

/// Why a string is not a channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_LENGTH} bytes")]
    TooLong,
    #[error("channel namespace `{0}` must be 1-32 of a-z 0-9 _ -")]
    BadNamespace(String),
    #[error("channel name has a character outside A-Z a-z 0-9 _ - . = @ | + ~ :")]
    BadCharacter,
    #[error("channel name has nothing after the namespace")]
    EmptyName,
}

/// A validated channel name; cloning it is a reference-count increment.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    /// Validates `text` as a channel name.
    pub fn parse(text: &str) -> Result<Self, ChannelError> {
        validate(text)?;
        Ok(ChannelName(Arc::from(text)))
    }

    /// The personal channel of `user_id`, if the id can form a channel name.
    pub fn user(user_id: &str) -> Result<Self, ChannelError> {
        Self::parse(&format!("user:{user_id}"))
    }

    /// The channel of group `group_id`.
    pub fn group(group_id: &str) -> Result<Self, ChannelError> {
        Self::parse(&format!("group:{group_id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The namespace, or `None` for a bare name.
    pub fn namespace(&self) -> Option<&str> {
        self.0.split_once(':').map(|(namespace, _)| namespace)
    }

    /// The part after the namespace (the whole name when bare).
    pub fn name(&self) -> &str {
        self.0.split_once(':').map_or(&self.0, |(_, name)| name)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl serde::Serialize for ChannelName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl AsRef<str> for ChannelName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Whether `pattern` (an entry of a token's `channels` claim) grants `channel`:
/// an exact match, or a prefix match when the pattern ends with `*`.
pub fn pattern_matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => pattern == channel,
    }
}

fn validate(text: &str) -> Result<(), ChannelError> {
    if text.is_empty() {
        return Err(ChannelError::Empty);
    }
    if text.len() > MAX_CHANNEL_LENGTH {
        return Err(ChannelError::TooLong);
    }
    let name = match text.split_once(':') {
        Some((namespace, name)) => {
            if !is_valid_namespace(namespace) {
                return Err(ChannelError::BadNamespace(namespace.to_owned()));
            }
            if name.is_empty() {
                return Err(ChannelError::EmptyName);
            }
            name
        }
        None => text,
    };
    if name.bytes().all(is_name_byte) {
        Ok(())
    } else {
        Err(ChannelError::BadCharacter)
    }
}

fn is_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"_-.=@|+~:".contains(&byte)
}

/// Whether `namespace` may stand before the `:` of a channel name: 1 to
/// [`MAX_NAMESPACE_LENGTH`] bytes of `a-z`, `0-9`, `_` and `-`.
pub fn is_valid_namespace(namespace: &str) -> bool {
    !namespace.is_empty()
        && namespace.len() <= MAX_NAMESPACE_LENGTH
        && namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<(Option<&str>, &str), ChannelError>) {
        let got = ChannelName::parse(input);
        match expected {
            Ok((namespace, name)) => {
                let channel = got.unwrap_or_else(|e| panic!("{input:?}: {e}"));
                assert_eq!((channel.namespace(), channel.name()), (namespace, name), "{input:?}");
                assert_eq!(channel.as_str(), input);
            }
            Err(error) => assert_eq!(got.err(), Some(error), "{input:?}"),
        }
    }

    #[test]
    fn names() {
        check("news", Ok((None, "news")));
        check("group:42", Ok((Some("group"), "42")));
        check("user:auth0|abc.def@x", Ok((Some("user"), "auth0|abc.def@x")));
        check("team:a:b", Ok((Some("team"), "a:b")));
        check("", Err(ChannelError::Empty));
        check(&"a".repeat(129), Err(ChannelError::TooLong));
        check(":x", Err(ChannelError::BadNamespace(String::new())));
        check("Group:1", Err(ChannelError::BadNamespace("Group".into())));
        check("group:", Err(ChannelError::EmptyName));
        check("group:a b", Err(ChannelError::BadCharacter));
        check("news*", Err(ChannelError::BadCharacter));
        check("caf\u{e9}", Err(ChannelError::BadCharacter));
    }

    #[test]
    fn longest_name_is_accepted() {
        let longest = "a".repeat(MAX_CHANNEL_LENGTH);
        assert!(ChannelName::parse(&longest).is_ok());
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("team:*", "team:red"));
        assert!(pattern_matches("group:42", "group:42"));
        assert!(!pattern_matches("group:42", "group:421"));
        assert!(pattern_matches("group:4*", "group:421"));
        assert!(!pattern_matches("team:*", "teams:red"));
    }
}
