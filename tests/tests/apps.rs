//! Black-box acceptance tests of real Rust apps on gpe (issue 9): the axum
//! example (`gpe-axum-app`) served unchanged, with exact route labels,
//! streamed bodies in bounded memory, `max_body_size` enforced as read,
//! server-sent events, WebSockets, tokio futures and the metrics of streamed
//! responses.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gpe_tests::*;

/// 1 GiB.
const GIB: u64 = 1 << 30;
/// The resident memory a worker stays under while it streams 1 GiB.
const RSS_LIMIT: f64 = (32 << 20) as f64;

fn start(worker: &str, workers: u32, extra: &[&str]) -> Server {
    Server::start(&axum_app_bin(), Opts::new(worker, workers).args(extra))
}

per_worker!(
    exact_counts_by_route,
    upload_of_1_gib_streams,
    download_of_1_gib_streams,
    declared_body_over_the_limit_gets_413_unread,
    chunked_body_over_the_limit_is_cut,
    chunked_flood_is_cut_and_closed,
    tokio_sleep_and_spawn_answer,
    streamed_response_metrics,
    unmatched_route_path_keeps_raw_paths,
);

per_async_worker!(sse_streams_while_other_requests_are_served, websocket_echo);

fn exact_counts_by_route(worker: &str) {
    let s = start(worker, 2, &[]);
    let addr = s.addr;
    let w = worker.to_owned();
    let results = parallel(4, 250, move |c, i| {
        let n = c * 250 + i;
        let id: u32 = rand::random();
        let (method, path, body, route, status) = match n % 3 {
            0 => (
                "GET",
                format!("/users/{id}"),
                String::new(),
                "/users/{id}",
                "200",
            ),
            1 => (
                "POST",
                "/json".to_owned(),
                format!(r#"{{"a": {n}, "b": {id}}}"#),
                "/json",
                "200",
            ),
            _ => (
                "GET",
                format!("/missing/{id}/{}", rand::random::<u64>()),
                String::new(),
                "unmatched",
                "404",
            ),
        };
        let r = http(
            addr,
            method,
            &path,
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(r.status.to_string(), status, "{w} {method} {path}");
        let text = String::from_utf8_lossy(&r.body).into_owned();
        match n % 3 {
            0 => assert!(
                text.starts_with(&format!(r#"{{"id":{id},"name":"user-{id}","#)),
                "{text}"
            ),
            1 => assert_eq!(text, format!(r#"{{"sum":{}}}"#, n as u64 + u64::from(id))),
            _ => {}
        }
        (method, route, status)
    });
    let mut sent: BTreeMap<(&str, &str, &str), f64> = BTreeMap::new();
    for key in results {
        *sent.entry(key).or_default() += 1.0;
    }
    assert_eq!(sent.values().sum::<f64>(), 1000.0);
    let m = s.scrape();
    let mut series: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    for (l, v) in m.samples("gpe_http_requests_total") {
        series.insert(
            (l["method"].clone(), l["route"].clone(), l["status"].clone()),
            v,
        );
    }
    let want: BTreeMap<(String, String, String), f64> = sent
        .iter()
        .map(|((m, r, s), n)| (((*m).to_owned(), (*r).to_owned(), (*s).to_owned()), *n))
        .collect();
    assert_eq!(series, want, "{worker}: exactly three series, as sent");
    assert_eq!(want.len(), 3);
    // The app's own counter, recorded through the `metrics` facade.
    assert_eq!(
        m.one("app_user_lookups_total", &[]),
        sent[&("GET", "/users/{id}", "200")]
    );
}

/// Runs `transfer` on worker `s` (one worker) while sampling its resident
/// memory; asserts it stays under [`RSS_LIMIT`] on every sample.
fn under_rss_limit(worker: &str, what: &str, s: &Server, transfer: impl FnOnce()) {
    let sampler = RssSampler::start(s.metrics);
    let t0 = Instant::now();
    transfer();
    let took = t0.elapsed();
    let seen = sampler.finish();
    let max = seen.iter().copied().fold(0.0, f64::max);
    println!(
        "{worker}: {what} of 1 GiB took {took:?}; {} RSS samples, max {:.1} MiB",
        seen.len(),
        max / f64::from(1 << 20)
    );
    assert!(
        seen.len() >= 3,
        "{worker}: only {} RSS samples while the {what} ran",
        seen.len()
    );
    assert!(
        seen.iter().all(|&v| v > 0.0 && v < RSS_LIMIT),
        "{worker}: the worker's RSS during the {what} reached {max} bytes: {seen:?}"
    );
}

fn upload_of_1_gib_streams(worker: &str) {
    let s = start(worker, 1, &["--max-body-size", &(2 * GIB).to_string()]);
    under_rss_limit(worker, "upload", &s, || {
        let r = upload(s.addr, "/upload", GIB);
        assert_eq!(r.status, 200, "{worker}");
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            GIB.to_string(),
            "{worker}"
        );
    });
    wait_sum(
        &s,
        "gpe_http_requests_total",
        &[("method", "POST"), ("route", "/upload"), ("status", "200")],
        1.0,
    );
    let m = s.scrape();
    assert_eq!(
        m.one("gpe_http_request_size_bytes_sum", &[]),
        GIB as f64,
        "{worker}"
    );
}

fn download_of_1_gib_streams(worker: &str) {
    let s = start(worker, 1, &[]);
    under_rss_limit(worker, "download", &s, || {
        let (head, n) = download(s.addr, &format!("/download/{GIB}"), b'x');
        assert_eq!(head.status, 200, "{worker}");
        assert_eq!(n, GIB, "{worker}");
    });
    wait_sum(
        &s,
        "gpe_http_requests_total",
        &[
            ("method", "GET"),
            ("route", "/download/{bytes}"),
            ("status", "200"),
        ],
        1.0,
    );
    assert_eq!(
        s.scrape().one("gpe_http_response_size_bytes_sum", &[]),
        GIB as f64,
        "{worker}"
    );
}

fn declared_body_over_the_limit_gets_413_unread(worker: &str) {
    let s = start(worker, 1, &["--max-body-size", "1024"]);
    // Only the head: the 413 must come without a byte of the body.
    let mut c = connect(s.addr);
    c.write_all(
        b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1025\r\n\
          Content-Type: application/octet-stream\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(c);
    let head = read_head(&mut r).unwrap();
    assert_eq!(head.status, 413, "{worker}");
    let mut body = Vec::new();
    read_body(&mut r, &head, |b| body.extend_from_slice(b)).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&body),
        "Payload Too Large",
        "{worker}"
    );
    // At the limit the body reaches the app.
    let r = upload(s.addr, "/upload", 1024);
    assert_eq!((r.status, &r.body[..]), (200, &b"1024"[..]), "{worker}");
    let labels = [("method", "POST"), ("route", "unmatched")];
    wait_sum(
        &s,
        "gpe_http_errors_total",
        &[labels[0], labels[1], ("kind", "bad_request")],
        1.0,
    );
    wait_sum(
        &s,
        "gpe_http_requests_total",
        &[("method", "POST"), ("route", "/upload"), ("status", "200")],
        1.0,
    );
    let m = s.scrape();
    assert_eq!(
        m.one("gpe_http_requests_total", &[labels[0], labels[1]]),
        1.0
    );
    assert_eq!(
        m.one("gpe_http_requests_total", &[("status", "413")]),
        1.0,
        "{worker}"
    );
    assert_eq!(m.sum("gpe_http_requests_total", &[]), 2.0, "{worker}");
    assert_eq!(m.sum("gpe_http_errors_total", &[]), 1.0, "{worker}");
    // No body byte was read for the 413: only the 1,024 of the second request.
    assert_eq!(
        m.one("gpe_http_request_size_bytes_sum", &[]),
        1024.0,
        "{worker}"
    );
}

fn chunked_body_over_the_limit_is_cut(worker: &str) {
    const LIMIT: usize = 1 << 20;
    let s = start(worker, 1, &["--max-body-size", &LIMIT.to_string()]);
    let mut c = connect(s.addr);
    c.write_all(
        b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\
          Content-Type: application/octet-stream\r\n\r\n",
    )
    .unwrap();
    // Exactly LIMIT bytes in 64 KiB chunks, then one byte too many. The body
    // is never finished: the server must end it.
    let chunk = [0u8; 64 << 10];
    for _ in 0..LIMIT / chunk.len() {
        write!(c, "{:x}\r\n", chunk.len()).unwrap();
        c.write_all(&chunk).unwrap();
        c.write_all(b"\r\n").unwrap();
    }
    c.write_all(b"1\r\n\0\r\n").unwrap();
    let mut r = BufReader::new(c);
    let head = read_head(&mut r).unwrap();
    assert_eq!(head.header("connection"), Some("close"), "{worker}");
    let mut body = Vec::new();
    read_body(&mut r, &head, |b| body.extend_from_slice(b)).unwrap();
    // The handler sees the limit as an error of its body stream after
    // exactly LIMIT bytes, and says so.
    assert_eq!(
        (head.status, String::from_utf8_lossy(&body).into_owned()),
        (
            200,
            format!("error after {LIMIT} bytes: length limit exceeded")
        ),
        "{worker}"
    );
    let mut rest = [0u8; 1];
    assert_eq!(
        r.read(&mut rest).unwrap(),
        0,
        "{worker}: the server closes the connection"
    );
    wait_sum(
        &s,
        "gpe_http_errors_total",
        &[
            ("method", "POST"),
            ("route", "/upload"),
            ("kind", "bad_request"),
        ],
        1.0,
    );
    let m = s.scrape();
    assert_eq!(m.sum("gpe_http_errors_total", &[]), 1.0, "{worker}");
    assert_eq!(
        m.one(
            "gpe_http_requests_total",
            &[("method", "POST"), ("route", "/upload"), ("status", "200")]
        ),
        1.0,
        "{worker}"
    );
    assert_eq!(m.sum("gpe_http_requests_total", &[]), 1.0, "{worker}");
    assert_eq!(
        m.one("gpe_http_request_size_bytes_sum", &[]),
        LIMIT as f64,
        "{worker}"
    );
}

fn sse_streams_while_other_requests_are_served(worker: &str) {
    let s = start(worker, 1, &[]);
    let addr = s.addr;
    let (began, first_event) = std::sync::mpsc::channel();
    let sse = std::thread::spawn(move || {
        let t0 = Instant::now();
        let (head, events) = read_sse(addr, "/sse?n=100&ms=10", |_| {
            let _ = began.send(());
        });
        (t0, head, events)
    });
    // Once the stream has begun: 4 keep-alive clients, 250 requests each.
    first_event.recv_timeout(Duration::from_secs(10)).unwrap();
    let t_load = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = KeepAlive::connect(addr).unwrap();
                for _ in 0..250 {
                    let r = c.request("GET", "/", b"").unwrap();
                    assert_eq!((r.status, &r.body[..]), (200, &b"Hello, World!"[..]));
                }
                Instant::now()
            })
        })
        .collect();
    let load_end = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .max()
        .unwrap();
    let (t0, head, events) = sse.join().unwrap();
    assert_eq!(head.status, 200, "{worker}");
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    let data: Vec<String> = events.iter().map(|e| e.data.clone()).collect();
    let want: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert_eq!(data, want, "{worker}: 100 events, complete and in order");
    let last = events[99].at;
    println!(
        "{worker}: SSE took {:?}; the 1000 requests took {:?} and ended {:?} before the last event",
        last - t0,
        load_end - t_load,
        last.checked_duration_since(load_end)
    );
    // Each event waits 10 ms before it is sent.
    assert!(last - t0 >= Duration::from_millis(1000), "{worker}");
    // The same process answered all 1000 while the stream ran.
    assert!(
        load_end < last,
        "{worker}: the 1000 requests ended {:?} after the last event",
        load_end - last
    );
    let m = s.scrape();
    assert_eq!(
        m.one(
            "gpe_http_requests_total",
            &[("method", "GET"), ("route", "/"), ("status", "200")]
        ),
        1000.0
    );
    wait_sum(
        &s,
        "gpe_http_requests_total",
        &[("method", "GET"), ("route", "/sse"), ("status", "200")],
        1.0,
    );
    let m = s.scrape();
    assert_eq!(m.sum("gpe_worker_requests_total", &[]), 1001.0);
    assert_eq!(m.sum("gpe_http_errors_total", &[]), 0.0);
    // The duration runs to the end of the stream: at least the 100 waits.
    let sse = [("method", "GET"), ("route", "/sse")];
    assert_eq!(m.one("gpe_http_request_duration_seconds_count", &sse), 1.0);
    assert!(
        m.one("gpe_http_request_duration_seconds_sum", &sse) >= 1.0,
        "{worker}: {}",
        m.one("gpe_http_request_duration_seconds_sum", &sse)
    );
    assert_eq!(
        m.one(
            "gpe_http_request_duration_seconds_bucket",
            &[sse[0], sse[1], ("le", "0.5")]
        ),
        0.0,
        "{worker}"
    );
}

