//! Routes: adopt existing Redis publishers without changing them.
//!
//! A route listens on a Redis channel or pattern (`user_noti:*`) and maps
//! each message to Herald channels, either by template (`user:{1}`, where
//! `{1}` is what the first `*` matched) or by a field of the JSON payload
//! (`to_user_id` → `user:{value}`). Every node listens to every route and
//! delivers to its own subscribers, so a route message is never re-published.
//!
//! ```toml
//! [[redis.routes]]                       # the seed notification service
//! redis_channel = "user_noti:*"
//! herald_channel = "user:{1}"
//! type_field = "type"                    # deliver with the payload's "type"
//! data_field = "payload"                 # deliver the payload's "payload" as data
//!
//! [[redis.routes]]                       # one channel, routed by field
//! redis_channel = "message_notifications"
//! targets = [{ field = "to_user_id", channel = "user:{value}" },
//!            { field = "group_id", channel = "group:{value}" }]
//! message_type = "new_message"
//! exclude_user_field = "from_user_id"    # the sender's own connections are skipped
//! ```

use crate::frame::validate_message_type;
use crate::publication::DEFAULT_MESSAGE_TYPE;
use crate::{ChannelName, Payload, Publication};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub redis_channel: String,
    pub herald_channel: Option<String>,
    pub targets: Option<Vec<RawTarget>>,
    pub type_field: Option<String>,
    pub message_type: Option<String>,
    pub data_field: Option<String>,
    pub exclude_user_field: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub field: String,
    pub channel: String,
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct Route {
    /// The Redis pattern (`PSUBSCRIBE`d; only `*` is special here).
    pub pattern: String,
    destination: Destination,
    message_type: TypeSource,
    data_field: Option<String>,
    exclude_user_field: Option<String>,
}

#[derive(Debug, Clone)]
enum Destination {
    /// A channel template with `{1}`, `{2}`… for the `*` captures.
    Template(String),
    /// The first target whose field the payload has; `{value}` is its value.
    Fields(Vec<(String, String)>),
}

#[derive(Debug, Clone)]
enum TypeSource {
    Fixed(String),
    Field(String),
}

impl Route {
    /// Validates a raw route; `index` names it in errors.
    pub fn from_raw(raw: RawRoute, index: usize) -> Result<Route, String> {
        let key = format!("redis.routes[{index}]");
        if raw.redis_channel.is_empty() || raw.redis_channel.contains(['?', '[', ']', '\\']) {
            return Err(format!(
                "`{key}.redis_channel` must be non-empty; only `*` may be used as a wildcard"
            ));
        }
        let destination = match (raw.herald_channel, raw.targets) {
            (Some(template), None) => Destination::Template(template),
            (None, Some(targets)) if !targets.is_empty() => {
                Destination::Fields(targets.into_iter().map(|t| (t.field, t.channel)).collect())
            }
            _ => return Err(format!("`{key}` needs exactly one of `herald_channel` and `targets`")),
        };
        let message_type = match (raw.message_type, raw.type_field) {
            (Some(fixed), None) => {
                validate_message_type(&fixed).map_err(|e| format!("`{key}.message_type`: {e}"))?;
                TypeSource::Fixed(fixed)
            }
            (None, Some(field)) => TypeSource::Field(field),
            (None, None) => TypeSource::Fixed(DEFAULT_MESSAGE_TYPE.to_owned()),
            (Some(_), Some(_)) => return Err(format!("`{key}` takes `message_type` or `type_field`, not both")),
        };
        Ok(Route {
            pattern: raw.redis_channel,
            destination,
            message_type,
            data_field: raw.data_field,
            exclude_user_field: raw.exclude_user_field,
        })
    }

    /// The `*` captures if `redis_channel` matches this route.
    pub fn matches(&self, redis_channel: &str) -> Option<Vec<String>> {
        let mut parts = self.pattern.split('*');
        let first = parts.next().unwrap_or_default();
        let mut rest = redis_channel.strip_prefix(first)?;
        let parts: Vec<&str> = parts.collect();
        let mut captures = Vec::new();
        for (index, part) in parts.iter().enumerate() {
            let last = index == parts.len() - 1;
            let end = if last {
                if !rest.ends_with(part) {
                    return None;
                }
                rest.len() - part.len()
            } else {
                rest.find(part)?
            };
            captures.push(rest[..end].to_owned());
            rest = &rest[end + part.len()..];
        }
        (parts.is_empty() && rest.is_empty() || !parts.is_empty()).then_some(captures)
    }

