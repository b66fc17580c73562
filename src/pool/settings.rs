//! The pool's run-time settings (sizes and strategy), and partial changes to them as
//! `POST /api/v1/pool/config`, `wirepool_pool_reconfigure_json` and Python's
//! `Pool.reconfigure` take them: a JSON object with only the keys that change.
//!
//! A change is parsed here, on the caller's thread, and applied on the pool thread to
//! the settings in force at that moment, so two callers changing different keys at
//! once (the admin port and a C++ thread, say) do not undo each other's change. The
//! pool thread checks the sizes against each other ([`PoolSettings`] as a whole).

use serde::Serialize;
use serde_json::Value;

use crate::config::Strategy;

/// Pool settings that may change at run time. Serialised as `GET /api/v1/pool/config`
/// and `wirepool_pool_settings_json` show them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PoolSettings {
    /// Connections kept open.
    pub min_connections: u32,
    /// Upper bound for added connections.
    pub max_connections: u32,
    /// How new connections pick a server.
    pub strategy: Strategy,
}

/// A change of some of the [`PoolSettings`]; the fields left `None` keep their value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct SettingsUpdate {
    pub min_connections: Option<u32>,
    pub max_connections: Option<u32>,
    pub strategy: Option<Strategy>,
}

impl From<PoolSettings> for SettingsUpdate {
    /// Every field given: the settings become exactly these.
    fn from(settings: PoolSettings) -> SettingsUpdate {
        SettingsUpdate {
            min_connections: Some(settings.min_connections),
            max_connections: Some(settings.max_connections),
            strategy: Some(settings.strategy),
        }
    }
}

impl SettingsUpdate {
    /// Parses a JSON object with any of `min_connections`, `max_connections` and
    /// `strategy`. The error says what is wrong (not JSON, not an object, which key is
    /// unknown, which value is out of range) in words meant for the caller.
    pub(crate) fn from_json(body: &[u8]) -> Result<SettingsUpdate, String> {
        const EXAMPLE: &str =
            r#"{"min_connections": 2, "max_connections": 8, "strategy": "round_robin"}"#;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(format!("expected a JSON object such as {EXAMPLE}"));
        }
        let value: Value =
            serde_json::from_slice(body).map_err(|err| format!("the body is not JSON: {err}"))?;
        let Value::Object(fields) = value else {
            return Err(format!("expected a JSON object such as {EXAMPLE}"));
        };
        if let Some(unknown) = fields.keys().find(|key| {
            !matches!(
                key.as_str(),
                "min_connections" | "max_connections" | "strategy"
            )
        }) {
            return Err(format!(
                "unknown key {unknown:?}; expected min_connections, max_connections or strategy"
            ));
        }
        let mut update = SettingsUpdate::default();
        if let Some(value) = fields.get("min_connections") {
            update.min_connections = Some(connection_count("min_connections", value)?);
        }
        if let Some(value) = fields.get("max_connections") {
            update.max_connections = Some(connection_count("max_connections", value)?);
        }
        if let Some(value) = fields.get("strategy") {
            let strategy = serde_json::from_value::<Strategy>(value.clone()).map_err(|_| {
                format!(
                    "strategy: {value} is not one of \"round_robin\", \"least_connections\", \
                     \"weighted\", \"random\""
                )
            })?;
            update.strategy = Some(strategy);
        }
        Ok(update)
    }

    /// `current` with the given fields replaced.
    pub(crate) fn apply_to(self, current: PoolSettings) -> PoolSettings {
        PoolSettings {
            min_connections: self.min_connections.unwrap_or(current.min_connections),
            max_connections: self.max_connections.unwrap_or(current.max_connections),
            strategy: self.strategy.unwrap_or(current.strategy),
        }
    }
}

fn connection_count(key: &str, value: &Value) -> Result<u32, String> {
    value
        .as_u64()
        .and_then(|count| u32::try_from(count).ok())
        .ok_or_else(|| {
            format!(
                "{key}: {value} is not a whole number from 0 to {}",
                u32::MAX
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PoolSettings {
        PoolSettings {
            min_connections: 2,
            max_connections: 4,
            strategy: Strategy::RoundRobin,
        }
    }

    fn update(body: &[u8]) -> Result<PoolSettings, String> {
        SettingsUpdate::from_json(body).map(|update| update.apply_to(settings()))
    }

    #[test]
    fn updates_merge_into_the_current_settings() {
        let updated =
            update(br#"{"max_connections": 8, "strategy": "least_connections"}"#).expect("valid");
        assert_eq!(updated.min_connections, 2);
        assert_eq!(updated.max_connections, 8);
        assert_eq!(updated.strategy, Strategy::LeastConnections);
        assert_eq!(update(b"{}").ok(), Some(settings()));
        assert_eq!(
            SettingsUpdate::from(settings()).apply_to(PoolSettings {
                min_connections: 0,
                max_connections: 1,
                strategy: Strategy::Random,
            }),
            settings()
        );
    }

    #[test]
    fn updates_name_what_is_wrong() {
        let unknown = update(br#"{"min_connections": 1, "maxx": 3}"#).expect_err("unknown key");
        assert!(unknown.contains("\"maxx\""), "{unknown}");
        let negative = update(br#"{"min_connections": -1}"#).expect_err("negative");
        assert!(negative.starts_with("min_connections:"), "{negative}");
        let fraction = update(br#"{"max_connections": 2.5}"#).expect_err("fraction");
        assert!(fraction.starts_with("max_connections: 2.5"), "{fraction}");
        let text = update(br#"{"max_connections": "3"}"#).expect_err("a string");
        assert!(text.starts_with("max_connections:"), "{text}");
        let too_large = update(br#"{"min_connections": 4294967296}"#).expect_err("too large");
        assert!(too_large.starts_with("min_connections:"), "{too_large}");
        let strategy = update(br#"{"strategy": "fastest"}"#).expect_err("strategy");
        assert!(strategy.contains("fastest"), "{strategy}");
        assert!(update(b"").is_err());
        assert!(update(b"[1]").is_err());
        assert!(update(b"{").is_err());
    }
}
