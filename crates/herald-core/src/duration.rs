//! Human-readable durations (`250ms`, `10s`, `5m`, `1h`, `7d`) for configuration
//! files and command-line flags.

use std::time::Duration;

/// Parses `<integer><unit>` where unit is one of `ms`, `s`, `m`, `h`, `d`.
///
/// A bare integer is refused on purpose: `timeout = 10` is ambiguous and a
/// config typo should be an error, not a guess.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit (use ms, s, m, h or d)"))?;
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` does not start with a whole number"))?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("`{text}` has unknown unit `{unit}` (use ms, s, m, h or d)")),
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Formats a duration the way `parse_duration` reads it, choosing the largest
/// unit that divides it exactly.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if millis != 0 && millis.is_multiple_of(size) {
            return format!("{}{unit}", millis / size);
        }
    }
    format!("{millis}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<u64, &str>) {
        let got = parse_duration(input).map(|d| d.as_millis() as u64);
        match expected {
            Ok(ms) => assert_eq!(got, Ok(ms), "input {input:?}"),
            Err(fragment) => {
                let error = got.expect_err(input);
                assert!(error.contains(fragment), "{input:?}: {error}");
            }
        }
    }

    #[test]
    fn parses_each_unit_and_refuses_the_rest() {
        check("250ms", Ok(250));
        check("10s", Ok(10_000));
        check("5m", Ok(300_000));
        check("1h", Ok(3_600_000));
        check("7d", Ok(604_800_000));
        check(" 3s ", Ok(3_000));
        check("10", Err("no unit"));
        check("s", Err("whole number"));
        check("10x", Err("unknown unit"));
        check("99999999999999999999d", Err("whole number"));
        check("999999999999999d", Err("too large"));
    }

    #[test]
    fn format_round_trips() {
        for text in ["250ms", "10s", "5m", "1h", "7d", "0ms", "1500ms"] {
            let parsed = parse_duration(text).unwrap();
            assert_eq!(format_duration(parsed), text);
        }
    }
}
