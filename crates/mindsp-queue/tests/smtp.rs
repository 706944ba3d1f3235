//! E-mail as a user sees it: rendered French e-mails sent through a real SMTP server on
//! loopback (Python's aiosmtpd, with the handler in `tests/smtp_sink.py`), then parsed
//! back from what the server received. Also: what a down or stalled server gives, how
//! the `email.send` handler maps it, and the file mailer.
//!
//! Needs `python3` with `aiosmtpd` (`pip install aiosmtpd`). Without it the tests that
//! need the server print "skipped: aiosmtpd not installed" and pass, unless `CI` is set,
//! where they fail.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, TimeZone, Utc};
use mail_parser::{MessageParser, MimeHeaders};
use mindsp_core::JobId;
use mindsp_core::mail::{Email, MailError, Mailbox, Mailer};
use mindsp_queue::mail::templates::{
    DigestConversation, DigestExcerpt, Templates, TrainingSession, UnreadDigest,
};
use mindsp_queue::mail::{EmailJob, FileMailer, SendEmail, SmtpConfig, SmtpMailer, SmtpTls};
use mindsp_queue::worker::{Handler, JobError};
use mindsp_queue::{Job, JobState, NewJob};

// ---------------------------------------------------------------------------------
// The SMTP server
// ---------------------------------------------------------------------------------

/// A running aiosmtpd, killed and its directory removed when dropped (also on panic).
struct SmtpSink {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One message the server accepted.
struct Received {
    mail_from: String,
    rcpt_tos: Vec<String>,
    raw: Vec<u8>,
}

impl SmtpSink {
    /// Starts the server, or answers `None` (after saying so) when aiosmtpd is missing
    /// outside CI.
    fn start() -> Option<Self> {
        let available = Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !available {
            if std::env::var_os("CI").is_some() {
                panic!("aiosmtpd is required in CI: pip install aiosmtpd");
            }
            eprintln!("skipped: aiosmtpd not installed");
            return None;
        }
        // A port found free may be taken before aiosmtpd binds it: try a few.
        for _ in 0..3 {
            if let Some(sink) = Self::spawn(free_port()) {
                return Some(sink);
            }
        }
        panic!("aiosmtpd did not start; see its output above");
    }

