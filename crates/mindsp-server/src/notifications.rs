//! REST handlers for notifications, their preferences, and training sessions (FMPA).
//! Rules live in `mindsp_core::notify` and `mindsp_core::training`; documented in
//! `docs/API.md`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use mindsp_core::notify::{NewNotification, NotificationPrefs, kind};
use mindsp_core::training::{Attendance, NewSession, SessionFilter, SessionPatch};
use mindsp_core::{Error, NotificationId, SessionId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Authenticated;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Path, Query, optional_json};

// ---- notifications ------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListNotifications {
    before: Option<NotificationId>,
    #[serde(default)]
    unread_only: bool,
    limit: Option<u32>,
}

/// `GET /api/notifications`
pub(crate) async fn list(
    State(state): State<AppState>,
    auth: Authenticated,
    Query(q): Query<ListNotifications>,
) -> ApiResult<axum::Json<Value>> {
    let page = state
        .notifier
        .list(&auth.actor, q.before, q.unread_only, q.limit)
        .await?;
    Ok(axum::Json(json!({
        "notifications": page.items,
        "unread": page.unread,
        "next_before": page.next_before,
    })))
}

/// `GET /api/notifications/unread-count`
pub(crate) async fn unread_count(
    State(state): State<AppState>,
    auth: Authenticated,
) -> ApiResult<axum::Json<Value>> {
    let unread = state.notifier.unread_count(&auth.actor).await?;
    Ok(axum::Json(json!({ "unread": unread })))
}

/// `POST /api/notifications/{id}/read`
pub(crate) async fn mark_read(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<NotificationId>,
) -> ApiResult<axum::Json<Value>> {
    let (n, unread) = state.notifier.mark_read(&auth.actor, id).await?;
    Ok(axum::Json(json!({ "notification": n, "unread": unread })))
}

/// `POST /api/notifications/read-all`
pub(crate) async fn read_all(
    State(state): State<AppState>,
    auth: Authenticated,
) -> ApiResult<axum::Json<Value>> {
    let (marked, unread) = state.notifier.mark_all_read(&auth.actor).await?;
    Ok(axum::Json(json!({ "marked": marked, "unread": unread })))
}

/// `DELETE /api/notifications/{id}`
pub(crate) async fn delete(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<NotificationId>,
) -> ApiResult<axum::Json<Value>> {
    let unread = state.notifier.delete(&auth.actor, id).await?;
    Ok(axum::Json(json!({ "deleted": id, "unread": unread })))
}

fn prefs_body(own: &NotificationPrefs, effective: &impl serde::Serialize) -> Value {
    json!({ "preferences": own, "effective": effective })
}

/// `GET /api/notifications/preferences`: the user's own settings and those in force.
pub(crate) async fn get_preferences(
    State(state): State<AppState>,
    auth: Authenticated,
) -> ApiResult<axum::Json<Value>> {
    let (own, effective) = state.notifier.preferences(&auth.actor).await?;
    Ok(axum::Json(prefs_body(&own, &effective)))
}

/// `PUT /api/notifications/preferences`: replaces the user's own settings.
pub(crate) async fn put_preferences(
    State(state): State<AppState>,
    auth: Authenticated,
    Json(body): Json<Value>,
) -> ApiResult<axum::Json<Value>> {
    let prefs = NotificationPrefs::from_client(body)?;
    let (own, effective) = state.notifier.set_preferences(&auth.actor, &prefs).await?;
    Ok(axum::Json(prefs_body(&own, &effective)))
}

/// `GET /api/admin/notifications/preferences`: the tenant's defaults.
pub(crate) async fn get_tenant_preferences(
    State(state): State<AppState>,
    auth: Authenticated,
) -> ApiResult<axum::Json<Value>> {
    let prefs = state.notifier.tenant_defaults(&auth.actor).await?;
    Ok(axum::Json(json!({ "preferences": prefs })))
}

