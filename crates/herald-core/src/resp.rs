//! RESP2, the Redis protocol: encoding commands and incrementally parsing
//! replies, and `redis://` URLs. Pure functions; the server and the bench
//! own the sockets.
//!
//! Parsing is bounded: bulk strings longer than [`MAX_BULK`], arrays longer
//! than [`MAX_ARRAY`] and nesting deeper than [`MAX_DEPTH`] are errors, so a
//! corrupt or hostile stream cannot make the parser allocate without limit.

use bytes::{BufMut, Bytes, BytesMut};

/// The largest bulk string accepted (Herald's messages are far smaller).
pub const MAX_BULK: usize = 64 * 1024 * 1024;
/// The most elements in one array.
pub const MAX_ARRAY: usize = 1024 * 1024;
/// The deepest nesting of arrays (stream replies nest four deep).
pub const MAX_DEPTH: usize = 16;

/// A RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Integer(i64),
    /// `None` is the null bulk string.
    Bulk(Option<Bytes>),
    /// `None` is the null array.
    Array(Option<Vec<Value>>),
}

/// The stream is not RESP, or breaks a bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid RESP: {0}")]
pub struct RespError(pub String);

impl Value {
    /// The bytes of a bulk or simple string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bulk(Some(bytes)) => Some(bytes),
            Value::Simple(text) => Some(text.as_bytes()),
            _ => None,
        }
    }

    /// A bulk or simple string as UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        self.as_bytes().and_then(|bytes| std::str::from_utf8(bytes).ok())
    }

    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Value::Integer(n) => Some(*n),
            _ => None,
        }
    }

    /// The elements of a non-null array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(Some(items)) => Some(items),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Bulk(None) | Value::Array(None))
    }
}

/// Where and how to connect, parsed from
/// `redis://[[username]:password@]host[:port][/db]` (also `password@` alone):
/// `host` may be a bracketed IPv6 address (`[::1]`), the port defaults to
/// 6379 and the database to 0. A username means an ACL user (`AUTH user pw`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisAddress {
    pub host_port: String,
    pub password: Option<String>,
    pub username: Option<String>,
    pub database: u32,
}

impl RedisAddress {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("redis://").ok_or("must start with redis://")?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (credentials, host_port) = match authority.rsplit_once('@') {
            Some((credentials, host_port)) => (Some(credentials), host_port),
            None => (None, authority),
        };
        if host_port.is_empty() {
            return Err("has no host".into());
        }
        // The port is optional, also after a bracketed IPv6 address.
        let has_port = if host_port.starts_with('[') {
            host_port.contains("]:")
        } else {
            host_port.contains(':')
        };
        let host_port = if has_port {
            host_port.to_owned()
        } else {
            format!("{host_port}:6379")
        };
        let (username, password) = match credentials {
            None => (None, None),
            Some(credentials) => match credentials.split_once(':') {
                Some(("", password)) => (None, Some(password.to_owned())),
                Some((user, password)) => (Some(user.to_owned()), Some(password.to_owned())),
                None => (None, Some(credentials.to_owned())),
            },
        };
        let database = if path.is_empty() {
            0
        } else {
            path.parse().map_err(|_| format!("database `{path}` is not a number"))?
        };
        Ok(RedisAddress {
            host_port,
            password,
            username,
            database,
        })
    }
}

/// Appends a command (an array of bulk strings) to `out`.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A], out: &mut BytesMut) {
    out.put_u8(b'*');
    put_decimal(out, args.len());
    for arg in args {
        let arg = arg.as_ref();
        out.put_u8(b'$');
        put_decimal(out, arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

fn put_decimal(out: &mut BytesMut, n: usize) {
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Parses one value from the start of `input`: `Ok(None)` when more bytes
/// are needed, else the value and how many bytes it took.
pub fn parse(input: &[u8]) -> Result<Option<(Value, usize)>, RespError> {
    parse_at(input, 0, 0)
}

fn parse_at(input: &[u8], start: usize, depth: usize) -> Result<Option<(Value, usize)>, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError(format!("arrays nested deeper than {MAX_DEPTH}")));
    }
    let Some(&kind) = input.get(start) else { return Ok(None) };
    let Some((line, after_line)) = line(input, start + 1)? else {
        return Ok(None);
    };
    match kind {
        b'+' => Ok(Some((Value::Simple(text(line)?), after_line))),
        b'-' => Ok(Some((Value::Error(text(line)?), after_line))),
        b':' => Ok(Some((Value::Integer(integer(line)?), after_line))),
        b'$' => {
            let length = integer(line)?;
            if length == -1 {
                return Ok(Some((Value::Bulk(None), after_line)));
            }
            let length = usize::try_from(length).map_err(|_| RespError(format!("bulk length {length}")))?;
            if length > MAX_BULK {
                return Err(RespError(format!("bulk string of {length} bytes exceeds {MAX_BULK}")));
            }
            let end = after_line + length;
            if input.len() < end + 2 {
                return Ok(None);
            }
            if &input[end..end + 2] != b"\r\n" {
                return Err(RespError("bulk string not followed by CRLF".into()));
            }
            Ok(Some((
                Value::Bulk(Some(Bytes::copy_from_slice(&input[after_line..end]))),
                end + 2,
            )))
        }
        b'*' => {
            let length = integer(line)?;
            if length == -1 {
                return Ok(Some((Value::Array(None), after_line)));
            }
            let length = usize::try_from(length).map_err(|_| RespError(format!("array length {length}")))?;
            if length > MAX_ARRAY {
                return Err(RespError(format!("array of {length} elements exceeds {MAX_ARRAY}")));
            }
            // Never trust the announced length for a preallocation.
            let mut items = Vec::with_capacity(length.min(64));
            let mut position = after_line;
            for _ in 0..length {
                let Some((item, next)) = parse_at(input, position, depth + 1)? else {
                    return Ok(None);
                };
                items.push(item);
                position = next;
            }
            Ok(Some((Value::Array(Some(items)), position)))
        }
        other => Err(RespError(format!("unexpected type byte {other:#04x}"))),
    }
}

