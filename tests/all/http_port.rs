//! The HTTP port under an attacker's sockets: a slow-socket flood of twice
//! the open-file limit leaves `/healthz`, `/oauth/callback` and `/risc`
//! answering within a second; half-sent headers, idle keep-alives and slow
//! bodies are closed on their deadlines; bodies and headers are bounded per
//! route; beyond loopback the port speaks TLS only, and `/metrics` can live
//! on its own address.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::mtls::Pki;
use crate::serve_cli::ServeProcess;
use crate::support::{Backend, spawn_vault_with};

/// The soft open-file limit the flooded server runs with.
const OPEN_FILES: u64 = 256;
/// The flood: twice the open-file limit.
const FLOOD: usize = 2 * OPEN_FILES as usize;
/// What the acceptance allows a request during the flood.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// A request head that never ends: the slow-socket attacker's opening.
const HALF_SENT: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: tokenvault\r\nX-Slow: ";

/// Sends `request` on a fresh connection and reads the answer's status code
/// (and the rest of what arrives before the server closes or `limit`).
async fn exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> (u16, String) {
    let io = async {
        let mut s = TcpStream::connect(addr)
            .await
            .expect("connect to the HTTP port");
        s.write_all(request).await.expect("send the request");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if complete(&buf) {
                break;
            }
        }
        buf
    };
    let buf = tokio::time::timeout(limit, io)
        .await
        .unwrap_or_else(|_| panic!("no complete answer within {limit:?}"));
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    (status, text)
}

/// Whether `buf` holds a whole response (headers and a `Content-Length` body).
fn complete(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    let length = text[..end]
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    buf.len() >= end + 4 + length
}

/// Waits until the server closes `s` (EOF or reset), at most `limit`;
/// returns how long that took, `None` if it stayed open.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| started.elapsed())
}

/// Lets this test process hold the flood's sockets next to every other
/// test's: the soft open-file limit raised to `want`, within the hard limit.
fn raise_own_open_file_limit(want: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|c| c < want) {
        let current = Some(limit.maximum.map_or(want, |m| m.min(want)));
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current,
                maximum: limit.maximum,
            },
        );
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: tokenvault\r\nConnection: close\r\n\r\n").into_bytes()
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: tokenvault\r\nConnection: close\r\n\
         Content-Type: application/secevent+jwt\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A `serve` process with 256 open files is flooded with 512 connections that
/// each send half a request head and wait. The port sheds the oldest idle
/// ones for new ones, so every route keeps answering at once, and its
/// metrics count what it shed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_socket_flood_of_twice_the_fd_limit_leaves_the_routes_answering() {
    raise_own_open_file_limit(4 * FLOOD as u64);
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProcess::start_with_open_files(
        dir.path(),
        &[],
        &[
            // Long enough that no flood socket is closed by a deadline during
            // the test: what keeps the port answering is the connection limit.
            ("TOKENVAULT_HTTP__HEADER_READ_TIMEOUT_SECONDS", "120"),
            ("TOKENVAULT_AUTH__REFUSAL_DELAY_MS", "0"),
        ],
        OPEN_FILES,
    );
    let addr: SocketAddr = server.http_addr.parse().unwrap();
    assert!(
        server
            .log_text()
            .contains("http.max_connections lowered to half the open-file limit"),
        "the limit was not fitted to the open-file limit: {}",
        server.log_text()
    );

    let mut flood = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let mut s = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("flood connection {i}: {e}"));
        s.write_all(HALF_SENT).await.expect("half a request");
        flood.push(s);
    }

    let answers: [(&str, Vec<u8>, u16); 4] = [
        ("GET /healthz", get("/healthz"), 200),
        (
            "GET /oauth/callback",
            get("/oauth/callback?state=unknown&code=4%2Fnothing"),
            400,
        ),
        ("POST /risc", post("/risc", "not.a.token"), 400),
        ("GET /healthz again", get("/healthz"), 200),
    ];
    for (what, request, want) in answers {
        let started = Instant::now();
        let (status, text) = exchange(addr, &request, Duration::from_secs(10)).await;
        let took = started.elapsed();
        assert_eq!(status, want, "{what} during the flood: {text}");
        assert!(
            took < ANSWER_WITHIN,
            "{what} took {took:?} during a flood of {FLOOD} slow sockets"
        );
    }

    // The server closed the flood's oldest sockets to make room; the newest
    // (at most max_connections = 128 of them) may still be held.
    let mut checks = JoinSet::new();
    for mut s in flood {
        checks.spawn(async move {
            closed_within(&mut s, Duration::from_secs(3))
                .await
                .is_some()
        });
    }
    let closed = checks.join_all().await.into_iter().filter(|c| *c).count();
    let held_at_most = (OPEN_FILES / 2) as usize;
    assert!(
        closed >= FLOOD - held_at_most,
        "only {closed} of {FLOOD} flood sockets were closed; at most {held_at_most} may be held"
    );

    let (status, metrics) = exchange(addr, &get("/metrics"), Duration::from_secs(10)).await;
    assert_eq!(status, 200);
    let shed: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("tokenvault_http_connections_closed_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        shed >= (FLOOD - held_at_most) as f64,
        "tokenvault_http_connections_closed_total counts {shed}, expected at least {}",
        FLOOD - held_at_most
    );
    assert!(
        !server.log_text().contains("Too many open files"),
        "the server ran out of descriptors: {}",
        server.log_text()
    );
}