    /// Starts aiosmtpd on `port` and waits until it accepts connections; `None` if it
    /// exited first (the port was taken).
    fn spawn(port: u16) -> Option<Self> {
        let dir = temp_dir("smtp-sink");
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "smtp_sink.Sink"])
            .arg(&dir)
            .env(
                "PYTHONPATH",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python3 -m aiosmtpd");
        let mut sink = SmtpSink { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(sink);
            }
            if sink.child.try_wait().expect("poll aiosmtpd").is_some() {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message received so far, in order.
    fn received(&self) -> Vec<Received> {
        let mut names: Vec<_> = std::fs::read_dir(&self.dir)
            .expect("read the sink directory")
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|eml| {
                let envelope: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(eml.with_extension("json")).expect("read the envelope"),
                )
                .expect("parse the envelope");
                Received {
                    mail_from: envelope["mail_from"].as_str().unwrap().to_owned(),
                    rcpt_tos: envelope["rcpt_tos"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r.as_str().unwrap().to_owned())
                        .collect(),
                    raw: std::fs::read(&eml).expect("read the message"),
                }
            })
            .collect()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

fn temp_dir(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mindsp-{what}-{}", uuid::Uuid::new_v4().simple()))
}

// ---------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------

fn sender() -> Mailbox {
    Mailbox {
        name: Some("MindSP — SDIS 13".into()),
        address: "ne-pas-repondre@sdis13.fr".into(),
    }
}

fn recipient(address: &str) -> Mailbox {
    Mailbox {
        name: Some("Sergent Élodie Lefèvre".into()),
        address: address.into(),
    }
}

fn session() -> TrainingSession {
    TrainingSession {
        title: "Secours routier et désincarcération".into(),
        kind: "FMPA".into(),
        // Tuesday 3 March 2026, 14 h 00 – 17 h 00 in Paris (UTC+1).
        starts_at: Utc.with_ymd_and_hms(2026, 3, 3, 13, 0, 0).unwrap(),
        ends_at: Utc.with_ymd_and_hms(2026, 3, 3, 16, 0, 0).unwrap(),
        location: "CIS Aix-en-Provence, plateau de manœuvre".into(),
        organiser: "Lieutenant Benoît Dubois".into(),
        url: "https://mindsp.sdis13.fr/formations/42".into(),
    }
}

fn job_for(new: &NewJob) -> Job {
    let now = Utc::now();
    Job {
        id: JobId::new(),
        tenant: new.tenant,
        kind: new.kind.clone(),
        queue: new.queue.clone(),
        payload: new.payload.clone(),
        priority: new.priority,
        state: JobState::Running,
        run_at: now,
        attempts: 1,
        max_attempts: new.max_attempts,
        unique_key: None,
        last_error: None,
        created_at: now,
        updated_at: now,
        finished_at: None,
    }
}

fn mailer_for(url: &str, timeout: Duration) -> SmtpMailer {
    let mut config = SmtpConfig::from_url(url, sender()).expect("a valid SMTP URL");
    config.timeout = timeout;
    SmtpMailer::new(config).expect("an SMTP mailer")
}

/// Checks that `raw` is `email` as sent by `from`: recipient, decoded subject, a
/// `multipart/alternative` with a text/plain and a text/html part whose decoded
/// contents are the e-mail's, accents intact.
fn assert_is(raw: &[u8], email: &Email, from: &Mailbox) {
    let message = MessageParser::default()
        .parse(raw)
        .expect("a parsable message");
    assert_eq!(message.subject(), Some(email.subject.as_str()));
    let to = message.to().and_then(|t| t.first()).expect("a To header");
    assert_eq!(to.address(), Some(email.to.address.as_str()));
    assert_eq!(to.name(), email.to.name.as_deref());
    let sender = message
        .from()
        .and_then(|f| f.first())
        .expect("a From header");
    assert_eq!(sender.address(), Some(from.address.as_str()));
    assert_eq!(sender.name(), from.name.as_deref());
    assert!(message.message_id().is_some(), "a Message-ID");

    let root = message.content_type().expect("a content type");
    assert_eq!(
        (root.ctype(), root.subtype()),
        ("multipart", Some("alternative"))
    );
    let part = |subtype: &str| -> String {
        let parts: Vec<_> = message
            .parts
            .iter()
            .filter(|p| {
                p.content_type()
                    .is_some_and(|c| c.ctype() == "text" && c.subtype() == Some(subtype))
            })
            .collect();
        assert_eq!(parts.len(), 1, "one text/{subtype} part");
        let ct = parts[0].content_type().unwrap();
        assert_eq!(
            ct.attribute("charset")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("utf-8")
        );
        parts[0]
            .text_contents()
            .expect("text contents")
            .replace("\r\n", "\n")
    };
    let normalise = |s: &str| s.replace("\r\n", "\n").trim_end().to_owned();
    assert_eq!(normalise(&part("plain")), normalise(&email.text));
    assert_eq!(
        normalise(&part("html")),
        normalise(email.html.as_deref().unwrap())
    );
}

// ---------------------------------------------------------------------------------
// Tests against the real server
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn rendered_french_mail_arrives_intact() {
    let Some(sink) = SmtpSink::start() else {
        return;
    };
    let mailer = mailer_for(&sink.url(), Duration::from_secs(10));
    let templates = Templates::default();
    let to = recipient("elodie.lefevre@sdis13.fr");
    let invitation = templates.invitation(&to, &session()).unwrap();
    let reminder = templates
        .reminder(&to, &session(), TimeDelta::hours(24))
        .unwrap();
    let digest = templates
        .unread_digest(
            &to,
            &UnreadDigest {
                conversations: vec![DigestConversation {
                    title: "Garde CS Marseille-Nord".into(),
                    unread: 2,
                    excerpts: vec![DigestExcerpt {
                        author: "Caporal-chef Noël".into(),
                        sent_at: Utc.with_ymd_and_hms(2026, 7, 14, 6, 30, 0).unwrap(),
                        text: "Manœuvre échelle décalée à 9 h, prévoir l'ARI.".into(),
                    }],
                }],
                url: "https://mindsp.sdis13.fr/messages".into(),
            },
        )
        .unwrap();

    mailer.check().await.expect("the server answers");
    for email in [&invitation, &reminder, &digest] {
        mailer.send(email).await.expect("the server accepts it");
    }

    let received = sink.received();
    assert_eq!(received.len(), 3);
    for (got, email) in received.iter().zip([&invitation, &reminder, &digest]) {
        assert_eq!(got.mail_from, "ne-pas-repondre@sdis13.fr");
        assert_eq!(got.rcpt_tos, ["elodie.lefevre@sdis13.fr"]);
        assert!(got.raw.is_ascii(), "the message travels 7-bit clean");
        assert_is(&got.raw, email, &sender());
    }
    // Spot-check the decoded French, beyond equality with what was rendered.
    let text = |raw: &[u8]| {
        let m = MessageParser::default().parse(raw).unwrap();
        (
            m.subject().unwrap().to_owned(),
            m.body_text(0).unwrap().into_owned(),
        )
    };
    let (subject, body) = text(&received[0].raw);
    assert_eq!(
        subject,
        "Invitation : FMPA « Secours routier et désincarcération », mardi 3 mars, 14 h 00"
    );
    assert!(body.contains("Bonjour Sergent Élodie Lefèvre,"), "{body}");
    assert!(body.contains("plateau de manœuvre"), "{body}");
    assert!(body.contains("présent ou absent"), "{body}");
    let (subject, _) = text(&received[1].raw);
    assert!(subject.ends_with("dans 24 heures"), "{subject}");
    let (_, body) = text(&received[2].raw);
    assert!(
        body.contains("mardi 14 juillet, 8 h 30"),
        "summer time: {body}"
    );
    assert!(
        body.contains("Manœuvre échelle décalée à 9 h, prévoir l'ARI."),
        "{body}"
    );
}

#[tokio::test]
async fn refusals_map_to_permanent_and_temporary_failures() {
    let Some(sink) = SmtpSink::start() else {
        return;
    };
    let mailer: Arc<dyn Mailer> = Arc::new(mailer_for(&sink.url(), Duration::from_secs(10)));
    let handler = SendEmail::new(mailer.clone());
    let mail = |address: &str| {
        Templates::default()
            .cancellation(&recipient(address), &session(), Some("Alerte météo"))
            .unwrap()
    };

    // 550 to RCPT: retrying cannot help.
    let refused = mail("reject.me@sdis13.fr");
    let err = mailer.send(&refused).await.unwrap_err();
    assert!(
        matches!(&err, MailError::Permanent(m) if m.contains("550")),
        "{err:?}"
    );
    let job = job_for(&EmailJob::new(refused).to_job());
    assert!(matches!(
        handler.run(&job).await,
        Err(JobError::Permanent(_))
    ));

    // 451 to RCPT: try again later.
    let busy = mail("busy@sdis13.fr");
    let err = mailer.send(&busy).await.unwrap_err();
    assert!(
        matches!(&err, MailError::Transient(m) if m.contains("451")),
        "{err:?}"
    );
    let job = job_for(&EmailJob::new(busy).to_job());
    assert!(matches!(handler.run(&job).await, Err(JobError::Retry(_))));

    // STARTTLS required but not offered (aiosmtpd runs without TLS here): nothing
    // goes out in plain text.
    let strict = mailer_for(
        &format!("{}?tls=starttls", sink.url()),
        Duration::from_secs(10),
    );
    let err = strict
        .send(&mail("elodie.lefevre@sdis13.fr"))
        .await
        .unwrap_err();
    assert!(matches!(err, MailError::Transient(_)), "{err:?}");

    // The handler delivers a good one; nothing refused was stored.
    let good = mail("elodie.lefevre@sdis13.fr");
    let job = job_for(&EmailJob::new(good.clone()).to_job());
    handler.run(&job).await.expect("delivered");
    let received = sink.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].rcpt_tos, ["elodie.lefevre@sdis13.fr"]);
    assert_is(&received[0].raw, &good, &sender());

