//! A real browser (headless Chromium, `MINDSP_TEST_CHROMIUM`; skipped with a message
//! otherwise) uses the API as a web client would, from a page of its own origin
//! (`tests/browser/page.html`): it logs in over CORS, opens `/ws?token=`, sends a message
//! longer than one server frame and gets it back whole, receives a colleague's reply,
//! and sees the close code of a tab closed for a newer one (4009). A page of an origin
//! not allowed can neither call the API nor open the socket. The page reports each
//! step to its own origin; this test checks them against the server's side.

mod wsclient;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use wsclient::{PASSWORD, Server, config};

const PAGE: &str = include_str!("browser/page.html");

/// How long the browser gets for every step together (it starts cold).
const STEPS: Duration = Duration::from_secs(90);

fn chromium() -> Option<String> {
    match std::env::var("MINDSP_TEST_CHROMIUM") {
        Ok(path) if !path.is_empty() => Some(path),
        _ => {
            eprintln!(
                "skipped: set MINDSP_TEST_CHROMIUM to a Chromium binary to run the browser test"
            );
            None
        }
    }
}

/// The page and its report route, served on `n` origins (loopback ports) of their own.
async fn page_origins(n: usize) -> (Vec<SocketAddr>, mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route("/page.html", get(|| async { Html(PAGE) }))
        .route(
            "/report",
            post(move |axum::Json(v): axum::Json<Value>| {
                let _ = tx.send(v);
                async { StatusCode::NO_CONTENT }
            }),
        );
    let mut addrs = Vec::new();
    for _ in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        let app = app.clone();
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    (addrs, rx)
}

/// The browser, in a process group of its own so that its helpers go with it.
struct Browser {
    child: tokio::process::Child,
    profile: std::path::PathBuf,
}

impl Browser {
    fn open(binary: &str, url: &str) -> Self {
        let profile =
            std::env::temp_dir().join(format!("mindsp-chromium-{}", uuid::Uuid::new_v4()));
        let child = tokio::process::Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        Self { child, profile }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The page's reports, by step.
struct Reports {
    rx: mpsc::UnboundedReceiver<Value>,
    kept: HashMap<String, Value>,
    deadline: tokio::time::Instant,
}

impl Reports {
    async fn step(&mut self, step: &str) -> Value {
        loop {
            if let Some(r) = self.kept.remove(step) {
                return r;
            }
            let r = tokio::time::timeout_at(self.deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("the page did not report {step:?}"))
                .expect("reports");
            let name = r["step"].as_str().unwrap_or("").to_owned();
            assert_ne!(name, "failed", "the page failed: {r}");
            self.kept.insert(name, r);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_page_chats_over_the_socket_and_other_origins_are_refused() {
    let Some(binary) = chromium() else { return };
    let (origins, rx) = page_origins(2).await;
    let (page, other) = (origins[0], origins[1]);
    let mut cfg = config();
    cfg.ws.allowed_origins = vec![format!("http://{page}")];
    cfg.ws.max_connections_per_user = 2;
    let s = Server::start(cfg).await;
    let admin = s.tenant("sdis13").await;
    let alice = s.user(&admin, "sdis13", "Alice").await;
    let bob = s.user(&admin, "sdis13", "Bob").await;
    let conv = s.group(&alice, &[&bob]).await;
    let mut b = s.connect(&bob).await;

    let query = [
        ("api", format!("http://{}", s.addr)),
        ("tenant", "sdis13".to_owned()),
        ("email", "alice@sdis13.fr".to_owned()),
        ("password", PASSWORD.to_owned()),
        ("conv", conv.clone()),
        ("other", format!("http://{other}")),
    ];
    let url = reqwest::Url::parse_with_params(&format!("http://{page}/page.html"), &query)
        .unwrap()
        .to_string();
    let _browser = Browser::open(&binary, &url);
    let mut reports = Reports {
        rx,
        kept: HashMap::new(),
        deadline: tokio::time::Instant::now() + STEPS,
    };

    // Sent from the page, acknowledged, and back whole on its own socket (fragmented).
    let sent = reports.step("sent").await;
    assert_eq!(sent["echoed"], true, "{sent}");
    let m = b.next("new_message").await;
    assert_eq!(m["message"]["seq"], sent["seq"]);
    assert_eq!(m["message"]["sender_id"], alice.id.as_str());
    let chars = m["message"]["content"].as_str().unwrap().chars().count();
    assert_eq!(json!(chars), sent["chars"]);

    // Bob's reply reaches the page live.
    let reply = b
        .ok(
            "send",
            json!({"conversation_id": conv, "content": "Reçu, on arrive."}),
        )
        .await;
    let received = reports.step("received").await;
    assert_eq!(received["content"], "Reçu, on arrive.");
    assert_eq!(received["seq"], reply["message"]["seq"]);

    // Another origin: no API answer readable, no socket (the 403 shows as 1006).
    let foreign = reports.step("foreign").await;
    assert_eq!(
        foreign,
        json!({"step": "foreign", "opened": false, "code": 1006, "cors": "blocked"})
    );

    // A third tab closes the first with a code the page can read.
    let superseded = reports.step("superseded").await;
    assert_eq!(superseded["code"], 4009, "{superseded}");
    assert!(
        superseded["reason"]
            .as_str()
            .unwrap()
            .starts_with("too many connections"),
        "{superseded}"
    );
    assert_eq!(superseded["others_open"], true);
}
