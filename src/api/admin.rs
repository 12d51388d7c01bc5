//! The operator API under `/admin`: what integration analysts use to watch the queue,
//! inspect failed messages, reprocess them after a mapping fix, and reload the mappings.
//! Every route needs the admin scope when auth is configured.
//!
//! | route | what |
//! |---|---|
//! | `GET /admin/messages?status=&before=&limit=` | journal rows, newest first |
//! | `GET /admin/messages/stats` | counts per status, age of the oldest unprocessed |
//! | `GET /admin/messages/{id}` | one row: raw text, ACK, error, conversion report |
//! | `POST /admin/messages/{id}/reprocess` | convert it again |
//! | `POST /admin/messages/reprocess?status=failed` | convert every failed message again |
//! | `POST /admin/mappings/reload` | recompile the mapping files and use them from now on |

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::{ApiError, ApiState, Interaction, Params};
use crate::auth::Grant;
use crate::mapping::{Engine, Sources};
use crate::pipeline::{self, MessageFilter, Requeue, SharedEngine, Wakeup};

/// Largest page of `/admin/messages`.
const MAX_LIMIT: usize = 1000;

/// What the admin routes work on.
pub struct AdminState {
    /// The store database file (the admin API opens short-lived connections to it).
    pub database: PathBuf,
    /// The journal database file (messages as received, and their status).
    pub journal: PathBuf,
    /// The mappings in use.
    pub engine: SharedEngine,
    /// Where mappings are loaded from, for reloads.
    pub sources: Sources,
    /// Wakes the pipeline after a requeue.
    pub wakeup: Arc<Wakeup>,
    /// Tells the aggregator push that outbox rows were requeued (`None`: no aggregator).
    pub outbox: Option<crate::outbox::RequeueSignal>,
}

/// The `/admin` routes.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/admin/messages", get(list))
        .route("/admin/messages/stats", get(stats))
        .route("/admin/messages/reprocess", post(reprocess_all))
        .route("/admin/messages/{id}", get(show))
        .route("/admin/messages/{id}/reprocess", post(reprocess_one))
        .route("/admin/mappings/reload", post(reload))
}

/// 403 unless the caller holds the admin scope (shared by every `/admin` route).
pub(super) fn require_admin(grant: Option<axum::Extension<Grant>>) -> Result<(), ApiError> {
    match grant {
        Some(axum::Extension(grant)) if grant.is_admin() => Ok(()),
        _ => Err(ApiError::Forbidden("the operator API needs the admin scope".to_string())),
    }
}

/// A JSON answer counted as an `admin` interaction.
pub(super) fn answer(value: serde_json::Value) -> Response {
    let mut response = Json(value).into_response();
    response.extensions_mut().insert(Interaction("admin"));
    response
}

/// Which of the data directory's two databases an admin route works on.
#[derive(Clone, Copy, Debug)]
pub(super) enum Database {
    /// `gateway.db`: resources, search indexes, outbox.
    Store,
    /// `journal.db`: messages as received, and their status. A requeue written here waits
    /// for (and briefly holds up) the journal's writer; operators requeue rarely, so the ACK
    /// path does not route it through the writer.
    Journal,
}