    // The same job once more, as after a worker that died before marking it done: the
    // copy carries the first one's Message-ID, made from the job's id.
    handler.run(&job).await.expect("delivered again");
    let received = sink.received();
    assert_eq!(received.len(), 2);
    let message_id = |raw: &[u8]| {
        MessageParser::default()
            .parse(raw)
            .and_then(|m| m.message_id().map(str::to_owned))
    };
    let domain = sender().address.split_once('@').unwrap().1.to_owned();
    assert_eq!(
        message_id(&received[0].raw),
        Some(format!("{}@{domain}", job.id.0.simple()))
    );
    assert_eq!(message_id(&received[1].raw), message_id(&received[0].raw));
}

// ---------------------------------------------------------------------------------
// No server, or one that never answers
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn closed_port_is_a_transient_failure_and_the_job_retries() {
    let port = free_port(); // bound then released: nothing listens there now
    let timeout = Duration::from_secs(5);
    let mailer = Arc::new(mailer_for(&format!("smtp://127.0.0.1:{port}"), timeout));
    let email = Templates::default()
        .invitation(&recipient("elodie.lefevre@sdis13.fr"), &session())
        .unwrap();

    let started = Instant::now();
    let err = mailer.send(&email).await.unwrap_err();
    assert!(started.elapsed() < timeout, "took {:?}", started.elapsed());
    assert!(
        matches!(&err, MailError::Transient(m) if m.contains(&port.to_string())),
        "{err:?}"
    );

    assert!(matches!(mailer.check().await, Err(MailError::Transient(_))));

    let job = job_for(&EmailJob::new(email).to_job());
    let result = SendEmail::new(mailer).run(&job).await;
    assert!(matches!(result, Err(JobError::Retry(_))), "{result:?}");
}