/// Half-sent headers, idle keep-alive connections and slow bodies are closed
/// on their deadlines; oversized heads and bodies are refused unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_body_limits_close_what_a_slow_client_holds() {
    let Some(tv) = spawn_vault_with(Backend::Sqlite, |c| {
        c.http.header_read_timeout_seconds = 1;
        c.http.body_read_timeout_seconds = 1;
    })
    .await
    else {
        return;
    };
    let addr = tv.http_addr;

    // Half a head: closed after the header deadline, not before.
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(HALF_SENT).await.unwrap();
    let took = closed_within(&mut half, Duration::from_secs(10))
        .await
        .expect("a half-sent head is closed");
    assert!(
        took >= Duration::from_millis(800),
        "closed after {took:?}, before its deadline"
    );

    // One whole request on a kept-alive connection, then silence: closed as
    // idle.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: tokenvault\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !complete(&buf) {
        let n = idle.read(&mut chunk).await.unwrap();
        assert_ne!(n, 0, "closed before answering");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    assert!(
        closed_within(&mut idle, Duration::from_secs(10))
            .await
            .is_some(),
        "an idle keep-alive connection stayed open"
    );

    // A body that stops halfway: 408 on the body deadline.
    let started = Instant::now();
    let (status, text) = exchange(
        addr,
        b"POST /risc HTTP/1.1\r\nHost: tokenvault\r\nContent-Length: 1000\r\n\r\neyJhbGciOi",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status, 408, "{text}");
    assert!(started.elapsed() >= Duration::from_millis(800));

    // A body on a route that takes none, a /risc body over its limit, and a
    // head over 16 KiB: refused without being read.
    let (status, text) = exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: tokenvault\r\nContent-Length: 5\r\n\r\nhello",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status, 413, "{text}");
    let big = "a".repeat(tokenvault::limits::MAX_RISC_BODY_BYTES + 1);
    let (status, text) = exchange(addr, &post("/risc", &big), Duration::from_secs(10)).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("token too large"), "{text}");
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: tokenvault\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20 * 1024)
    );
    let (status, text) = exchange(addr, head.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(status, 431, "{text}");

    // And the port still answers.
    let (status, _) = exchange(addr, &get("/healthz"), Duration::from_secs(10)).await;
    assert_eq!(status, 200);
}

/// Beyond loopback the HTTP port speaks TLS with the server's certificate
/// and nothing else; `/metrics` moves to `http.metrics_addr` when set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_the_http_port_is_tls_and_metrics_has_its_own_address() {
    let pki = Pki::generate();
    let Some(tv) = spawn_vault_with(Backend::Sqlite, |c| {
        pki.configure(c);
        c.http_addr = "0.0.0.0:0".parse().unwrap();
        c.http.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
    else {
        return;
    };
    let port = tv.http_addr.port();
    let local: SocketAddr = ([127, 0, 0, 1], port).into();
    let metrics_addr = tv
        .server
        .as_ref()
        .and_then(|s| s.metrics_addr)
        .expect("a metrics address");

    // Plain HTTP gets no HTTP answer, only a TLS alert or a close.
    let mut plain = TcpStream::connect(local).await.unwrap();
    plain.write_all(&get("/healthz")).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(
        !buf.starts_with(b"HTTP/"),
        "plain HTTP was answered beyond loopback: {:?}",
        String::from_utf8_lossy(&buf)
    );

    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca.pem().as_bytes()).unwrap())
        .resolve("localhost", local)
        .build()
        .unwrap();
    let health = client
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .await
        .expect("HTTPS /healthz");
    assert_eq!(health.status(), 200);
    let moved = client
        .get(format!("https://localhost:{port}/metrics"))
        .send()
        .await
        .expect("HTTPS /metrics");
    assert_eq!(
        moved.status(),
        404,
        "/metrics is served on http.metrics_addr only"
    );

    let (status, text) = exchange(metrics_addr, &get("/metrics"), Duration::from_secs(10)).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("tokenvault_http_connections"), "{text}");
}