/// The line starting at `start` (without CRLF) and the index after its CRLF.
fn line(input: &[u8], start: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let rest = input.get(start..).unwrap_or_default();
    match rest.windows(2).position(|pair| pair == b"\r\n") {
        Some(end) => Ok(Some((&rest[..end], start + end + 2))),
        None if rest.len() > 64 * 1024 => Err(RespError("line longer than 64 KiB".into())),
        None => Ok(None),
    }
}

fn text(line: &[u8]) -> Result<String, RespError> {
    String::from_utf8(line.to_vec()).map_err(|_| RespError("line is not UTF-8".into()))
}

fn integer(line: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RespError(format!("`{}` is not an integer", String::from_utf8_lossy(line))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::Bulk(Some(Bytes::copy_from_slice(text.as_bytes())))
    }

    fn check(input: &[u8], expected: Result<Option<(Value, usize)>, &str>) {
        let got = parse(input);
        match expected {
            Ok(value) => assert_eq!(got, Ok(value), "{:?}", String::from_utf8_lossy(input)),
            Err(fragment) => {
                let error = got.expect_err(&String::from_utf8_lossy(input)).0;
                assert!(error.contains(fragment), "{error}");
            }
        }
    }

    #[test]
    fn parses_every_type() {
        check(b"+OK\r\n", Ok(Some((Value::Simple("OK".into()), 5))));
        check(b"-ERR no\r\n", Ok(Some((Value::Error("ERR no".into()), 9))));
        check(b":-42\r\n", Ok(Some((Value::Integer(-42), 6))));
        check(b"$5\r\nhello\r\n", Ok(Some((bulk("hello"), 11))));
        check(b"$0\r\n\r\n", Ok(Some((bulk(""), 6))));
        check(b"$-1\r\n", Ok(Some((Value::Bulk(None), 5))));
        check(b"*-1\r\n", Ok(Some((Value::Array(None), 5))));
        check(
            b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n:1\r\nextra",
            Ok(Some((
                Value::Array(Some(vec![bulk("message"), bulk("c"), Value::Integer(1)])),
                28,
            ))),
        );
        check(
            b"*1\r\n*1\r\n+x\r\n",
            Ok(Some((
                Value::Array(Some(vec![Value::Array(Some(vec![Value::Simple("x".into())]))])),
                12,
            ))),
        );
    }

    #[test]
    fn incomplete_input_asks_for_more() {
        let full = b"*2\r\n$3\r\nfoo\r\n:7\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse(full).unwrap().is_some());
    }

    #[test]
    fn bad_input_is_an_error() {
        check(b"?x\r\n", Err("unexpected type byte"));
        check(b":abc\r\n", Err("not an integer"));
        check(b"$3\r\nabcXY", Err("not followed by CRLF"));
        check(b"$99999999999\r\n", Err("exceeds"));
        check(b"*99999999999\r\n", Err("exceeds"));
        check(b"$-5\r\n", Err("bulk length"));
        let deep = "*1\r\n".repeat(MAX_DEPTH + 2);
        check(deep.as_bytes(), Err("nested deeper"));
    }

    #[test]
    fn addresses() {
        let parse = |url| RedisAddress::parse(url);
        assert_eq!(
            parse("redis://127.0.0.1:6390/2").unwrap(),
            RedisAddress {
                host_port: "127.0.0.1:6390".into(),
                password: None,
                username: None,
                database: 2
            }
        );
        assert_eq!(parse("redis://:pw@host").unwrap().password.as_deref(), Some("pw"));
        assert_eq!(parse("redis://host").unwrap().host_port, "host:6379");
        let with_user = parse("redis://user:pw@host:1").unwrap();
        assert_eq!(
            (with_user.username.as_deref(), with_user.password.as_deref()),
            (Some("user"), Some("pw"))
        );
        assert_eq!(parse("redis://[::1]").unwrap().host_port, "[::1]:6379");
        assert_eq!(parse("redis://[::1]:7000").unwrap().host_port, "[::1]:7000");
        assert!(parse("http://host").is_err());
        assert!(parse("redis://host/x").is_err());
        assert!(parse("redis://").is_err());
    }

    #[test]
    fn commands_encode_as_arrays_of_bulk_strings() {
        let mut out = BytesMut::new();
        encode_command(&["SET", "k", ""], &mut out);
        assert_eq!(&out[..], b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
        let (value, used) = parse(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(value, Value::Array(Some(vec![bulk("SET"), bulk("k"), bulk("")])));
    }
}