#[tokio::test]
async fn silent_server_times_out_as_a_transient_failure() {
    // Accepts connections (the kernel completes the handshake) but never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let timeout = Duration::from_millis(500);
    let mailer = mailer_for(&format!("smtp://127.0.0.1:{port}"), timeout);
    let email = Templates::default()
        .reminder(
            &recipient("elodie.lefevre@sdis13.fr"),
            &session(),
            TimeDelta::hours(1),
        )
        .unwrap();

    let started = Instant::now();
    let err = mailer.send(&email).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, MailError::Transient(_)), "{err:?}");
    assert!(elapsed >= timeout, "gave up after {elapsed:?}");
    assert!(elapsed < timeout * 4, "took {elapsed:?}");
    drop(listener);
}

#[test]
fn url_forms_are_understood() {
    let plain = SmtpConfig::from_url("smtp://127.0.0.1:2525", sender()).unwrap();
    assert_eq!((plain.tls, plain.port), (SmtpTls::None, 2525));
    let starttls =
        SmtpConfig::from_url("smtp://user:pass@mail.sdis13.fr:587?tls=starttls", sender()).unwrap();
    assert_eq!(starttls.tls, SmtpTls::StartTls);
    assert_eq!(starttls.credentials.unwrap().username, "user");
    let implicit = SmtpConfig::from_url("smtps://mail.sdis13.fr:465", sender()).unwrap();
    assert_eq!((implicit.tls, implicit.port), (SmtpTls::Implicit, 465));
}

// ---------------------------------------------------------------------------------
// The file mailer
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn file_mailer_writes_eml_files_that_sort_by_time() {
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = temp_dir("file-mailer").join("not-yet-created");
    let _cleanup = Cleanup(dir.parent().unwrap().to_owned());
    let mailer = FileMailer::new(&dir, sender()).unwrap();
    let templates = Templates::default();
    let mut sent = Vec::new();
    for (i, lead) in [48, 24, 1].into_iter().enumerate() {
        let email = templates
            .reminder(
                &recipient(&format!("sapeur{i}@sdis83.fr")),
                &session(),
                TimeDelta::hours(lead),
            )
            .unwrap();
        mailer.send(&email).await.unwrap();
        sent.push(email);
    }
    // Concurrent sends never collide.
    let burst: Vec<_> = (0..20).map(|_| mailer.send(&sent[0])).collect();
    for r in futures::future::join_all(burst).await {
        r.unwrap();
    }

    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 23, "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| n.ends_with(".eml") && !n.starts_with('.'))
    );
    names.sort();
    for (name, email) in names.iter().zip(&sent) {
        let raw = std::fs::read(dir.join(name)).unwrap();
        assert_is(&raw, email, &sender());
    }
}
