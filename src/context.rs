//! Context requirements of a rule: where the request comes from (`source_cidrs`), its
//! headers, the time (UTC windows), and conditions on any claim (`trust_score >= 0.7`).

use crate::config::{ConditionConfig, TimeWindowConfig};
use ipnet::IpNet;
use serde_json::{Map, Value};
use std::net::IpAddr;

/// One condition on a value that may be absent: every operator given must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// A header name (lower case) or a dot-separated claim path.
    pub key: String,
    pub present: Option<bool>,
    pub equals: Option<Value>,
    pub one_of: Option<Vec<Value>>,
    pub gte: Option<f64>,
    pub lte: Option<f64>,
}

impl Condition {
    /// `key_name` is `name` for headers, `path` for claims.
    pub fn compile(raw: &ConditionConfig, key_name: &str) -> Result<Condition, String> {
        let key = match (key_name, &raw.name, &raw.path) {
            ("name", Some(name), None) => name.to_ascii_lowercase(),
            ("path", None, Some(path)) => path.clone(),
            _ => return Err(format!("give `{key_name}` (only)")),
        };
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!("`{key_name}` must not be empty"));
        }
        if raw.present.is_none()
            && raw.equals.is_none()
            && raw.one_of.is_none()
            && raw.gte.is_none()
            && raw.lte.is_none()
        {
            return Err("give at least one of present, equals, in, gte, lte".into());
        }
        Ok(Condition {
            key,
            present: raw.present,
            equals: raw.equals.clone(),
            one_of: raw.one_of.clone(),
            gte: raw.gte,
            lte: raw.lte,
        })
    }

    pub fn holds(&self, value: Option<&Value>) -> bool {
        if let Some(present) = self.present {
            if value.is_some() != present {
                return false;
            }
        }
        let Some(value) = value else {
            // Absent: only a `present: false` condition can hold.
            return self.present == Some(false)
                && self.equals.is_none()
                && self.one_of.is_none()
                && self.gte.is_none()
                && self.lte.is_none();
        };
        let number = value.as_f64();
        self.equals.as_ref().is_none_or(|e| e == value)
            && self.one_of.as_ref().is_none_or(|set| set.contains(value))
            && self.gte.is_none_or(|min| number.is_some_and(|n| n >= min))
            && self.lte.is_none_or(|max| number.is_some_and(|n| n <= max))
    }
}

/// A claim by dot-separated path (`tenant.id`).
pub fn claim<'c>(claims: &'c Map<String, Value>, path: &str) -> Option<&'c Value> {
    let mut parts = path.split('.');
    let mut current = claims.get(parts.next()?)?;
    for part in parts {
        current = current.get(part)?;
    }
    Some(current)
}

