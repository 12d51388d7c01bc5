//! The operator API of the aggregator push, under `/admin/outbox`. Every route needs the
//! admin scope when auth is configured. A requeue tells the worker at once
//! ([`crate::outbox::RequeueSignal`]).
//!
//! | route | what |
//! |---|---|
//! | `GET /admin/outbox?status=pending\|delivered\|dead&limit=` | rows, newest first |
//! | `GET /admin/outbox/stats` | counts per status, age of the oldest undelivered |
//! | `GET /admin/outbox/{id}` | one row: Bundle, last error, the aggregator's answer |
//! | `POST /admin/outbox/{id}/requeue` | deliver a dead (or delivered) row again |
//! | `POST /admin/outbox/requeue?status=dead` | requeue every dead row |

use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;

use super::admin::{answer, require_admin, with_database, Database};
use super::{ApiError, ApiState, Params};
use crate::auth::Grant;
use crate::outbox::{self, queue, Requeue};

/// Largest page of `/admin/outbox`.
const MAX_LIMIT: usize = 1000;

/// The `/admin/outbox` routes.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/admin/outbox", get(list))
        .route("/admin/outbox/stats", get(stats))
        .route("/admin/outbox/requeue", post(requeue_all))
        .route("/admin/outbox/{id}", get(show))
        .route("/admin/outbox/{id}/requeue", post(requeue_one))
}

impl From<outbox::Error> for ApiError {
    fn from(error: outbox::Error) -> Self {
        tracing::error!(error = %error, "outbox access failed");
        ApiError::Internal("the outbox failed; see the gateway log".to_string())
    }
}

fn parse_id(id: &str) -> Result<i64, ApiError> {
    id.parse().map_err(|_| ApiError::NotFound(format!("no outbox row `{id}`")))
}

async fn list(
    State(state): State<ApiState>,
    grant: Option<axum::Extension<Grant>>,
    Params(params): Params,
) -> Result<Response, ApiError> {
    require_admin(grant)?;
    let mut status: Option<String> = None;
    let mut limit = 100;
    for (name, value) in params {
        match name.as_str() {
            "status" => match value.as_str() {
                queue::status::PENDING | queue::status::DELIVERED | queue::status::DEAD => status = Some(value),
                other => {
                    return Err(ApiError::BadRequest(vec![format!(
                        "status={other} is not one of pending, delivered, dead"
                    )]))
                }
            },
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .map_err(|_| ApiError::BadRequest(vec![format!("limit={value} is not a number")]))?
                    .clamp(1, MAX_LIMIT)
            }
            other => return Err(ApiError::BadRequest(vec![format!("unknown parameter `{other}`")])),
        }
    }
    let rows =
        with_database(&state, Database::Store, move |connection| queue::list(connection, status.as_deref(), limit))
            .await?;
    Ok(answer(json!({ "outbox": rows })))
}

async fn stats(State(state): State<ApiState>, grant: Option<axum::Extension<Grant>>) -> Result<Response, ApiError> {
    require_admin(grant)?;
    let (counts, (_, oldest)) = with_database(&state, Database::Store, |connection| {
        Ok::<_, outbox::Error>((queue::status_counts(connection)?, queue::backlog(connection)?))
    })
    .await?;
    let counts: serde_json::Map<String, serde_json::Value> =
        counts.into_iter().map(|(status, count)| (status, json!(count))).collect();
    let age = oldest.map(|created| (crate::telemetry::now_us() - created).max(0) as f64 / 1e6);
    Ok(answer(json!({ "status_counts": counts, "oldest_undelivered_seconds": age })))
}

async fn show(
    State(state): State<ApiState>,
    grant: Option<axum::Extension<Grant>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(grant)?;
    let id = parse_id(&id)?;
    match with_database(&state, Database::Store, move |connection| queue::detail(connection, id)).await? {
        Some(detail) => Ok(answer(json!(detail))),
        None => Err(ApiError::NotFound(format!("no outbox row {id}"))),
    }
}

async fn requeue_one(
    State(state): State<ApiState>,
    grant: Option<axum::Extension<Grant>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(grant)?;
    let id = parse_id(&id)?;
    let requeued = with_database(&state, Database::Store, move |connection| match queue::detail(connection, id)? {
        None => Ok(None),
        Some(_) => queue::requeue(connection, &Requeue::Ids(vec![id])).map(Some),
    })
    .await?;
    match requeued {
        None => Err(ApiError::NotFound(format!("no outbox row {id}"))),
        Some(0) => Err(ApiError::Unprocessable(vec![format!("outbox row {id} is already pending")])),
        Some(count) => {
            tracing::info!(outbox = id, "outbox row requeued by an operator");
            signal_requeue(&state);
            Ok(answer(json!({ "requeued": count })))
        }
    }
}

async fn requeue_all(
    State(state): State<ApiState>,
    grant: Option<axum::Extension<Grant>>,
    Params(params): Params,
) -> Result<Response, ApiError> {
    require_admin(grant)?;
    let status = params.iter().find(|(name, _)| name == "status").map(|(_, value)| value.as_str());
    if status != Some("dead") {
        return Err(ApiError::BadRequest(vec![
            "bulk requeue needs status=dead (requeue others one by one)".to_string()
        ]));
    }
    let count =
        with_database(&state, Database::Store, |connection| queue::requeue(connection, &Requeue::AllDead)).await?;
    tracing::info!(count, "dead outbox rows requeued by an operator");
    if count > 0 {
        signal_requeue(&state);
    }
    Ok(answer(json!({ "requeued": count })))
}

/// Tells the push worker to rebuild its schedule: requeued rows go before later ones.
fn signal_requeue(state: &ApiState) {
    if let Some(signal) = &state.admin.outbox {
        signal.requeued();
    }
}
