//! Envoy string/regex/header/query matchers: sources -> **model**.

use regex::Regex;
use serde::Deserialize;

use crate::error::regex_reason;

/// An Envoy `RegexMatcher` (`{regex, google_re2}`), compiled for a FULL-string match.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawRegexMatcher")]
pub struct RegexMatcher {
    /// The pattern as written.
    pub regex: String,
    /// Compiled as `^(?:pattern)$`: Envoy's safe_regex matchers require the whole input to match.
    pub anchored: Regex,
    /// Compiled as written, for `regex_rewrite` (which replaces every match).
    pub unanchored: Regex,
}

impl RegexMatcher {
    /// Whether the whole of `text` matches.
    pub fn is_full_match(&self, text: &str) -> bool {
        self.anchored.is_match(text)
    }
}

impl PartialEq for RegexMatcher {
    fn eq(&self, other: &RegexMatcher) -> bool {
        self.regex == other.regex
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegexMatcher {
    regex: String,
    /// Accepted and validated; the regex crate is always the engine.
    #[serde(default, rename = "google_re2")]
    _google_re2: Option<RawGoogleRe2>,
}

/// `google_re2: {}` (its `max_program_size` is deprecated; the regex crate has its own limits).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGoogleRe2 {}

impl TryFrom<RawRegexMatcher> for RegexMatcher {
    type Error = String;

    fn try_from(raw: RawRegexMatcher) -> Result<RegexMatcher, String> {
        let unanchored = Regex::new(&raw.regex).map_err(|e| regex_reason(&raw.regex, &e))?;
        let anchored = Regex::new(&format!("^(?:{})$", raw.regex))
            .map_err(|e| regex_reason(&raw.regex, &e))?;
        Ok(RegexMatcher {
            regex: raw.regex,
            anchored,
            unanchored,
        })
    }
}

/// What a [`StringMatcher`] compares against.
#[derive(Debug, Clone, PartialEq)]
pub enum StringPattern {
    /// `exact`.
    Exact(String),
    /// `prefix` (non-empty).
    Prefix(String),
    /// `suffix` (non-empty).
    Suffix(String),
    /// `contains` (non-empty).
    Contains(String),
    /// `safe_regex`: full-string match; `ignore_case` does not apply.
    SafeRegex(RegexMatcher),
}

/// Envoy `StringMatcher`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawStringMatcher")]
pub struct StringMatcher {
    /// The pattern.
    pub pattern: StringPattern,
    /// `ignore_case` (exact/prefix/suffix/contains only).
    pub ignore_case: bool,
}

impl StringMatcher {
    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        let fold = |s: &str| {
            if self.ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        match &self.pattern {
            StringPattern::Exact(expected) => fold(value) == fold(expected),
            StringPattern::Prefix(prefix) => fold(value).starts_with(&fold(prefix)),
            StringPattern::Suffix(suffix) => fold(value).ends_with(&fold(suffix)),
            StringPattern::Contains(part) => fold(value).contains(&fold(part)),
            StringPattern::SafeRegex(regex) => regex.is_full_match(value),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStringMatcher {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    contains: Option<String>,
    #[serde(default)]
    safe_regex: Option<RegexMatcher>,
    #[serde(default)]
    ignore_case: bool,
}

fn non_empty(field: &str, value: String) -> Result<String, String> {
    if value.is_empty() {
        Err(format!("`{field}` must not be empty"))
    } else {
        Ok(value)
    }
}

impl TryFrom<RawStringMatcher> for StringMatcher {
    type Error = String;

    fn try_from(raw: RawStringMatcher) -> Result<StringMatcher, String> {
        let mut patterns = Vec::new();
        if let Some(value) = raw.exact {
            patterns.push(StringPattern::Exact(value));
        }
        if let Some(value) = raw.prefix {
            patterns.push(StringPattern::Prefix(non_empty("prefix", value)?));
        }
        if let Some(value) = raw.suffix {
            patterns.push(StringPattern::Suffix(non_empty("suffix", value)?));
        }
        if let Some(value) = raw.contains {
            patterns.push(StringPattern::Contains(non_empty("contains", value)?));
        }
        if let Some(value) = raw.safe_regex {
            patterns.push(StringPattern::SafeRegex(value));
        }
        let pattern = exactly_one(patterns, "exact, prefix, suffix, contains, safe_regex")?;
        Ok(StringMatcher {
            pattern,
            ignore_case: raw.ignore_case,
        })
    }
}

/// Returns the single element or says which fields form the oneof.
pub(crate) fn exactly_one<T>(mut items: Vec<T>, oneof: &str) -> Result<T, String> {
    match items.len() {
        1 => Ok(items.remove(0)),
        0 => Err(format!("one of {oneof} is required")),
        _ => Err(format!("only one of {oneof} may be set")),
    }
}

/// How a [`HeaderMatcher`] tests the header.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderMatchRule {
    /// `string_match` (or a legacy `exact_match`/`prefix_match`/... field).
    String(StringMatcher),
    /// `present_match`: true = must be present, false = must be absent.
    Present(bool),
    /// `range_match [start, end)` over a base-10 integer value.
    Range {
        /// Inclusive start.
        start: i64,
        /// Exclusive end.
        end: i64,
    },
}

/// Envoy `HeaderMatcher`. Several values of one header are joined with `,` before matching.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawHeaderMatcher")]
pub struct HeaderMatcher {
    /// Header name, lower-cased.
    pub name: String,
    /// The test.
    pub rule: HeaderMatchRule,
    /// `invert_match`.
    pub invert_match: bool,
    /// `treat_missing_header_as_empty`.
    pub treat_missing_header_as_empty: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderMatcher {
    name: String,
    #[serde(default)]
    string_match: Option<StringMatcher>,
    #[serde(default)]
    present_match: Option<bool>,
    #[serde(default)]
    range_match: Option<RawRange>,
    #[serde(default)]
    exact_match: Option<String>,
    #[serde(default)]
    prefix_match: Option<String>,
    #[serde(default)]
    suffix_match: Option<String>,
    #[serde(default)]
    contains_match: Option<String>,
    #[serde(default)]
    safe_regex_match: Option<RegexMatcher>,
    #[serde(default)]
    invert_match: bool,
    #[serde(default)]
    treat_missing_header_as_empty: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    #[serde(deserialize_with = "int64")]
    start: i64,
    #[serde(deserialize_with = "int64")]
    end: i64,
}

/// Protobuf JSON writes int64 as a string or a number; accept both.
fn int64<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int64 {
        Number(i64),
        Text(String),
    }
    match Int64::deserialize(deserializer)? {
        Int64::Number(n) => Ok(n),
        Int64::Text(text) => text
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("`{text}` is not an int64"))),
    }
}

impl TryFrom<RawHeaderMatcher> for HeaderMatcher {
    type Error = String;

    fn try_from(raw: RawHeaderMatcher) -> Result<HeaderMatcher, String> {
        let legacy = |pattern: StringPattern| {
            HeaderMatchRule::String(StringMatcher {
                pattern,
                ignore_case: false,
            })
        };
        let mut rules = Vec::new();
        if let Some(matcher) = raw.string_match {
            rules.push(HeaderMatchRule::String(matcher));
        }
        if let Some(present) = raw.present_match {
            rules.push(HeaderMatchRule::Present(present));
        }
        if let Some(range) = raw.range_match {
            if range.start >= range.end {
                return Err(format!(
                    "range_match start {} must be below end {}",
                    range.start, range.end
                ));
            }
            rules.push(HeaderMatchRule::Range {
                start: range.start,
                end: range.end,
            });
        }
        if let Some(value) = raw.exact_match {
            rules.push(legacy(StringPattern::Exact(value)));
        }
        if let Some(value) = raw.prefix_match {
            rules.push(legacy(StringPattern::Prefix(non_empty(
                "prefix_match",
                value,
            )?)));
        }
        if let Some(value) = raw.suffix_match {
            rules.push(legacy(StringPattern::Suffix(non_empty(
                "suffix_match",
                value,
            )?)));
        }
        if let Some(value) = raw.contains_match {
            rules.push(legacy(StringPattern::Contains(non_empty(
                "contains_match",
                value,
            )?)));
        }
        if let Some(regex) = raw.safe_regex_match {
            rules.push(legacy(StringPattern::SafeRegex(regex)));
        }
        // Envoy: a matcher with no test at all is a presence match.
        let rule = if rules.is_empty() {
            HeaderMatchRule::Present(true)
        } else {
            exactly_one(
                rules,
                "string_match, present_match, range_match, exact_match, prefix_match, suffix_match, contains_match, safe_regex_match",
            )?
        };
        if raw.name.is_empty() {
            return Err("header matcher `name` must not be empty".to_string());
        }
        Ok(HeaderMatcher {
            name: raw.name.to_ascii_lowercase(),
            rule,
            invert_match: raw.invert_match,
            treat_missing_header_as_empty: raw.treat_missing_header_as_empty,
        })
    }
}

/// How a [`QueryParameterMatcher`] tests the parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryMatchRule {
    /// `string_match` against the (first) value.
    String(StringMatcher),
    /// `present_match: true`: the parameter is present.
    Present,
}

/// Envoy `QueryParameterMatcher`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawQueryParameterMatcher")]
pub struct QueryParameterMatcher {
    /// Parameter name (≤ 1024 bytes).
    pub name: String,
    /// The test.
    pub rule: QueryMatchRule,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueryParameterMatcher {
    name: String,
    #[serde(default)]
    string_match: Option<StringMatcher>,
    #[serde(default)]
    present_match: Option<bool>,
}

impl TryFrom<RawQueryParameterMatcher> for QueryParameterMatcher {
    type Error = String;

    fn try_from(raw: RawQueryParameterMatcher) -> Result<QueryParameterMatcher, String> {
        if raw.name.is_empty() || raw.name.len() > 1024 {
            return Err("query parameter `name` must be 1 to 1024 bytes".to_string());
        }
        let rule = match (raw.string_match, raw.present_match) {
            (Some(matcher), None) => QueryMatchRule::String(matcher),
            (None, Some(true)) => QueryMatchRule::Present,
            (None, Some(false)) => return Err("present_match must be true when set".to_string()),
            (None, None) => {
                return Err("one of string_match, present_match is required".to_string())
            }
            (Some(_), Some(_)) => {
                return Err("only one of string_match, present_match may be set".to_string())
            }
        };
        Ok(QueryParameterMatcher {
            name: raw.name,
            rule,
        })
    }
}