/// UTC weekdays and hours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeWindow {
    /// Monday = 0.
    days: Option<Vec<u8>>,
    from_hour: u8,
    to_hour: u8,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl TimeWindow {
    pub fn compile(raw: &TimeWindowConfig) -> Result<TimeWindow, String> {
        let days = match &raw.days {
            None => None,
            Some(days) if days.is_empty() => return Err("days is empty: omit it for every day".into()),
            Some(days) => Some(
                days.iter()
                    .map(|d| {
                        DAYS.iter()
                            .position(|name| name.eq_ignore_ascii_case(d))
                            .map(|i| i as u8)
                            .ok_or_else(|| format!("{d:?} is not a day (mon … sun)"))
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };
        let (from_hour, to_hour) = (raw.from_hour.unwrap_or(0), raw.to_hour.unwrap_or(24));
        if from_hour > 23 || to_hour > 24 || from_hour == to_hour {
            return Err("hours must be 0..=23 (from_hour) and 1..=24 (to_hour), and differ".into());
        }
        Ok(TimeWindow { days, from_hour, to_hour })
    }

    /// Whether Unix time `now` is inside: days (of `from_hour`'s side) and `from_hour <= hour
    /// < to_hour`, wrapping past midnight when `from_hour > to_hour`.
    pub fn contains(&self, now: i64) -> bool {
        let days_since_epoch = now.div_euclid(86_400);
        // 1970-01-01 was a Thursday.
        let weekday = (days_since_epoch + 3).rem_euclid(7) as u8;
        let hour = (now.rem_euclid(86_400) / 3600) as u8;
        let day_ok = self.days.as_ref().is_none_or(|days| days.contains(&weekday));
        if self.from_hour < self.to_hour {
            day_ok && hour >= self.from_hour && hour < self.to_hour
        } else {
            // Overnight window: the early hours belong to the previous day's window.
            let previous = (weekday + 6) % 7;
            (day_ok && hour >= self.from_hour)
                || (hour < self.to_hour && self.days.as_ref().is_none_or(|days| days.contains(&previous)))
        }
    }
}

pub fn parse_cidr(raw: &str) -> Result<IpNet, String> {
    raw.parse::<IpNet>()
        .or_else(|_| raw.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{raw:?} is not a CIDR such as 10.0.0.0/8 or 2001:db8::/32"))
}

/// The IP of a host's source address: `1.2.3.4:5678`, `[2001:db8::1]:5678` or a bare IP.
pub fn source_ip(address: &str) -> Option<IpAddr> {
    if let Ok(ip) = address.parse::<IpAddr>() {
        return Some(ip);
    }
    address.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(raw: Value, key: &str) -> Condition {
        let raw: ConditionConfig = serde_json::from_value(raw).unwrap_or_else(|e| panic!("{e}"));
        Condition::compile(&raw, key).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn conditions() {
        let trust = cond(json!({"path": "trust_score", "gte": 0.7}), "path");
        assert!(trust.holds(Some(&json!(0.9))));
        assert!(!trust.holds(Some(&json!(0.5))));
        assert!(!trust.holds(Some(&json!("0.9"))));
        assert!(!trust.holds(None));
        let tenant = cond(json!({"name": "X-Tenant", "in": ["acme", "globex"]}), "name");
        assert_eq!(tenant.key, "x-tenant");
        assert!(tenant.holds(Some(&json!("acme"))));
        assert!(!tenant.holds(Some(&json!("initech"))));
        let absent = cond(json!({"name": "x-debug", "present": false}), "name");
        assert!(absent.holds(None));
        assert!(!absent.holds(Some(&json!("1"))));
    }

    #[test]
    fn claim_paths() {
        let claims = json!({"tenant": {"id": "acme"}, "n": 1});
        let claims = claims.as_object().cloned().unwrap_or_default();
        assert_eq!(claim(&claims, "tenant.id"), Some(&json!("acme")));
        assert_eq!(claim(&claims, "tenant.name"), None);
        assert_eq!(claim(&claims, "n.x"), None);
    }

    #[test]
    fn time_windows() {
        let window = |raw: Value| {
            TimeWindow::compile(&serde_json::from_value(raw).unwrap_or_else(|e| panic!("{e}")))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        // 2027-01-04 was a Monday.
        let monday_10 = 1_799_056_800;
        let office = window(json!({"days": ["mon", "tue", "wed", "thu", "fri"], "from_hour": 9, "to_hour": 17}));
        assert!(office.contains(monday_10));
        assert!(!office.contains(monday_10 + 8 * 3600));
        assert!(!office.contains(monday_10 - 2 * 86_400), "saturday");
        let night = window(json!({"days": ["fri"], "from_hour": 22, "to_hour": 6}));
        let friday_23 = monday_10 + 4 * 86_400 + 13 * 3600;
        assert!(night.contains(friday_23));
        assert!(night.contains(friday_23 + 4 * 3600), "saturday 03:00 belongs to friday night");
        assert!(!night.contains(friday_23 - 4 * 86_400), "monday 23:00");
    }

    #[test]
    fn sources() {
        let net = parse_cidr("10.0.0.0/8").unwrap_or_else(|e| panic!("{e}"));
        assert!(source_ip("10.1.2.3:5555").is_some_and(|ip| net.contains(&ip)));
        assert!(
            source_ip("[2001:db8::1]:443").is_some_and(|ip| parse_cidr("2001:db8::/32").is_ok_and(|n| n.contains(&ip)))
        );
        assert_eq!(parse_cidr("192.168.1.7").map(|n| n.prefix_len()), Ok(32));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert_eq!(source_ip("nonsense"), None);
    }
}
