//! A blocking app on the thread worker: every request runs on a pool thread,
//! which keeps its own SQLite connection, so a slow query holds only its own
//! thread.
//!
//! ```sh
//! SQLITE_PATH=/tmp/notes.db cargo run --release -p gpe-example-blocking-sqlite -- \
//!     --worker thread --threads 4 -w 2 --bind 127.0.0.1:8000
//! ```
//!
//! Routes: `POST /notes` stores the body and answers its id; `GET /notes/{id}`
//! answers a note; `GET /notes` answers how many there are.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gpe::{blocking, text, with_route, FullRequest, FullResponse, StatusCode};
use rusqlite::{Connection, OptionalExtension};

thread_local! {
    static CONN: RefCell<Option<Connection>> = const { RefCell::new(None) };
}

/// Opens the database at `path` in WAL mode, so the workers' threads read
/// while one writes.
fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.execute(
        "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
        [],
    )?;
    Ok(conn)
}

/// Runs `f` with this thread's connection, opening it on first use.
fn with_conn<T>(
    path: &Path,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    CONN.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(open(path)?);
        }
        match slot.as_ref() {
            Some(conn) => f(conn),
            None => Err(rusqlite::Error::InvalidQuery),
        }
    })
}

fn route(path: &Path, req: FullRequest) -> FullResponse {
    let target = req.uri().path().to_owned();
    let answer = match (req.method().as_str(), target.as_str()) {
        ("POST", "/notes") => {
            let body = String::from_utf8_lossy(req.body()).into_owned();
            let id = with_conn(path, |c| {
                c.execute("INSERT INTO notes (body) VALUES (?1)", [&body])?;
                Ok(c.last_insert_rowid())
            });
            id.map(|id| with_route(text(StatusCode::CREATED, id.to_string()), "/notes"))
        }
        ("GET", "/notes") => with_conn(path, |c| {
            c.query_row("SELECT COUNT(*) FROM notes", [], |r| r.get::<_, i64>(0))
        })
        .map(|n| with_route(text(StatusCode::OK, n.to_string()), "/notes")),
        ("GET", p) if p.starts_with("/notes/") => {
            let Ok(id) = p["/notes/".len()..].parse::<i64>() else {
                return with_route(text(StatusCode::BAD_REQUEST, "bad id"), "/notes/{id}");
            };
            with_conn(path, |c| {
                c.query_row("SELECT body FROM notes WHERE id = ?1", [id], |r| {
                    r.get::<_, String>(0)
                })
                .optional()
            })
            .map(|note| match note {
                Some(body) => with_route(text(StatusCode::OK, body), "/notes/{id}"),
                None => with_route(text(StatusCode::NOT_FOUND, "no such note"), "/notes/{id}"),
            })
        }
        _ => return text(StatusCode::NOT_FOUND, "not found"),
    };
    answer.unwrap_or_else(|e| text(StatusCode::INTERNAL_SERVER_ERROR, format!("database: {e}")))
}

fn main() -> std::process::ExitCode {
    let path: Arc<PathBuf> = Arc::new(
        std::env::var_os("SQLITE_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("gpe-example-notes.db")),
    );
    gpe::serve(move || {
        // Fail the worker's boot, not its first request, if the database is unusable.
        open(&path).map_err(|e| format!("setting SQLITE_PATH: {}: {e}", path.display()))?;
        let path = path.clone();
        Ok(blocking(move |req| route(&path, req)))
    })
}
