//! An ordinary axum 0.8 `Router`, served by gpe unchanged:
//!
//! ```sh
//! cargo run --release -p gpe-example-axum-app -- --worker eventloop -w 2 --bind 127.0.0.1:8000
//! ```
//!
//! It takes the same command line as `gpe serve`. Routes:
//!
//! - `GET /` answers `Hello, World!`;
//! - `GET /users/{id}` answers a JSON user, counting lookups in shared state
//!   and in the app's own metric `app_user_lookups_total` (the `metrics`
//!   facade, merged across workers by gpe);
//! - `POST /json` takes `{"a": .., "b": ..}` and answers their sum as JSON;
//! - `GET /sleep/{ms}` awaits `tokio::time::sleep`, `GET /spawn` a `tokio::spawn`ed task;
//! - `GET /sse?n=N&ms=M` streams N server-sent events M ms apart;
//! - `GET /ws` echoes WebSocket messages;
//! - `GET /download/{bytes}` streams that many bytes; `POST /upload` reads
//!   the request body as a stream and answers how many bytes it read.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Json, Path, Query, State};
use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use futures_util::{stream, Stream, StreamExt};
use serde::{Deserialize, Serialize};

/// What every handler shares.
#[derive(Debug, Default)]
struct AppState {
    lookups: AtomicU64,
}

#[derive(Serialize)]
struct User {
    id: u64,
    name: String,
    lookups: u64,
}

async fn user(State(state): State<Arc<AppState>>, Path(id): Path<u64>) -> Json<User> {
    let lookups = state.lookups.fetch_add(1, Ordering::Relaxed) + 1;
    gpe::counter!("app_user_lookups_total").increment(1);
    Json(User {
        id,
        name: format!("user-{id}"),
        lookups,
    })
}

#[derive(Deserialize)]
struct Sum {
    a: i64,
    b: i64,
}

async fn json(Json(sum): Json<Sum>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "sum": sum.a + sum.b }))
}

async fn sleep(Path(ms): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    "slept".to_owned()
}

async fn spawn() -> String {
    match tokio::spawn(async { 6 * 7 }).await {
        Ok(n) => format!("spawned {n}"),
        Err(e) => format!("join error: {e}"),
    }
}

#[derive(Deserialize)]
struct SseParams {
    n: Option<u32>,
    ms: Option<u64>,
}

async fn sse(Query(p): Query<SseParams>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let n = p.n.unwrap_or(10).min(100_000);
    let every = Duration::from_millis(p.ms.unwrap_or(100));
    let events = stream::unfold(0u32, move |i| async move {
        if i == n {
            return None;
        }
        tokio::time::sleep(every).await;
        Some((Ok(Event::default().data(i.to_string())), i + 1))
    });
    Sse::new(events)
}

async fn ws(upgrade: WebSocketUpgrade) -> impl IntoResponse {
    upgrade.on_upgrade(echo)
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            // The close reply is sent by the next `recv`, which then ends the loop.
            Message::Close(_) | Message::Ping(_) | Message::Pong(_) => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

/// Size of one chunk of a streamed download.
const CHUNK: usize = 64 << 10;

async fn download(Path(bytes): Path<u64>) -> Body {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let chunks = stream::unfold(bytes, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(CHUNK as u64);
            Some((Ok::<_, Infallible>(chunk.slice(..n as usize)), left - n))
        }
    });
    Body::from_stream(chunks)
}

async fn upload(body: Body) -> String {
    let mut frames = body.into_data_stream();
    let mut n = 0u64;
    while let Some(chunk) = frames.next().await {
        match chunk {
            Ok(data) => n += data.len() as u64,
            Err(e) => return format!("error after {n} bytes: {e}"),
        }
    }
    n.to_string()
}

/// The app: a plain axum Router, with gpe's layer naming each request's
/// `route` label after the route that matched.
fn app() -> Router {
    Router::new()
        .route("/", get(|| async { "Hello, World!" }))
        .route("/users/{id}", get(user))
        .route("/json", post(json))
        .route("/sleep/{ms}", get(sleep))
        .route("/spawn", get(spawn))
        .route("/sse", get(sse))
        .route("/ws", get(ws))
        .route("/download/{bytes}", get(download))
        .route("/upload", post(upload))
        .with_state(Arc::new(AppState::default()))
        .layer(gpe::MatchedPathLayer)
}

fn main() -> std::process::ExitCode {
    gpe::serve(|| {
        gpe::describe_counter!("app_user_lookups_total", "User lookups served");
        Ok(app())
    })
}