fn ws_connect(addr: SocketAddr) -> tungstenite::WebSocket<std::net::TcpStream> {
    let (ws, resp) = tungstenite::client(format!("ws://{addr}/ws"), connect(addr)).unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

fn websocket_echo(worker: &str) {
    use tungstenite::Message;
    let s = start(worker, 1, &[]);
    let mut ws = ws_connect(s.addr);
    s.wait_for("gpe_worker_connections", &[], 1.0);
    wait_sum(
        &s,
        "gpe_http_requests_total",
        &[("method", "GET"), ("route", "/ws"), ("status", "101")],
        1.0,
    );
    for i in 0..1000u32 {
        let msg = if i % 2 == 0 {
            Message::text(format!("message {i}"))
        } else {
            Message::binary(i.to_be_bytes().repeat(i as usize % 64 + 1))
        };
        ws.send(msg.clone()).unwrap();
        let back = loop {
            match ws.read().unwrap() {
                Message::Ping(_) | Message::Pong(_) => continue,
                m => break m,
            }
        };
        assert_eq!(back, msg, "{worker}: message {i}");
    }
    // Still open, still counted.
    assert_eq!(s.scrape().one("gpe_worker_connections", &[]), 1.0);
    // The closing handshake: the server answers our Close frame with its
    // own, then the connection ends.
    ws.close(None).unwrap();
    let mut replies = Vec::new();
    let end = loop {
        match ws.read() {
            Ok(m) => replies.push(m),
            Err(e) => break e,
        }
    };
    drop(ws);
    s.wait_for("gpe_worker_connections", &[], 0.0);
    let m = s.scrape();
    assert_eq!(m.sum("gpe_http_requests_total", &[]), 1.0, "{worker}");
    assert_eq!(m.sum("gpe_http_errors_total", &[]), 0.0, "{worker}");
    assert_eq!(m.one("gpe_http_requests_in_flight", &[]), 0.0, "{worker}");
    assert!(
        matches!(end, tungstenite::Error::ConnectionClosed),
        "{worker}: the closing handshake ended with {end:?} after {replies:?}"
    );
}

#[test]
fn websocket_upgrade_gets_501_on_sync() {
    let s = start("sync", 1, &[]);
    let err = tungstenite::client(format!("ws://{}/ws", s.addr), connect(s.addr)).unwrap_err();
    match err {
        tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 501);
        }
        other => panic!("expected a 501 answer, got {other:?}"),
    }
    wait_sum(
        &s,
        "gpe_http_requests_total",
        &[("method", "GET"), ("route", "unmatched"), ("status", "501")],
        1.0,
    );
    s.wait_for("gpe_worker_connections", &[], 0.0);
    let m = s.scrape();
    assert_eq!(m.sum("gpe_http_requests_total", &[]), 1.0);
    assert_eq!(m.one("gpe_http_requests_in_flight", &[]), 0.0);
}