/// Runs `work` with a fresh connection to `database` on the blocking pool.
pub(super) async fn with_database<T, E>(
    state: &ApiState,
    database: Database,
    work: impl FnOnce(&rusqlite::Connection) -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: From<crate::db::Error> + Send + 'static,
    ApiError: From<E>,
{
    let path = match database {
        Database::Store => state.admin.database.clone(),
        Database::Journal => state.admin.journal.clone(),
    };
    tokio::task::spawn_blocking(move || {
        let connection = match database {
            Database::Store => crate::db::open(&path),
            Database::Journal => crate::db::open_journal(&path),
        }
        .map_err(E::from)?;
        work(&connection)
    })
    .await
    .map_err(|_| ApiError::Internal("admin task failed".to_string()))?
    .map_err(ApiError::from)
}

async fn list(
    State(state): State<ApiState>,
    grant: Option<axum::Extension<Grant>>,
    Params(params): Params,
) -> Result<Response, ApiError> {
    require_admin(grant)?;
    let mut filter = MessageFilter { limit: 100, ..MessageFilter::default() };
    for (name, value) in params {
        match name.as_str() {
            "status" => filter.status = Some(value),
            "before" => {
                filter.before_id = Some(
                    value.parse().map_err(|_| ApiError::BadRequest(vec![format!("before={value} is not an id")]))?,
                )
            }
            "limit" => {
                filter.limit = value
                    .parse::<usize>()
                    .map_err(|_| ApiError::BadRequest(vec![format!("limit={value} is not a number")]))?
                    .clamp(1, MAX_LIMIT)
            }
            other => return Err(ApiError::BadRequest(vec![format!("unknown parameter `{other}`")])),
        }
    }
    let messages =
        with_database(&state, Database::Journal, move |connection| pipeline::list_messages(connection, &filter))
            .await?;
    Ok(answer(json!({ "messages": messages })))
}

async fn stats(State(state): State<ApiState>, grant: Option<axum::Extension<Grant>>) -> Result<Response, ApiError> {
    require_admin(grant)?;
    let (counts, oldest) = with_database(&state, Database::Journal, |connection| {
        Ok::<_, pipeline::Error>((pipeline::status_counts(connection)?, pipeline::oldest_unprocessed_age(connection)?))
    })
    .await?;
    let counts: serde_json::Map<String, serde_json::Value> =
        counts.into_iter().map(|(status, count)| (status, json!(count))).collect();
    Ok(answer(json!({
        "status_counts": counts,
        "oldest_unprocessed_seconds": oldest.map(|age| age.as_secs_f64()),
    })))
}

async fn show(
    State(state): State<ApiState>,
    grant: Option<axum::Extension<Grant>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(grant)?;
    let id: i64 = id.parse().map_err(|_| ApiError::NotFound(format!("no message `{id}`")))?;
    let detail =
        with_database(&state, Database::Journal, move |connection| pipeline::message_detail(connection, id)).await?;
    match detail {
        Some(detail) => Ok(answer(json!(detail))),
        None => Err(ApiError::NotFound(format!("no message {id}"))),
    }
}

async fn reprocess_one(
    State(state): State<ApiState>,
    grant: Option<axum::Extension<Grant>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(grant)?;
    let id: i64 = id.parse().map_err(|_| ApiError::NotFound(format!("no message `{id}`")))?;
    let requeued = with_database(&state, Database::Journal, move |connection| {
        let exists = pipeline::message_detail(connection, id)?;
        match exists {
            None => Ok(None),
            Some(_) => pipeline::requeue(connection, &Requeue::Ids(vec![id])).map(Some),
        }
    })
    .await?;
    match requeued {
        None => Err(ApiError::NotFound(format!("no message {id}"))),
        Some(0) => Err(ApiError::Unprocessable(vec![format!(
            "message {id} cannot be reprocessed: it was refused at ingest or is already waiting"
        )])),
        Some(count) => {
            state.admin.wakeup.wake();
            tracing::info!(message = id, "message requeued by an operator");
            Ok(answer(json!({ "requeued": count })))
        }
    }
}

async fn reprocess_all(
    State(state): State<ApiState>,
    grant: Option<axum::Extension<Grant>>,
    Params(params): Params,
) -> Result<Response, ApiError> {
    require_admin(grant)?;
    let status = params.iter().find(|(name, _)| name == "status").map(|(_, value)| value.as_str());
    if status != Some("failed") {
        return Err(ApiError::BadRequest(vec![
            "bulk reprocessing needs status=failed (reprocess others one by one)".to_string()
        ]));
    }
    let count =
        with_database(&state, Database::Journal, |connection| pipeline::requeue(connection, &Requeue::AllFailed))
            .await?;
    state.admin.wakeup.wake();
    tracing::info!(count, "failed messages requeued by an operator");
    Ok(answer(json!({ "requeued": count })))
}

async fn reload(State(state): State<ApiState>, grant: Option<axum::Extension<Grant>>) -> Result<Response, ApiError> {
    require_admin(grant)?;
    let sources = state.admin.sources.clone();
    let loaded = tokio::task::spawn_blocking(move || Engine::load(&sources))
        .await
        .map_err(|_| ApiError::Internal("mapping compilation failed".to_string()))?;
    match loaded {
        Ok(engine) => {
            let maps = engine.message_map_count();
            let overlays = engine.overlays().len();
            *state.admin.engine.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(engine);
            tracing::info!(message_maps = maps, overlays, "mappings reloaded");
            Ok(answer(json!({ "reloaded": true, "message_maps": maps, "sender_overlays": overlays })))
        }
        Err(errors) => {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            let mut response = ApiError::Unprocessable(lines).into_response();
            response.extensions_mut().insert(Interaction("admin"));
            Ok((StatusCode::UNPROCESSABLE_ENTITY, response).into_response())
        }
    }
}
