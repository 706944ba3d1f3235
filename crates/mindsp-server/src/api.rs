//! REST handlers. Each one extracts, calls the core service, and shapes the answer;
//! rules live in the core, status codes in `error.rs`. The routes are documented in
//! `docs/API.md`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use std::sync::Arc;

use mindsp_core::events::PresenceStatus;
use mindsp_core::jobs::{Job, JobFilter, JobQueue, JobScope, JobState};
use mindsp_core::model::{ActivityCursor, MemberRole, NewUser, Role, SeqWindow};
use mindsp_core::{ConversationId, Error, JobId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::{self, Authenticated};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Path, Query, optional_json};
use crate::passwords;

// ---- auth ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginRequest {
    tenant: String,
    email: String,
    password: String,
    /// From an earlier login on this device (see `Tokens::issue_device`).
    #[serde(default)]
    device_token: Option<String>,
}

/// `POST /api/auth/login`
pub(crate) async fn login(
    State(state): State<AppState>,
    Json(req): Json<LoginRequest>,
) -> ApiResult<axum::Json<Value>> {
    // Oversize input is refused before any hashing work.
    if req.password.len() > auth::MAX_PASSWORD_BYTES
        || req.email.len() > 254
        || req.tenant.len() > 64
        || req
            .email
            .chars()
            .chain(req.tenant.chars())
            .any(char::is_control)
    {
        return Err(Error::InvalidCredentials.into());
    }
    let slug = req.tenant.trim().to_lowercase();
    let email = req.email.trim().to_lowercase();
    let account = passwords::account(&slug, &email);
    // A device that logged in to this account before is followed on its own: failures
    // from elsewhere (someone failing on purpose with this address) do not hold it back.
    let device = req
        .device_token
        .as_deref()
        .and_then(|t| state.tokens.device(t, &account));
    let followed = match &device {
        Some((d, _)) => passwords::on_device(&account, *d),
        None => account.clone(),
    };
    let mut attempt = state.passwords.admit(followed)?;
    let store = state.messaging.store();
    let tenant = store.tenant_by_slug(&slug).await?;
    let found = match &tenant {
        Some(t) => {
            let mut tx = store.read(t.id).await?;
            tx.user_credentials(&email).await?
        }
        None => None,
    };
    let (user, hash) = match found {
        Some((u, h)) if u.active => (Some(u), Some(h)),
        _ => (None, None),
    };
    let credential = hash.as_deref().map(auth::credential_tag);
    // A device token issued for another password (changed since, or an earlier holder of
    // the address) proves nothing: the login counts for the account as a whole.
    let device = match device {
        Some((d, cred)) if credential.as_ref() == Some(&cred) => Some(d),
        Some(_) => {
            drop(attempt);
            attempt = state.passwords.admit(account.clone())?;
            None
        }
        None => None,
    };
    if !state.passwords.verify(attempt, req.password, hash).await? {
        return Err(Error::InvalidCredentials.into());
    }
    let user = user.ok_or(Error::InvalidCredentials)?;
    let mut body = access(&state, &user)?;
    body["device_token"] = json!(state.tokens.issue_device(
        &account,
        credential.unwrap_or_default(),
        device
    )?);
    body["user"] = json!(user);
    body["tenant"] = json!(tenant);
    Ok(axum::Json(body))
}

/// A new access token for `user`, as the login answers it.
fn access(state: &AppState, user: &mindsp_core::model::User) -> Result<Value, ApiError> {
    Ok(json!({
        "access_token": state.tokens.issue(user)?,
        "token_type": "Bearer",
        "expires_in": state.tokens.ttl().as_secs(),
    }))
}

/// `GET /api/me`
pub(crate) async fn me(auth: Authenticated) -> axum::Json<Value> {
    axum::Json(json!({ "user": auth.user }))
}

// ---- users --------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UsersQuery {
    limit: Option<u32>,
    /// Opaque cursor returned as `next_cursor`.
    cursor: Option<String>,
}

