//! Authentication: argon2id password hashes, HS256 access tokens, and the extractor
//! that turns a bearer token into an [`Actor`] on every protected route.

use std::sync::Arc;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use mindsp_core::model::{Role, User};
use mindsp_core::{Actor, Error, TenantId, UserId};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::error::ApiError;

/// Shortest password accepted for a new account.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password accepted anywhere: hashing cost grows with it, so it is bounded.
pub const MAX_PASSWORD_BYTES: usize = 256;

/// Issues and checks access tokens.
#[derive(Clone)]
pub struct Tokens {
    encoding: Arc<EncodingKey>,
    decoding: Arc<DecodingKey>,
    ttl: Duration,
}

/// What an access token says. Short names keep tokens small.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: UserId,
    /// Their tenant.
    pub tid: TenantId,
    /// Their role when the token was issued (the current role is re-read on each request).
    pub role: Role,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// When the user's password last changed as the token was issued ([`User::password_mark`]):
    /// the token holds while it still matches. `None` in tokens from before this claim
    /// (their issue time is compared instead).
    #[serde(default)]
    pub pwd: Option<i64>,
}

/// What a device token says: this device logged in to `acct` (see
/// [`Tokens::issue_device`]). No `sub`: it can never pass for an access token.
#[derive(Debug, Serialize, Deserialize)]
struct DeviceClaims {
    /// Always `device`.
    typ: String,
    /// The account, as `passwords::account` names it.
    acct: String,
    /// The device, chosen at its first login.
    dev: uuid::Uuid,
    /// The password it logged in with ([`credential_tag`]): a token from before the
    /// password changed, or of an earlier holder of the address, proves nothing.
    cred: String,
    iat: i64,
    exp: i64,
}

/// What names one password of one account in a device token: the salt of its stored
/// hash, drawn anew whenever a password is set. Not secret (salts are not), and it says
/// nothing of the password.
pub fn credential_tag(hash: &str) -> String {
    PasswordHash::new(hash)
        .ok()
        .and_then(|h| h.salt.map(|s| s.as_str().to_owned()))
        .unwrap_or_default()
}

/// How long a device token lasts (each login gives a new one).
const DEVICE_TTL_SECS: i64 = 90 * 24 * 3600;
/// Longest device token looked at.
const MAX_DEVICE_TOKEN_BYTES: usize = 1024;

impl Tokens {
    /// Keys from a shared secret (at least 32 bytes) and a lifetime.
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        Self {
            encoding: Arc::new(EncodingKey::from_secret(secret)),
            decoding: Arc::new(DecodingKey::from_secret(secret)),
            ttl,
        }
    }

    /// Token lifetime.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A signed token for `user`.
    pub fn issue(&self, user: &User) -> Result<String, ApiError> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: user.id,
            tid: user.tenant_id,
            role: user.role,
            iat: now,
            exp: now + self.ttl.as_secs() as i64,
            pwd: Some(user.password_mark()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Error::Storage(format!("cannot sign token: {e}")).into())
    }

    /// A device token: proof, at the next logins, that this device logged in to
    /// `account` before, so that failures from elsewhere do not slow it down
    /// (`passwords`). `device` keeps the id of a device that had one.
    pub fn issue_device(
        &self,
        account: &str,
        credential: String,
        device: Option<uuid::Uuid>,
    ) -> Result<String, ApiError> {
        let now = chrono::Utc::now().timestamp();
        let claims = DeviceClaims {
            typ: "device".to_owned(),
            acct: account.to_owned(),
            dev: device.unwrap_or_else(uuid::Uuid::new_v4),
            cred: credential,
            iat: now,
            exp: now + DEVICE_TTL_SECS,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Error::Storage(format!("cannot sign token: {e}")).into())
    }

    /// The device of a valid, unexpired device token issued for `account`, and the
    /// [`credential_tag`] it was issued for (to compare once the account is read).
    pub fn device(&self, token: &str, account: &str) -> Option<(uuid::Uuid, String)> {
        if token.len() > MAX_DEVICE_TOKEN_BYTES {
            return None;
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        let claims = jsonwebtoken::decode::<DeviceClaims>(token, &self.decoding, &validation)
            .ok()?
            .claims;
        (claims.typ == "device" && claims.acct == account).then_some((claims.dev, claims.cred))
    }

    /// Checks signature and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => {
                    ApiError::unauthorized("token_expired", "the access token has expired")
                }
                _ => ApiError::unauthorized("invalid_token", "the access token is not valid"),
            })
    }
}

/// Hashes a password with argon2id (default parameters: 19 MiB, 2 passes).
pub fn hash_password(password: &str) -> Result<String, Error> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Storage(format!("password hashing failed: {e}")))
}

