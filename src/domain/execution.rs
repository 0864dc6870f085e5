use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{ExecutionId, RunCore, StateProposal};

pub const MAX_TASK_ID_CHARS: usize = 200;
pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_GOAL_CHARS: usize = 10_000;
pub const MAX_DEPTH_RANGE: std::ops::RangeInclusive<i32> = 1..=10;
pub const DEFAULT_MAX_DEPTH: i32 = 3;
pub const MAX_REQUEST_ID_CHARS: usize = 100;
pub const MAX_METADATA_PAIRS: usize = 10;
pub const MAX_METADATA_KEY_CHARS: usize = 50;
pub const MAX_METADATA_VALUE_CHARS: usize = 500;
pub const MAX_MODEL_CHARS: usize = 200;
pub const MAX_TOKENS_RANGE: std::ops::RangeInclusive<i32> = 1..=1_000_000;

/// A named set of model defaults an execution starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigProfile {
    General,
    HighQuality,
    Fast,
    CryptoAgent,
}

impl ConfigProfile {
    pub const NAMES: &'static str = "general, high_quality, fast, crypto_agent";

    /// Empty means the default profile, `general`.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "" | "general" => Ok(Self::General),
            "high_quality" => Ok(Self::HighQuality),
            "fast" => Ok(Self::Fast),
            "crypto_agent" => Ok(Self::CryptoAgent),
            _ => Err(format!("unknown profile; expected one of {}", Self::NAMES)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::General => "general",
            Self::HighQuality => "high_quality",
            Self::Fast => "fast",
            Self::CryptoAgent => "crypto_agent",
        }
    }

    pub fn defaults(self) -> EffectiveConfig {
        let (temperature, max_tokens, model) = match self {
            Self::General => (0.7, 4_000, "general-default"),
            Self::HighQuality => (0.3, 16_000, "high-quality-default"),
            Self::Fast => (0.5, 2_000, "fast-default"),
            Self::CryptoAgent => (0.2, 8_000, "crypto-agent-default"),
        };
        EffectiveConfig {
            temperature,
            max_tokens,
            model: model.to_owned(),
        }
    }
}

/// Per-execution overrides of a profile's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigOverrides {
    pub temperature: Option<f64>,
    pub max_tokens: Option<i32>,
    pub model: Option<String>,
}

impl ConfigOverrides {
    pub fn check_temperature(t: f64) -> Result<f64, String> {
        if (0.0..=2.0).contains(&t) {
            Ok(t)
        } else {
            Err("must be between 0 and 2".into())
        }
    }

    pub fn check_max_tokens(n: i32) -> Result<i32, String> {
        if MAX_TOKENS_RANGE.contains(&n) {
            Ok(n)
        } else {
            Err("must be between 1 and 1000000".into())
        }
    }

    pub fn check_model(m: String) -> Result<String, String> {
        check_chars(m, 1, MAX_MODEL_CHARS)
    }
}

/// A profile's defaults with the overrides applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EffectiveConfig {
    pub temperature: f64,
    pub max_tokens: i32,
    pub model: String,
}

impl EffectiveConfig {
    pub fn resolve(profile: ConfigProfile, overrides: &ConfigOverrides) -> Self {
        let base = profile.defaults();
        EffectiveConfig {
            temperature: overrides.temperature.unwrap_or(base.temperature),
            max_tokens: overrides.max_tokens.unwrap_or(base.max_tokens),
            model: overrides.model.clone().unwrap_or(base.model),
        }
    }
}

/// A validated request to create an execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewExecution {
    pub task_id: Option<String>,
    pub name: String,
    pub input: Map<String, Value>,
    pub goal: Option<String>,
    pub max_depth: i32,
    pub config_profile: ConfigProfile,
    pub config_overrides: ConfigOverrides,
    pub metadata: BTreeMap<String, String>,
    pub request_id: Option<String>,
    pub initial_state: Option<StateProposal>,
}

impl NewExecution {
    /// A digest of everything but the request_id: a repeated request_id
    /// must come with the same request.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut canonical = self.clone();
        canonical.request_id = None;
        // serde_json sorts object keys, and the maps are ordered: the
        // encoding is canonical.
        let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
        let digest = Sha256::digest(bytes);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn check_goal(goal: String) -> Result<String, String> {
        if goal.trim().is_empty() {
            return Err("must not be blank".into());
        }
        check_chars(goal, 1, MAX_GOAL_CHARS)
    }

    /// 0 means the default.
    pub fn check_max_depth(d: i32) -> Result<i32, String> {
        match d {
            0 => Ok(DEFAULT_MAX_DEPTH),
            d if MAX_DEPTH_RANGE.contains(&d) => Ok(d),
            _ => Err("must be between 1 and 10".into()),
        }
    }

    pub fn check_request_id(id: String) -> Result<String, String> {
        check_chars(id, 1, MAX_REQUEST_ID_CHARS)
    }
}