/// `GET /api/users`: the tenant's directory.
pub(crate) async fn list_users(
    State(state): State<AppState>,
    auth: Authenticated,
    Query(q): Query<UsersQuery>,
) -> ApiResult<axum::Json<Value>> {
    let after = q.cursor.as_deref().map(decode_user_cursor).transpose()?;
    let users = state
        .messaging
        .list_users(&auth.actor, after, q.limit)
        .await?;
    let limit = state.messaging.limits().page_size(q.limit)? as usize;
    let next = (users.len() == limit)
        .then(|| {
            users
                .last()
                .map(|u| encode_user_cursor(&u.display_name, u.id))
        })
        .flatten();
    Ok(axum::Json(json!({ "users": users, "next_cursor": next })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateUser {
    email: String,
    display_name: String,
    role: Role,
    password: String,
}

/// `POST /api/admin/users`
pub(crate) async fn create_user(
    State(state): State<AppState>,
    auth: Authenticated,
    Json(req): Json<CreateUser>,
) -> ApiResult<impl IntoResponse> {
    if auth.actor.role != Role::Admin {
        return Err(Error::forbidden("tenant administrators only").into());
    }
    auth::check_new_password(&req.password)?;
    let password_hash = state.passwords.hash(req.password).await?;
    let user = state
        .messaging
        .create_user(
            &auth.actor,
            NewUser {
                email: req.email,
                display_name: req.display_name,
                role: req.role,
                password_hash,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, axum::Json(json!({ "user": user }))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateUser {
    active: Option<bool>,
    /// A new password, set by the admin (a user who forgot theirs).
    password: Option<String>,
}

/// `PATCH /api/admin/users/{id}`
pub(crate) async fn update_user(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<UserId>,
    Json(req): Json<UpdateUser>,
) -> ApiResult<axum::Json<Value>> {
    // Checked here too (the service checks again): a member is refused before any
    // password is hashed.
    if auth.actor.role != Role::Admin {
        return Err(Error::forbidden("tenant administrators only").into());
    }
    if req.active.is_none() && req.password.is_none() {
        return Err(ApiError::http(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "nothing to change: give `active`, `password` or both",
        ));
    }
    // Their own goes through `POST /api/me/password`, which asks for the current one: a
    // session left open must not be enough to take the account over.
    if req.password.is_some() && id == auth.actor.user_id {
        return Err(Error::conflict(
            "own_password",
            "change your own password with POST /api/me/password",
        )
        .into());
    }
    if let Some(password) = &req.password {
        auth::check_new_password(password)?;
    }
    // The active flag first: a deactivation closes the user's sockets as such (4003),
    // which a new password set with it must not turn into 4010 (the first reason wins).
    let mut user = match req.active {
        Some(active) => Some(
            state
                .messaging
                .set_user_active(&auth.actor, id, active)
                .await?,
        ),
        None => None,
    };
    if let Some(password) = req.password {
        let hash = state.passwords.hash(password).await?;
        user = Some(state.messaging.set_password(&auth.actor, id, hash).await?);
    }
    let user = match user {
        Some(user) => user,
        None => state.messaging.user(&auth.actor, id).await?,
    };
    Ok(axum::Json(json!({ "user": user })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChangePassword {
    current_password: String,
    new_password: String,
}

/// `POST /api/me/password`: the current password, then the new one. Wrong current
/// passwords count like failed logins (`passwords`), for this user. Every access token
/// issued before stops working (`auth::user_of`), this one too: the answer carries a new
/// one for the session that made the change.
pub(crate) async fn change_password(
    State(state): State<AppState>,
    auth: Authenticated,
    Json(req): Json<ChangePassword>,
) -> ApiResult<axum::Json<Value>> {
    let wrong = || Error::invalid("wrong_password", "the current password is not right");
    if req.current_password.len() > auth::MAX_PASSWORD_BYTES {
        return Err(wrong().into());
    }
    auth::check_new_password(&req.new_password)?;
    let attempt = state
        .passwords
        .admit(passwords::own_account(auth.actor.user_id))?;
    let stored = {
        let mut tx = state.messaging.store().read(auth.actor.tenant_id).await?;
        tx.user_credentials(&auth.user.email).await?.map(|(_, h)| h)
    };
    if !state
        .passwords
        .verify(attempt, req.current_password, stored)
        .await?
    {
        return Err(wrong().into());
    }
    let hash = state.passwords.hash(req.new_password).await?;
    let user = state
        .messaging
        .set_password(&auth.actor, auth.actor.user_id, hash)
        .await?;
    Ok(axum::Json(access(&state, &user)?))
}

// ---- conversations ------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    limit: Option<u32>,
    cursor: Option<String>,
}

/// `GET /api/conversations`
pub(crate) async fn list_conversations(
    State(state): State<AppState>,
    auth: Authenticated,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<Value>> {
    let before = q
        .cursor
        .as_deref()
        .map(decode_activity_cursor)
        .transpose()?;
    let list = state
        .messaging
        .list_conversations(&auth.actor, before, q.limit)
        .await?;
    let limit = state.messaging.limits().page_size(q.limit)? as usize;
    let next = (list.len() == limit)
        .then(|| list.last().map(|s| encode_activity_cursor(&s.conversation)))
        .flatten();
    Ok(axum::Json(
        json!({ "conversations": list, "next_cursor": next }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub(crate) enum CreateConversation {
    Direct {
        user_id: UserId,
    },
    Group {
        name: String,
        member_ids: Vec<UserId>,
    },
}

/// `POST /api/conversations`: 201 when created, 200 when the direct one existed.
pub(crate) async fn create_conversation(
    State(state): State<AppState>,
    auth: Authenticated,
    Json(req): Json<CreateConversation>,
) -> ApiResult<impl IntoResponse> {
    let (conv, created) = match req {
        CreateConversation::Direct { user_id } => {
            state.messaging.open_direct(&auth.actor, user_id).await?
        }
        CreateConversation::Group { name, member_ids } => (
            state
                .messaging
                .create_group(&auth.actor, &name, &member_ids)
                .await?,
            true,
        ),
    };
    let (conv, members) = state.messaging.conversation(&auth.actor, conv.id).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        axum::Json(json!({ "conversation": conv, "members": members })),
    ))
}

/// `GET /api/conversations/{id}`
pub(crate) async fn get_conversation(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<ConversationId>,
) -> ApiResult<axum::Json<Value>> {
    let (conv, members) = state.messaging.conversation(&auth.actor, id).await?;
    Ok(axum::Json(
        json!({ "conversation": conv, "members": members }),
    ))
}

/// `GET /api/conversations/{id}/presence`: who of its members is online (the same
/// answer as the socket's `presence` command).
pub(crate) async fn conversation_presence(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<ConversationId>,
) -> ApiResult<axum::Json<Value>> {
    members_presence(&state.messaging, &state.realtime, &auth.actor, id)
        .await
        .map(axum::Json)
}

/// Who of a conversation's members is online, as `GET …/presence` and the socket's
/// `presence` command answer it; 503 `presence_unavailable` when that cannot be read.
pub(crate) async fn members_presence(
    messaging: &mindsp_core::Messaging,
    realtime: &mindsp_realtime::Realtime,
    actor: &mindsp_core::Actor,
    id: ConversationId,
) -> ApiResult<Value> {
    let (_, members) = messaging.conversation(actor, id).await?;
    let ids: Vec<UserId> = members.iter().map(|m| m.user_id).collect();
    let mut presence = realtime
        .presence(actor.tenant_id, &ids)
        .await
        .map_err(|_| {
            ApiError::http(
                StatusCode::SERVICE_UNAVAILABLE,
                "presence_unavailable",
                "presence cannot be read now; ask again later",
            )
        })?;
    // Presence keeps `last_seen` in memory (or in Redis): for whom it has none (this
    // process started since), what the store kept (`last_seen`).
    let unknown: Vec<UserId> = presence
        .iter()
        .filter(|p| p.status == PresenceStatus::Offline && p.last_seen.is_none())
        .map(|p| p.user_id)
        .collect();
    if !unknown.is_empty() {
        let stored = async {
            let mut tx = messaging.store().read(actor.tenant_id).await?;
            tx.last_seen_among(&unknown).await
        };
        match stored.await {
            Ok(seen) => {
                let seen: std::collections::HashMap<_, _> = seen.into_iter().collect();
                for p in presence.iter_mut().filter(|p| p.last_seen.is_none()) {
                    p.last_seen = seen.get(&p.user_id).copied();
                }
            }
            Err(e) => tracing::warn!(error = %e, "stored last_seen unreadable; left out"),
        }
    }
    Ok(json!({ "conversation_id": id, "presence": presence }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Rename {
    name: String,
}

/// `PATCH /api/conversations/{id}`
pub(crate) async fn rename_conversation(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<ConversationId>,
    Json(req): Json<Rename>,
) -> ApiResult<axum::Json<Value>> {
    state.messaging.rename(&auth.actor, id, &req.name).await?;
    get_conversation(State(state), auth, Path(id)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddMembers {
    user_ids: Vec<UserId>,
}

/// `POST /api/conversations/{id}/members`
pub(crate) async fn add_members(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<ConversationId>,
    Json(req): Json<AddMembers>,
) -> ApiResult<axum::Json<Value>> {
    if req.user_ids.len() > state.messaging.limits().max_group_members {
        return Err(Error::invalid("group_too_large", "too many users in one request").into());
    }
    let members = state
        .messaging
        .add_members(&auth.actor, id, &req.user_ids)
        .await?;
    Ok(axum::Json(json!({ "members": members })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetRole {
    role: MemberRole,
}

/// `PATCH /api/conversations/{id}/members/{user_id}`
pub(crate) async fn set_member_role(
    State(state): State<AppState>,
    auth: Authenticated,
    Path((id, user)): Path<(ConversationId, UserId)>,
    Json(req): Json<SetRole>,
) -> ApiResult<StatusCode> {
    state
        .messaging
        .set_member_role(&auth.actor, id, user, req.role)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /api/conversations/{id}/members/{user_id}` (your own id: leave)
pub(crate) async fn remove_member(
    State(state): State<AppState>,
    auth: Authenticated,
    Path((id, user)): Path<(ConversationId, UserId)>,
) -> ApiResult<StatusCode> {
    state.messaging.remove_member(&auth.actor, id, user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/conversations/{id}/leave`
pub(crate) async fn leave(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<ConversationId>,
) -> ApiResult<StatusCode> {
    let me = auth.actor.user_id;
    state.messaging.remove_member(&auth.actor, id, me).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- messages -----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryQuery {
    before: Option<i64>,
    after: Option<i64>,
    limit: Option<u32>,
}

/// `GET /api/conversations/{id}/messages`
pub(crate) async fn history(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<ConversationId>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<axum::Json<Value>> {
    let window = match (q.before, q.after) {
        (None, None) => SeqWindow::Latest,
        (Some(b), None) => SeqWindow::Before(b),
        (None, Some(a)) => SeqWindow::After(a),
        (Some(_), Some(_)) => {
            return Err(
                Error::invalid("invalid_cursor", "give `before` or `after`, not both").into(),
            );
        }
    };
    let messages = state
        .messaging
        .history(&auth.actor, id, window, q.limit)
        .await?;
    // Cursors to continue in each direction: `before=<before_cursor>` for older
    // messages (null at the start), `after=<after_cursor>` for newer ones.
    let before_cursor = messages.first().map(|m| m.seq).filter(|s| *s > 1);
    let after_cursor = messages.last().map(|m| m.seq).or(q.after);
    Ok(axum::Json(json!({
        "messages": messages,
        "before_cursor": before_cursor,
        "after_cursor": after_cursor,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendMessage {
    content: String,
    idempotency_key: Option<String>,
    /// Members to notify (`MENTION`).
    #[serde(default)]
    mentions: Vec<UserId>,
}

/// `POST /api/conversations/{id}/messages`: 201 when stored, 200 when the idempotency
/// key had already stored it.
pub(crate) async fn send(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<ConversationId>,
    Json(req): Json<SendMessage>,
) -> ApiResult<impl IntoResponse> {
    let appended = state
        .messaging
        .send_with_mentions(
            &auth.actor,
            id,
            &req.content,
            req.idempotency_key,
            &req.mentions,
        )
        .await?;
    let status = if appended.created() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(json!({ "message": appended.message() }))))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct MarkRead {
    seq: Option<i64>,
}

/// `POST /api/conversations/{id}/read`
pub(crate) async fn mark_read(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<ConversationId>,
    body: axum::body::Bytes,
) -> ApiResult<axum::Json<Value>> {
    // The body is optional: empty means "up to the newest message".
    let seq = optional_json::<MarkRead>(&body)?.and_then(|b| b.seq);
    let marker = state.messaging.mark_read(&auth.actor, id, seq).await?;
    Ok(axum::Json(json!({ "last_read_seq": marker })))
}

// ---- search -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchQuery {
    q: String,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// `GET /api/search`
pub(crate) async fn search_all(
    State(state): State<AppState>,
    auth: Authenticated,
    Query(q): Query<SearchQuery>,
) -> ApiResult<axum::Json<Value>> {
    search(state, auth, None, q).await
}

/// `GET /api/conversations/{id}/search`
pub(crate) async fn search_conversation(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<ConversationId>,
    Query(q): Query<SearchQuery>,
) -> ApiResult<axum::Json<Value>> {
    search(state, auth, Some(id), q).await
}

async fn search(
    state: AppState,
    auth: Authenticated,
    conv: Option<ConversationId>,
    q: SearchQuery,
) -> ApiResult<axum::Json<Value>> {
    let offset = match q.cursor.as_deref() {
        None => 0,
        Some(c) => c
            .parse::<u32>()
            .map_err(|_| Error::invalid("invalid_cursor", "malformed search cursor"))?,
    };
    let hits = state
        .messaging
        .search(&auth.actor, &q.q, conv, offset, q.limit)
        .await?;
    let limit = state.messaging.limits().page_size(q.limit)?;
    let next = (hits.len() as u32 == limit).then(|| (offset + limit).to_string());
    Ok(axum::Json(json!({ "results": hits, "next_cursor": next })))
}

// ---- job monitoring (tenant admins) -------------------------------------------------

/// Longest throughput window `GET /api/admin/jobs/stats` reports, in minutes.
pub const MAX_STATS_MINUTES: u32 = 120;
/// Throughput window when `minutes` is not given.
pub const DEFAULT_STATS_MINUTES: u32 = 15;

/// The queue and the admin's scope, or the refusal: 403 for a non-admin, 503 when no
/// queue is configured. A tenant admin only ever sees their tenant's jobs.
fn job_access(state: &AppState, auth: &Authenticated) -> ApiResult<(Arc<dyn JobQueue>, JobScope)> {
    if auth.actor.role != Role::Admin {
        return Err(Error::forbidden("tenant administrators only").into());
    }
    let queue = state.jobs.clone().ok_or_else(|| {
        ApiError::http(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_unavailable",
            "this server has no job queue configured",
        )
    })?;
    Ok((queue, JobScope::Tenant(auth.actor.tenant_id)))
}

/// The JSON of a job. Written out field by field so the API does not change when the
/// core's struct grows; the tenant is left out (it is always the caller's).
fn job_json(job: &Job) -> Value {
    json!({
        "id": job.id,
        "kind": job.kind,
        "queue": job.queue,
        "state": job.state,
        "payload": job.payload,
        "priority": job.priority,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "run_at": job.run_at,
        "unique_key": job.unique_key,
        "last_error": job.last_error,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "finished_at": job.finished_at,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatsQuery {
    minutes: Option<u32>,
}

/// `GET /api/admin/jobs/stats`: counts per queue and state, and finished jobs per
/// minute over the last `minutes` minutes.
pub(crate) async fn job_stats(
    State(state): State<AppState>,
    auth: Authenticated,
    Query(q): Query<StatsQuery>,
) -> ApiResult<axum::Json<Value>> {
    let (queue, scope) = job_access(&state, &auth)?;
    let minutes = q.minutes.unwrap_or(DEFAULT_STATS_MINUTES);
    if !(1..=MAX_STATS_MINUTES).contains(&minutes) {
        return Err(ApiError::bad_request(
            "invalid_minutes",
            format!("minutes must be between 1 and {MAX_STATS_MINUTES}"),
        ));
    }
    let counts = queue.counts(scope).await?;
    let throughput = queue.throughput(scope, minutes).await?;
    Ok(axum::Json(
        json!({ "queues": counts, "throughput": throughput }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobsQuery {
    state: Option<String>,
    queue: Option<String>,
    limit: Option<u32>,
    /// Opaque cursor returned as `next_cursor`.
    before: Option<String>,
}

/// `GET /api/admin/jobs`: the tenant's jobs, latest state change first.
pub(crate) async fn list_jobs(
    State(state): State<AppState>,
    auth: Authenticated,
    Query(q): Query<JobsQuery>,
) -> ApiResult<axum::Json<Value>> {
    let (queue, scope) = job_access(&state, &auth)?;
    let job_state = q
        .state
        .as_deref()
        .map(|s| {
            JobState::parse(s).ok_or_else(|| {
                let names: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                ApiError::bad_request(
                    "invalid_state",
                    format!("state must be one of {}", names.join(", ")),
                )
            })
        })
        .transpose()?;
    if let Some(name) = &q.queue
        && (name.is_empty() || name.len() > mindsp_core::jobs::MAX_NAME_LEN)
    {
        return Err(ApiError::bad_request(
            "invalid_queue",
            format!(
                "a queue name has 1 to {} characters",
                mindsp_core::jobs::MAX_NAME_LEN
            ),
        ));
    }
    let limit = state.messaging.limits().page_size(q.limit)?;
    let before = q.before.as_deref().map(decode_job_cursor).transpose()?;
    let jobs = queue
        .list(&JobFilter {
            scope,
            state: job_state,
            queue: q.queue,
            before,
            limit,
        })
        .await?;
    let next = (jobs.len() == limit as usize)
        .then(|| jobs.last().map(encode_job_cursor))
        .flatten();
    let jobs: Vec<Value> = jobs.iter().map(job_json).collect();
    Ok(axum::Json(json!({ "jobs": jobs, "next_cursor": next })))
}

/// The job `id` in `scope`; a job of another tenant is answered like a missing one.
async fn job_in_scope(queue: &dyn JobQueue, scope: JobScope, id: JobId) -> ApiResult<Job> {
    Ok(queue.job(scope, id).await?.ok_or(Error::NotFound("job"))?)
}

/// `GET /api/admin/jobs/{id}`
pub(crate) async fn get_job(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<JobId>,
) -> ApiResult<axum::Json<Value>> {
    let (queue, scope) = job_access(&state, &auth)?;
    let job = job_in_scope(queue.as_ref(), scope, id).await?;
    Ok(axum::Json(json!({ "job": job_json(&job) })))
}

fn invalid_job_state(action: &str, job: &Job) -> ApiError {
    Error::conflict(
        "invalid_job_state",
        format!("a {} job cannot be {action}", job.state.as_str()),
    )
    .into()
}

/// `POST /api/admin/jobs/{id}/retry`: a dead, retrying or cancelled job becomes due
/// now with a fresh set of attempts.
pub(crate) async fn retry_job(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<JobId>,
) -> ApiResult<axum::Json<Value>> {
    act_on_job(&state, &auth, id, JobAction::Retry).await
}

/// `POST /api/admin/jobs/{id}/discard`: a dead, retrying or pending job ends cancelled.
pub(crate) async fn discard_job(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<JobId>,
) -> ApiResult<axum::Json<Value>> {
    act_on_job(&state, &auth, id, JobAction::Discard).await
}

/// What an administrator can do to a job.
#[derive(Clone, Copy)]
enum JobAction {
    Retry,
    Discard,
}

/// Applies `action` to a job of the administrator's tenant and answers the job after
/// it: 404 outside the scope, 409 `invalid_job_state` when its state does not allow
/// it (and `unique_key_held` from a retry, also a 409).
async fn act_on_job(
    state: &AppState,
    auth: &Authenticated,
    id: JobId,
    action: JobAction,
) -> ApiResult<axum::Json<Value>> {
    let (queue, scope) = job_access(state, auth)?;
    let job = job_in_scope(queue.as_ref(), scope, id).await?;
    let (done, verb) = match action {
        JobAction::Retry => (queue.retry(scope, id).await?, "retried"),
        JobAction::Discard => (queue.discard(scope, id).await?, "discarded"),
    };
    if !done {
        return Err(invalid_job_state(verb, &job));
    }
    tracing::info!(job = %id, kind = %job.kind, admin = %auth.actor.user_id, "job {verb} by an administrator");
    let job = job_in_scope(queue.as_ref(), scope, id).await?;
    Ok(axum::Json(json!({ "job": job_json(&job) })))
}

// ---- cursors ------------------------------------------------------------------------

/// Opaque cursors are `<millis>_<uuid>` / `<uuid>_<name>`: readable, but clients must
/// treat them as opaque strings.
fn encode_activity_cursor(c: &mindsp_core::model::Conversation) -> String {
    format!("{}_{}", c.last_activity_at.timestamp_millis(), c.id)
}

fn decode_activity_cursor(s: &str) -> Result<ActivityCursor, ApiError> {
    let bad = || {
        ApiError::from(Error::invalid(
            "invalid_cursor",
            "malformed conversation cursor",
        ))
    };
    let (ms, id) = s.split_once('_').ok_or_else(bad)?;
    let ms: i64 = ms.parse().map_err(|_| bad())?;
    Ok(ActivityCursor {
        last_activity_at: chrono::DateTime::from_timestamp_millis(ms).ok_or_else(bad)?,
        id: id.parse().map_err(|_| bad())?,
    })
}

/// Jobs page by `(updated_at, id)`, like conversations by activity: `<millis>_<uuid>`.
fn encode_job_cursor(j: &Job) -> String {
    format!("{}_{}", j.updated_at.timestamp_millis(), j.id)
}

fn decode_job_cursor(s: &str) -> Result<(chrono::DateTime<chrono::Utc>, JobId), ApiError> {
    let bad = || ApiError::from(Error::invalid("invalid_cursor", "malformed job cursor"));
    let (ms, id) = s.split_once('_').ok_or_else(bad)?;
    let ms: i64 = ms.parse().map_err(|_| bad())?;
    Ok((
        chrono::DateTime::from_timestamp_millis(ms).ok_or_else(bad)?,
        id.parse().map_err(|_| bad())?,
    ))
}

fn encode_user_cursor(name: &str, id: UserId) -> String {
    format!("{id}_{name}")
}

fn decode_user_cursor(s: &str) -> Result<(String, UserId), ApiError> {
    let bad = || ApiError::from(Error::invalid("invalid_cursor", "malformed user cursor"));
    let (id, name) = s.split_once('_').ok_or_else(bad)?;
    Ok((name.to_owned(), id.parse().map_err(|_| bad())?))
}