/// Checks a password against a stored hash.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Checks a new password against the policy.
pub fn check_new_password(password: &str) -> Result<(), Error> {
    if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::invalid(
            "weak_password",
            format!("a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Runs password hashing off the async workers: it takes tens of milliseconds of CPU.
pub async fn hash_password_blocking(password: String) -> Result<String, Error> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| Error::Storage(format!("hashing task failed: {e}")))?
}

/// A hash no password matches in practice, checked when a login names no active
/// account, so that response time does not reveal which e-mails exist.
pub(crate) fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password("decoy-password").unwrap_or_default())
}

/// The claims of a valid access token and its user, re-read: the user must exist and be
/// active, and the token must have been issued for their current password (401
/// `token_revoked`: changing a password shuts out whoever logged in with the old one).
/// Every REST route and every WebSocket (at its upgrade and each `refresh_token`) goes
/// through it.
pub(crate) async fn user_of(
    tokens: &Tokens,
    messaging: &mindsp_core::Messaging,
    token: &str,
) -> Result<(Claims, User), ApiError> {
    let claims = tokens.verify(token)?;
    let mut tx = messaging.store().read(claims.tid).await?;
    let user = tx
        .user(claims.sub)
        .await?
        .filter(|u| u.active)
        .ok_or_else(|| {
            ApiError::unauthorized("invalid_token", "the account is unknown or deactivated")
        })?;
    if revoked(&claims, &user) {
        return Err(ApiError::unauthorized(
            "token_revoked",
            "the password changed after this token was issued: log in again",
        ));
    }
    Ok((claims, user))
}

/// Whether `claims` were issued for a password `user` no longer has.
fn revoked(claims: &Claims, user: &User) -> bool {
    match claims.pwd {
        Some(mark) => mark != user.password_mark(),
        None => user
            .password_changed_at
            .is_some_and(|changed| claims.iat < changed.timestamp()),
    }
}

/// The authenticated caller of a protected route: a valid, unexpired token for a user
/// who still exists and is active.
pub struct Authenticated {
    /// Who is acting, with their *current* role.
    pub actor: Actor,
    /// The user record.
    pub user: User,
}

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("unauthorized", "missing bearer token"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized("unauthorized", "expected Authorization: Bearer <token>")
            })?;
        let (_, user) = user_of(&state.tokens, &state.messaging, token.trim()).await?;
        // Writes are counted per user (`rates`); reads are not.
        if !matches!(
            parts.method,
            axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
        ) {
            state.writes.take(user.tenant_id, user.id)?;
        }
        Ok(Self {
            actor: Actor {
                tenant_id: user.tenant_id,
                user_id: user.id,
                role: user.role,
            },
            user,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn user(changed_ms: Option<i64>) -> User {
        User {
            id: UserId::new(),
            tenant_id: TenantId::new(),
            email: "a@sdis13.fr".into(),
            display_name: "A".into(),
            role: Role::Member,
            active: true,
            created_at: Utc::now(),
            password_changed_at: changed_ms.map(|ms| Utc.timestamp_millis_opt(ms).unwrap()),
        }
    }

    /// A token holds for the password it was issued for, to the millisecond: one from the
    /// same second as a later change is revoked, and no clock decides it.
    #[test]
    fn tokens_hold_for_the_password_they_were_issued_for() {
        let tokens = Tokens::new(&[7; 32], Duration::from_secs(600));
        let changed = 1_796_000_000_123;
        for before in [None, Some(changed)] {
            let mut u = user(before);
            let claims = tokens.verify(&tokens.issue(&u).unwrap()).unwrap();
            assert!(!revoked(&claims, &u), "issued for the current password");
            u.password_changed_at = Some(Utc.timestamp_millis_opt(changed + 1).unwrap());
            assert!(
                revoked(&claims, &u),
                "a change a millisecond later revokes it"
            );
        }
        // A token from before the `pwd` claim compares its issue time, in seconds.
        let u = user(Some(changed));
        let legacy = |iat| Claims {
            sub: u.id,
            tid: u.tenant_id,
            role: u.role,
            iat,
            exp: iat + 600,
            pwd: None,
        };
        assert!(revoked(&legacy(changed / 1000 - 1), &u));
        assert!(!revoked(&legacy(changed / 1000), &u));
        assert!(!revoked(&legacy(changed / 1000 - 1), &user(None)));
        let now = Utc::now().timestamp();
        let body = serde_json::json!({"sub": u.id, "tid": u.tenant_id, "role": "member",
            "iat": now, "exp": now + 600});
        let key = EncodingKey::from_secret(&[7; 32]);
        let old = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &body, &key).unwrap();
        assert_eq!(tokens.verify(&old).unwrap().pwd, None, "still accepted");
    }
}