    /// The publications one Redis message becomes (none if it names no
    /// destination this route knows).
    /// `captures` are what [`matches`](Self::matches) took from the Redis channel;
    /// `timestamp_ms` is when it arrived.
    pub fn publications(
        &self,
        captures: &[String],
        payload: &[u8],
        next_id: impl FnOnce() -> String,
        timestamp_ms: u64,
    ) -> Result<Vec<Publication>, String> {
        let needs_fields = self.data_field.is_some()
            || self.exclude_user_field.is_some()
            || matches!(self.destination, Destination::Fields(_))
            || matches!(self.message_type, TypeSource::Field(_));
        let parsed: Option<serde_json::Map<String, Value>> = if needs_fields {
            Some(serde_json::from_slice(payload).map_err(|e| format!("payload is not a JSON object: {e}"))?)
        } else {
            None
        };
        let field = |name: &str| parsed.as_ref().and_then(|object| object.get(name));
        let text_of = |value: &Value| match value {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let channel_name = match &self.destination {
            Destination::Template(template) => {
                let mut name = template.clone();
                for (index, capture) in captures.iter().enumerate() {
                    name = name.replace(&format!("{{{}}}", index + 1), capture);
                }
                name
            }
            Destination::Fields(targets) => {
                let found = targets.iter().find_map(|(name, template)| {
                    field(name)
                        .and_then(text_of)
                        .map(|value| template.replace("{value}", &value))
                });
                match found {
                    Some(name) => name,
                    None => return Ok(Vec::new()),
                }
            }
        };
        let channel = ChannelName::parse(&channel_name).map_err(|e| format!("channel `{channel_name}`: {e}"))?;
        let message_type = match &self.message_type {
            TypeSource::Fixed(fixed) => fixed.clone(),
            TypeSource::Field(name) => {
                let value = field(name)
                    .and_then(Value::as_str)
                    .unwrap_or(DEFAULT_MESSAGE_TYPE)
                    .to_owned();
                validate_message_type(&value)?;
                value
            }
        };
        let data = match &self.data_field {
            Some(name) => {
                let value = field(name).ok_or_else(|| format!("payload has no `{name}`"))?;
                RawValue::from_string(value.to_string()).map_err(|e| e.to_string())?
            }
            None => {
                let text = std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8")?;
                RawValue::from_string(text.to_owned()).map_err(|e| format!("payload is not JSON: {e}"))?
            }
        };
        let exclude_user = self
            .exclude_user_field
            .as_deref()
            .and_then(|name| field(name).and_then(text_of));
        Ok(vec![Publication {
            channel,
            message_type,
            message_id: next_id(),
            timestamp_ms,
            offset: None,
            epoch: None,
            payload: Payload::Json(data),
            from: None,
            exclude_user,
            exclude_connection: None,
            ephemeral: false,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(toml: &str) -> Route {
        #[derive(Deserialize)]
        struct Wrapper {
            route: RawRoute,
        }
        let wrapper: Wrapper = toml::from_str(&format!("[route]\n{toml}")).unwrap();
        Route::from_raw(wrapper.route, 0).unwrap()
    }

    /// What one message on `channel` becomes through `route`, which must match it.
    fn publish(route: &Route, channel: &str, payload: &[u8]) -> Result<Vec<Publication>, String> {
        let captures = route.matches(channel).expect("the route matches");
        route.publications(&captures, payload, || "id".into(), 0)
    }

    fn frames(route: &Route, channel: &str, payload: &str) -> Vec<String> {
        publish(route, channel, payload.as_bytes())
            .unwrap()
            .iter()
            .map(|p| match p.encode() {
                crate::publication::EncodedFrame::Text(text) => text,
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn patterns_capture_the_wildcards() {
        let seed = route("redis_channel = \"user_noti:*\"\nherald_channel = \"user:{1}\"");
        assert_eq!(seed.matches("user_noti:user123"), Some(vec!["user123".into()]));
        assert_eq!(seed.matches("other:user123"), None);
        let exact = route("redis_channel = \"notices\"\nherald_channel = \"news\"");
        assert_eq!(exact.matches("notices"), Some(vec![]));
        assert_eq!(exact.matches("notices2"), None);
        let middle = route("redis_channel = \"a.*.b.*\"\nherald_channel = \"x:{1}-{2}\"");
        assert_eq!(middle.matches("a.1.b.2"), Some(vec!["1".into(), "2".into()]));
    }

    #[test]
    fn the_seed_notification_contract() {
        let seed = route(
            "redis_channel = \"user_noti:*\"\nherald_channel = \"user:{1}\"\ntype_field = \"type\"\ndata_field = \"payload\"",
        );
        let frames = frames(
            &seed,
            "user_noti:user123",
            r#"{"type":"notification","payload":{"title":"Hello"}}"#,
        );
        assert_eq!(frames.len(), 1);
        let frame: Value = serde_json::from_str(&frames[0]).unwrap();
        assert_eq!(frame["type"], "notification");
        assert_eq!(frame["channel"], "user:user123");
        assert_eq!(frame["data"], serde_json::json!({"title": "Hello"}));
    }

    #[test]
    fn field_routing_and_exclusion() {
        let routed = route(
            "redis_channel = \"message_notifications\"\nmessage_type = \"new_message\"\nexclude_user_field = \"from_user_id\"\ntargets = [{ field = \"to_user_id\", channel = \"user:{value}\" }, { field = \"group_id\", channel = \"group:{value}\" }]",
        );
        let to_group = publish(
            &routed,
            "message_notifications",
            br#"{"group_id":42,"from_user_id":"alice","content":"hi"}"#,
        )
        .unwrap();
        assert_eq!(to_group[0].channel.as_str(), "group:42");
        assert_eq!(to_group[0].exclude_user.as_deref(), Some("alice"));
        assert_eq!(to_group[0].message_type, "new_message");
        let to_user = publish(&routed, "message_notifications", br#"{"to_user_id":"bob"}"#).unwrap();
        assert_eq!(to_user[0].channel.as_str(), "user:bob");
        let nowhere = publish(&routed, "message_notifications", br#"{"x":1}"#).unwrap();
        assert!(nowhere.is_empty());
        assert!(publish(&routed, "message_notifications", b"not json").is_err());
    }

    #[test]
    fn invalid_routes_are_refused() {
        #[derive(Deserialize)]
        struct Wrapper {
            route: RawRoute,
        }
        let check = |toml: &str, fragment: &str| {
            let wrapper: Wrapper = toml::from_str(&format!("[route]\n{toml}")).unwrap();
            let error = Route::from_raw(wrapper.route, 3).unwrap_err();
            assert!(error.contains(fragment), "{error}");
        };
        check("redis_channel = \"a\"", "exactly one of `herald_channel` and `targets`");
        check("redis_channel = \"a?\"\nherald_channel = \"x\"", "only `*`");
        check(
            "redis_channel = \"a\"\nherald_channel = \"x\"\nmessage_type = \"ack\"",
            "redis.routes[3].message_type",
        );
    }
}
