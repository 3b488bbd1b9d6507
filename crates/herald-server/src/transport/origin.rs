//! The `Origin` check on WebSocket upgrades. Browsers always send `Origin`;
//! other clients usually do not, and a request without one is allowed (the
//! check protects browser users from cross-site pages, not the server from
//! non-browser clients, which the token does).

use axum::http::HeaderMap;
use axum::http::header::{HOST, ORIGIN};

use crate::config::OriginPolicy;

/// Whether the request's `Origin` is acceptable under `policy`.
pub fn is_allowed(policy: &OriginPolicy, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    match policy {
        OriginPolicy::Any => true,
        OriginPolicy::AllowList(allowed) => allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)),
        OriginPolicy::SameOrigin => {
            let host = headers.get(HOST).and_then(|h| h.to_str().ok());
            let origin_host = origin.split_once("://").map(|(_, rest)| rest);
            matches!((host, origin_host), (Some(host), Some(origin_host)) if host.eq_ignore_ascii_case(origin_host))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(policy: &OriginPolicy, origin: Option<&str>, host: &str, expected: bool) {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, host.parse().unwrap());
        if let Some(origin) = origin {
            headers.insert(ORIGIN, origin.parse().unwrap());
        }
        assert_eq!(is_allowed(policy, &headers), expected, "{policy:?} {origin:?} {host}");
    }

    #[test]
    fn policies() {
        let same = OriginPolicy::SameOrigin;
        check(&same, None, "h:1", true);
        check(&same, Some("http://h:1"), "h:1", true);
        check(&same, Some("http://evil:1"), "h:1", false);
        check(&same, Some("null"), "h:1", false);
        let list = OriginPolicy::AllowList(vec!["https://app.example.com".into()]);
        check(&list, Some("https://app.example.com"), "h", true);
        check(&list, Some("https://evil.example.com"), "h", false);
        check(&OriginPolicy::Any, Some("https://anything"), "h", true);
    }
}
