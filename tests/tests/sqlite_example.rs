//! The blocking rusqlite example (`gpe-blocking-sqlite`) on the thread worker:
//! it is run with the same command line as `gpe serve`, every request runs on
//! a pool thread with its own connection, and the counts are exact.
#![allow(clippy::unwrap_used)]

use gpe_tests::*;

#[test]
fn notes_are_stored_and_counted_exactly_on_the_thread_worker() {
    let db = tempfile::tempdir().unwrap();
    let path = db.path().join("notes.db");
    let mut opts = Opts::new("thread", 2).args(&["--threads", "4"]);
    opts.env
        .push(("SQLITE_PATH".to_owned(), path.to_str().unwrap().to_owned()));
    let s = Server::start(
        &example_bin("gpe-blocking-sqlite", "gpe-example-blocking-sqlite"),
        opts,
    );
    let addr = s.addr;
    // 4 clients store 50 notes each.
    let ids = parallel(4, 50, move |c, i| {
        let r = http(
            addr,
            "POST",
            "/notes",
            &[],
            format!("note {c}-{i}").as_bytes(),
        )
        .unwrap();
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        String::from_utf8(r.body).unwrap().parse::<i64>().unwrap()
    });
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 200, "every note got its own id");
    let count = get(addr, "/notes");
    assert_eq!(count.status, 200);
    assert_eq!(String::from_utf8(count.body).unwrap(), "200");
    let one = get(addr, &format!("/notes/{}", ids[0]));
    assert_eq!(one.status, 200);
    assert!(String::from_utf8(one.body).unwrap().starts_with("note "));
    assert_eq!(get(addr, "/notes/999999").status, 404);
    let m = s.scrape();
    let requests = |method: &str, route: &str, status: &str| {
        m.one(
            "gpe_http_requests_total",
            &[("method", method), ("route", route), ("status", status)],
        )
    };
    assert_eq!(requests("POST", "/notes", "201"), 200.0);
    assert_eq!(requests("GET", "/notes", "200"), 1.0);
    assert_eq!(requests("GET", "/notes/{id}", "200"), 1.0);
    assert_eq!(requests("GET", "/notes/{id}", "404"), 1.0);
    assert_eq!(m.sum("gpe_http_requests_total", &[]), 203.0);
}