/// Checks a string map (metadata, labels) against the pair and length
/// limits, reporting each problem against `field` or `field[key]`.
pub fn check_string_map(
    field: &str,
    map: &BTreeMap<String, String>,
    violations: &mut super::Violations,
) {
    if map.len() > MAX_METADATA_PAIRS {
        violations.add(field, format!("at most {MAX_METADATA_PAIRS} pairs"));
    }
    for (k, v) in map {
        let n = k.chars().count();
        if n == 0 || n > MAX_METADATA_KEY_CHARS {
            violations.add(
                field,
                format!("keys must be 1 to {MAX_METADATA_KEY_CHARS} characters"),
            );
        }
        if k.contains('\0') {
            violations.add(field, format!("keys {NUL_REFUSED}"));
        }
        if v.contains('\0') {
            violations.add(format!("{field}[{}]", super::prefix(k)), NUL_REFUSED);
        }
        let n = v.chars().count();
        if n == 0 || n > MAX_METADATA_VALUE_CHARS {
            violations.add(
                format!("{field}[{}]", super::prefix(k)),
                format!("values must be 1 to {MAX_METADATA_VALUE_CHARS} characters"),
            );
        }
    }
}

/// Why a client's text is refused for holding a NUL character: databases
/// keep text without them (PostgreSQL refuses them outright), so no
/// identifier, key, name or message may carry one.
pub const NUL_REFUSED: &str = "must not contain NUL (\\0) characters";

/// `Err` when `s` holds a NUL character; see [`NUL_REFUSED`].
pub fn check_no_nul(s: &str) -> Result<(), String> {
    if s.contains('\0') {
        Err(NUL_REFUSED.to_owned())
    } else {
        Ok(())
    }
}

/// `s` when it has `min..=max` characters, none of them NUL.
pub fn check_chars(s: String, min: usize, max: usize) -> Result<String, String> {
    check_no_nul(&s)?;
    let n = s.chars().count();
    if n < min || n > max {
        Err(if min == 0 {
            format!("at most {max} characters")
        } else {
            format!("must be {min} to {max} characters")
        })
    } else {
        Ok(s)
    }
}

/// One run of a task, an agent, a goal or a flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    pub id: ExecutionId,
    pub tenant_id: String,
    pub task_id: Option<String>,
    pub name: String,
    pub input: Map<String, Value>,
    pub goal: Option<String>,
    pub max_depth: i32,
    pub config_profile: ConfigProfile,
    pub config_overrides: ConfigOverrides,
    pub effective_config: EffectiveConfig,
    pub metadata: BTreeMap<String, String>,
    pub request_id: Option<String>,
    pub run: RunCore,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goal_rules() {
        assert!(NewExecution::check_goal("   \n".into()).is_err());
        assert!(NewExecution::check_goal("x".repeat(10_000)).is_ok());
        assert!(NewExecution::check_goal("x".repeat(10_001)).is_err());
        // Characters, not bytes.
        assert!(NewExecution::check_goal("é".repeat(10_000)).is_ok());
    }

    #[test]
    fn max_depth_defaults_to_three_and_stays_in_range() {
        assert_eq!(NewExecution::check_max_depth(0), Ok(3));
        assert_eq!(NewExecution::check_max_depth(10), Ok(10));
        assert!(NewExecution::check_max_depth(11).is_err());
        assert!(NewExecution::check_max_depth(-1).is_err());
    }

    #[test]
    fn overrides_lay_over_the_profile() {
        let o = ConfigOverrides {
            temperature: Some(1.5),
            max_tokens: None,
            model: Some("m".into()),
        };
        let c = EffectiveConfig::resolve(ConfigProfile::Fast, &o);
        assert_eq!(c.temperature, 1.5);
        assert_eq!(c.max_tokens, ConfigProfile::Fast.defaults().max_tokens);
        assert_eq!(c.model, "m");
        assert!(ConfigProfile::parse("turbo").is_err());
        assert_eq!(ConfigProfile::parse(""), Ok(ConfigProfile::General));
    }

    #[test]
    fn string_maps_are_limited() {
        let mut v = super::super::Violations::new();
        let many: BTreeMap<_, _> = (0..11).map(|i| (format!("k{i}"), "v".into())).collect();
        check_string_map("metadata", &many, &mut v);
        assert!(!v.is_empty());
        let mut v = super::super::Violations::new();
        let bad: BTreeMap<_, _> = [("k".to_owned(), String::new())].into();
        check_string_map("metadata", &bad, &mut v);
        assert_eq!(v.iter().next().unwrap().field, "metadata[k]");
    }

    #[test]
    fn fingerprint_ignores_request_id_only() {
        let base = NewExecution {
            task_id: None,
            name: String::new(),
            input: Map::new(),
            goal: Some("g".into()),
            max_depth: 3,
            config_profile: ConfigProfile::General,
            config_overrides: ConfigOverrides::default(),
            metadata: BTreeMap::new(),
            request_id: Some("a".into()),
            initial_state: None,
        };
        let mut other = base.clone();
        other.request_id = Some("b".into());
        assert_eq!(base.fingerprint(), other.fingerprint());
        other.goal = Some("h".into());
        assert_ne!(base.fingerprint(), other.fingerprint());
    }
}