/// `PUT /api/admin/notifications/preferences`
pub(crate) async fn put_tenant_preferences(
    State(state): State<AppState>,
    auth: Authenticated,
    Json(body): Json<Value>,
) -> ApiResult<axum::Json<Value>> {
    let prefs = NotificationPrefs::from_client(body)?;
    let prefs = state
        .notifier
        .set_tenant_defaults(&auth.actor, &prefs)
        .await?;
    Ok(axum::Json(json!({ "preferences": prefs })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Broadcast {
    /// Recipients; everyone active in the tenant when absent.
    user_ids: Option<Vec<UserId>>,
    title: String,
    #[serde(default)]
    body: String,
    link: Option<String>,
    #[serde(default)]
    urgent: bool,
}

/// `POST /api/admin/notifications`: a `SYSTEM` notification from an administrator.
pub(crate) async fn broadcast(
    State(state): State<AppState>,
    auth: Authenticated,
    Json(req): Json<Broadcast>,
) -> ApiResult<impl IntoResponse> {
    let mut n = NewNotification::new(kind::SYSTEM, req.title, req.body);
    n.link = req.link;
    n.urgent = req.urgent;
    let sent = state
        .notifier
        .broadcast(&auth.actor, req.user_ids.as_deref(), &n)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(json!({ "notified": sent }))))
}

// ---- training sessions ----------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListSessions {
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    /// Only sessions the user is invited to or organises.
    #[serde(default)]
    mine: bool,
    #[serde(default)]
    include_cancelled: bool,
    cursor: Option<String>,
    limit: Option<u32>,
}

fn encode_session_cursor(start: DateTime<Utc>, id: SessionId) -> String {
    format!("{}_{id}", start.timestamp_millis())
}

fn decode_session_cursor(s: &str) -> Result<(DateTime<Utc>, SessionId), ApiError> {
    let bad = || ApiError::from(Error::invalid("invalid_cursor", "malformed session cursor"));
    let (ms, id) = s.split_once('_').ok_or_else(bad)?;
    let at = ms
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_millis)
        .ok_or_else(bad)?;
    Ok((at, id.parse().map_err(|_| bad())?))
}

/// `GET /api/fmpa`: sessions of the tenant by start.
pub(crate) async fn list_sessions(
    State(state): State<AppState>,
    auth: Authenticated,
    Query(q): Query<ListSessions>,
) -> ApiResult<axum::Json<Value>> {
    let filter = SessionFilter {
        from: q.from,
        to: q.to,
        involving: q.mine.then_some(auth.actor.user_id),
        include_cancelled: q.include_cancelled,
        after: q.cursor.as_deref().map(decode_session_cursor).transpose()?,
    };
    let limit = state.training.page_size(q.limit)?;
    let sessions = state
        .training
        .list(&auth.actor, filter, Some(limit))
        .await?;
    let limit = limit as usize;
    let next = (sessions.len() == limit)
        .then(|| {
            sessions
                .last()
                .map(|s| encode_session_cursor(s.start_at, s.id))
        })
        .flatten();
    Ok(axum::Json(
        json!({ "sessions": sessions, "next_cursor": next }),
    ))
}

/// `POST /api/fmpa`: officers and administrators.
pub(crate) async fn create_session(
    State(state): State<AppState>,
    auth: Authenticated,
    Json(req): Json<NewSession>,
) -> ApiResult<impl IntoResponse> {
    let details = state.training.create(&auth.actor, req).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "session": details })),
    ))
}

/// `GET /api/fmpa/{id}`
pub(crate) async fn get_session(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<SessionId>,
) -> ApiResult<axum::Json<Value>> {
    let details = state.training.get(&auth.actor, id).await?;
    Ok(axum::Json(json!({ "session": details })))
}

/// `PATCH /api/fmpa/{id}`: the organiser or an administrator.
pub(crate) async fn update_session(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<SessionId>,
    Json(req): Json<SessionPatch>,
) -> ApiResult<axum::Json<Value>> {
    let details = state.training.update(&auth.actor, id, req).await?;
    Ok(axum::Json(json!({ "session": details })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Cancel {
    reason: Option<String>,
}

/// `POST /api/fmpa/{id}/cancel`, with an optional `{"reason": ...}`.
pub(crate) async fn cancel_session(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<SessionId>,
    body: axum::body::Bytes,
) -> ApiResult<axum::Json<Value>> {
    let reason = optional_json::<Cancel>(&body)?.and_then(|c| c.reason);
    let details = state.training.cancel(&auth.actor, id, reason).await?;
    Ok(axum::Json(json!({ "session": details })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Respond {
    response: String,
}

/// `POST /api/fmpa/{id}/respond` with `{"response": "present" | "absent"}`.
pub(crate) async fn respond(
    State(state): State<AppState>,
    auth: Authenticated,
    Path(id): Path<SessionId>,
    Json(req): Json<Respond>,
) -> ApiResult<axum::Json<Value>> {
    let response = Attendance::parse(&req.response)?;
    if response == Attendance::Pending {
        return Err(Error::invalid("invalid_response", "a response is present or absent").into());
    }
    let details = state.training.respond(&auth.actor, id, response).await?;
    Ok(axum::Json(json!({ "session": details })))
}
