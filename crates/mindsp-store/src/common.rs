//! Pieces shared by the SQL adapters: error translation and small helpers.

#[cfg(feature = "sqlite")]
use chrono::{DateTime, Utc};
use mindsp_core::{Error, UserId};

/// Translates a sqlx error into the core's portable error. Unique violations become
/// conflicts with a stable code chosen by the constraint they hit, so callers never
/// look at backend messages.
pub(crate) fn db_err(e: sqlx::Error) -> Error {
    if let sqlx::Error::Database(db) = &e
        && db.is_unique_violation()
    {
        // PostgreSQL names the constraint; SQLite names the columns in its message.
        let hint = db
            .constraint()
            .map(str::to_owned)
            .unwrap_or_else(|| db.message().to_owned());
        let (code, message) = if hint.contains("slug") {
            ("slug_taken", "a tenant with this slug already exists")
        } else if hint.contains("email") {
            (
                "email_taken",
                "a user with this e-mail already exists in the tenant",
            )
        } else if hint.contains("direct_key") {
            (
                "direct_exists",
                "a direct conversation between these users already exists",
            )
        } else if hint.contains("idempotency_key") {
            (
                "duplicate_idempotency_key",
                "a message with this idempotency key already exists",
            )
        } else {
            ("conflict", "the change conflicts with existing data")
        };
        return Error::conflict(code, message);
    }
    Error::Storage(e.to_string())
}

/// The key that makes a direct conversation unique per pair, whatever the order.
pub(crate) fn direct_key(a: UserId, b: UserId) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("{lo}:{hi}")
}

#[cfg(feature = "sqlite")]
pub(crate) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

#[cfg(feature = "sqlite")]
pub(crate) fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Light French suffix stripping for backends without a French stemmer: the stem is
/// then matched as a prefix, so « interventions » and « intervenir » find
/// « intervention », « pompier » finds « pompiers ». Short words are left whole.
#[cfg(feature = "sqlite")]
pub(crate) fn french_prefix_stem(term: &str) -> String {
    const SUFFIXES: &[&str] = &[
        "issements",
        "issement",
        "ements",
        "ement",
        "ations",
        "ation",
        "ences",
        "ence",
        "ables",
        "able",
        "euses",
        "euse",
        "eurs",
        "eur",
        "ives",
        "ive",
        "ifs",
        "if",
        "ées",
        "és",
        "ée",
        "é",
        "ir",
        "er",
        "ez",
        "ons",
        "ent",
        "es",
        "s",
        "x",
        "e",
    ];
    let chars = term.chars().count();
    for suffix in SUFFIXES {
        let stem_len = chars.saturating_sub(suffix.chars().count());
        if term.ends_with(suffix) && stem_len >= 4 {
            return term.chars().take(stem_len).collect();
        }
    }
    term.to_owned()
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::french_prefix_stem;

    #[test]
    fn stems_keep_short_words_and_cut_common_endings() {
        assert_eq!(french_prefix_stem("feu"), "feu");
        assert_eq!(french_prefix_stem("pompiers"), "pompier");
        assert_eq!(french_prefix_stem("interventions"), "interventi");
        assert_eq!(french_prefix_stem("intervenir"), "interven");
        assert_eq!(french_prefix_stem("sécurité"), "sécurit");
    }
}
