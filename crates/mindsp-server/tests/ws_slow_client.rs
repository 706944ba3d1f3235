//! A client that never reads is cut off with 4008 while others keep receiving, and the
//! server's memory stays bounded. Alone in its test binary, so the resident set it
//! measures is this server's only.

mod wsclient;

use std::time::Duration;

use serde_json::json;
use wsclient::{Server, config};

/// Resident memory of this process that is not file-backed (SQLite maps its WAL
/// index and may map the database), in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let field = |i: usize| -> u64 { statm.split_whitespace().nth(i).unwrap().parse().unwrap() };
    (field(1) - field(2)) * 4096
}

const MESSAGES: i64 = 6000;
const CHARS: usize = 3000;

/// Most messages the senders may be ahead of the fast reader: well under the queue's
/// 512, so the fast reader is never the one cut off, however fast the server publishes
/// (the test client is a debug build and reads slower than the server sends).
const AHEAD: i64 = 128;

/// Sends `MESSAGES` messages from 4 tasks while `fast` reads them all, in order.
async fn flood(
    s: &Server,
    mut fast: wsclient::Client,
    actor: mindsp_core::Actor,
    cid: mindsp_core::ConversationId,
    last: i64,
    text: &str,
) -> (wsclient::Client, i64) {
    let read = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let progress = read.clone();
    let reader = tokio::spawn(async move {
        let mut expected = last + 1;
        while expected <= last + MESSAGES {
            let f = fast.next("new_message").await;
            let seq = f["message"]["seq"].as_i64().unwrap();
            assert_eq!(
                seq, expected,
                "the fast reader gets every message, in order"
            );
            expected += 1;
            progress.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        fast
    });
    let mut senders = Vec::new();
    for t in 0..4 {
        let messaging = s.state.messaging.clone();
        let text = text.to_owned();
        let (read, sent) = (read.clone(), sent.clone());
        senders.push(tokio::spawn(async move {
            for i in 0..MESSAGES / 4 {
                use std::sync::atomic::Ordering::SeqCst;
                while sent.load(SeqCst) - read.load(SeqCst) >= AHEAD {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                sent.fetch_add(1, SeqCst);
                messaging
                    .send(&actor, cid, &format!("{t}-{i} {text}"), None)
                    .await
                    .unwrap();
            }
        }));
    }
    for h in senders {
        h.await.unwrap();
    }
    (reader.await.unwrap(), last + MESSAGES)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_and_memory_stays_bounded() {
    let mut cfg = config();
    cfg.ws.queue_capacity = 512;
    cfg.ws.close_timeout = Duration::from_secs(60);
    let s = Server::start(cfg).await;
    let admin = s.tenant("sdis13").await;
    let alice = s.user(&admin, "sdis13", "Alice").await;
    let bob = s.user(&admin, "sdis13", "Bob").await;
    let carol = s.user(&admin, "sdis13", "Carol").await;
    let conv = s.group(&alice, &[&bob, &carol]).await;
    let cid: mindsp_core::ConversationId = conv.parse().unwrap();

    let mut fast = s.connect(&bob).await;
    // A cursor makes the order strict from the first message on.
    fast.ok("resume", json!({"cursors": {conv.clone(): 0}}))
        .await;
    let text = "feu de broussailles, renfort demandé ".repeat(CHARS / 37);

    // The store's page caches grow with the database (up to 64 MiB per SQLite
    // connection), so the same flood runs once more without the slow client as a
    // control: what the slow client costs is the difference.
    let (fast, last) = flood(&s, fast, alice.actor, cid, 0, &text).await;
    let r0 = rss();
    let (fast, last) = flood(&s, fast, alice.actor, cid, last, &text).await;
    let r1 = rss();
    // Carol connects and then never reads.
    let mut slow = s.connect(&carol).await;
    let (mut fast, _) = flood(&s, fast, alice.actor, cid, last, &text).await;
    let r2 = rss();
    let hub = s.state.realtime.hub().clone();
    assert!(
        hub.slow_disconnects() >= 1,
        "the client that never reads was cut off"
    );

    // Carol, reading at last, finds the documented close code after what was buffered.
    assert_eq!(slow.close_code().await, Some(4008));
    // Bob is still served.
    fast.ok("ping", json!({})).await;

    let flood = (MESSAGES as u64) * (CHARS as u64);
    let control = r1.saturating_sub(r0);
    let with_slow = r2.saturating_sub(r1);
    eprintln!(
        "flood {flood} B: memory grew {control} B without the slow client, {with_slow} B with it"
    );
    // Had the slow client's queue been unbounded it would hold the whole flood (twice:
    // the message and its frame). Bounded, it costs a small fraction of it.
    assert!(
        with_slow < control + flood / 2,
        "memory grew by {with_slow} bytes with a slow client, {control} without, for a {flood}-byte flood"
    );
}