fn tokio_sleep_and_spawn_answer(worker: &str) {
    let s = start(worker, 1, &[]);
    let t0 = Instant::now();
    let r = get(s.addr, "/sleep/20");
    let took = t0.elapsed();
    assert_eq!((r.status, &r.body[..]), (200, &b"slept"[..]), "{worker}");
    assert!(took >= Duration::from_millis(20), "{worker}: {took:?}");
    let r = get(s.addr, "/spawn");
    assert_eq!(
        (r.status, &r.body[..]),
        (200, &b"spawned 42"[..]),
        "{worker}"
    );
    wait_sum(
        &s,
        "gpe_http_requests_total",
        &[("method", "GET"), ("route", "/spawn"), ("status", "200")],
        1.0,
    );
    let m = s.scrape();
    assert_eq!(
        m.one(
            "gpe_http_requests_total",
            &[
                ("method", "GET"),
                ("route", "/sleep/{ms}"),
                ("status", "200")
            ]
        ),
        1.0,
        "{worker}"
    );
    assert_eq!(m.sum("gpe_http_requests_total", &[]), 2.0, "{worker}");
    assert_eq!(m.sum("gpe_http_errors_total", &[]), 0.0, "{worker}");
}

fn streamed_response_metrics(worker: &str) {
    const BYTES: u64 = 3_000_017;
    let s = start(worker, 1, &[]);
    let (head, n) = download(s.addr, &format!("/download/{BYTES}"), b'x');
    assert_eq!((head.status, n), (200, BYTES), "{worker}");
    s.wait_for("gpe_http_response_size_bytes_count", &[], 1.0);
    let m = s.scrape();
    assert_eq!(
        m.one("gpe_http_response_size_bytes_sum", &[]),
        BYTES as f64,
        "{worker}"
    );
    assert_eq!(
        m.one("gpe_http_request_duration_seconds_count", &[]),
        1.0,
        "{worker}"
    );

    // A client that leaves mid-body.
    let mut c = connect(s.addr);
    write!(
        c,
        "GET /download/{GIB} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::with_capacity(MIB, c);
    let head = read_head(&mut r).unwrap();
    assert_eq!(head.status, 200, "{worker}");
    let mut got = 0u64;
    let mut buf = vec![0u8; MIB];
    while got < 4 * MIB as u64 {
        let k = r.read(&mut buf).unwrap();
        assert!(k > 0, "{worker}: the download ended early");
        got += k as u64;
    }
    s.wait_for("gpe_http_requests_in_flight", &[], 1.0);
    drop(r);
    wait_sum(
        &s,
        "gpe_http_errors_total",
        &[
            ("method", "GET"),
            ("route", "/download/{bytes}"),
            ("kind", "client_disconnect"),
        ],
        1.0,
    );
    s.wait_for("gpe_http_requests_in_flight", &[], 0.0);
    let m = s.scrape();
    assert_eq!(m.sum("gpe_http_errors_total", &[]), 1.0, "{worker}");
}

fn unmatched_route_path_keeps_raw_paths(worker: &str) {
    let s = start(worker, 1, &["--unmatched-route", "path"]);
    assert_eq!(get(s.addr, "/missing/a?q=1").status, 404, "{worker}");
    assert_eq!(get(s.addr, "/missing/b").status, 404, "{worker}");
    assert_eq!(get(s.addr, "/users/7").status, 200, "{worker}");
    s.wait_for("gpe_worker_requests_total", &[], 3.0);
    let m = s.scrape();
    let mut series: Vec<(String, String, f64)> = m
        .samples("gpe_http_requests_total")
        .into_iter()
        .map(|(l, v)| (l["route"].clone(), l["status"].clone(), v))
        .collect();
    series.sort_by(|a, b| a.0.cmp(&b.0));
    let want = [
        ("/missing/a", "404", 1.0),
        ("/missing/b", "404", 1.0),
        ("/users/{id}", "200", 1.0),
    ]
    .map(|(r, st, v)| (r.to_owned(), st.to_owned(), v));
    assert_eq!(series, want, "{worker}");
}

/// A client that keeps sending a chunked body past the limit: the server
/// stops reading, answers, and closes, so the client's writes fail long
/// before its 64 MiB are out.
fn chunked_flood_is_cut_and_closed(worker: &str) {
    const LIMIT: usize = 1 << 20;
    const CHUNK: usize = 64 << 10;
    let s = start(worker, 1, &["--max-body-size", &LIMIT.to_string()]);
    let mut c = connect(s.addr);
    c.write_all(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = [0u8; CHUNK];
        for i in 0..1024 {
            let sent = write!(w, "{CHUNK:x}\r\n")
                .and_then(|()| w.write_all(&chunk))
                .and_then(|()| w.write_all(b"\r\n"));
            if let Err(e) = sent {
                return Some((i * CHUNK, e.kind()));
            }
        }
        None
    });
    let mut answer = Vec::new();
    let read = c.read_to_end(&mut answer);
    let stopped = writer.join().unwrap();
    let (sent, why) = stopped.unwrap_or_else(|| panic!("{worker}: all 64 MiB were accepted"));
    println!("{worker}: writes failed ({why:?}) after {sent} bytes; read {read:?}");
    assert!(
        matches!(
            why,
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{worker}: {why:?}"
    );
    // The answer, unless the reset of the closed socket overtook it.
    match read {
        Ok(_) => {
            let text = String::from_utf8_lossy(&answer);
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{worker}: {text}");
            assert!(
                text.contains("\r\nconnection: close\r\n"),
                "{worker}: {text}"
            );
            assert!(
                text.ends_with(&format!(
                    "\r\n\r\nerror after {LIMIT} bytes: length limit exceeded"
                )),
                "{worker}: {text}"
            );
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{worker}"),
    }
    wait_sum(
        &s,
        "gpe_http_errors_total",
        &[
            ("method", "POST"),
            ("route", "/upload"),
            ("kind", "bad_request"),
        ],
        1.0,
    );
    let m = s.scrape();
    assert_eq!(m.sum("gpe_http_errors_total", &[]), 1.0, "{worker}");
    assert_eq!(m.sum("gpe_http_requests_total", &[]), 1.0, "{worker}");
    assert_eq!(
        m.one("gpe_http_request_size_bytes_sum", &[]),
        LIMIT as f64,
        "{worker}"
    );
}
