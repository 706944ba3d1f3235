//! E-mail: adapters for the [`Mailer`] port of `mindsp-core`, French templates, and the
//! `email.send` job that delivers them.
//!
//! E-mail only ever leaves through a job. A caller renders an [`Email`] with
//! [`templates::Templates`], wraps it in an [`EmailJob`] and enqueues
//! [`EmailJob::to_job`]; a worker runs [`SendEmail`] for the kind [`SEND_EMAIL`]. The
//! payload holds the rendered e-mail, so every retry sends exactly the same text even
//! if templates or data changed in between. An SMTP server that is down or answers
//! `4xx` makes the job retry with backoff; a refusal for good (`5xx`, an invalid
//! address) ends it dead at once, visible in monitoring.
//!
//! - [`SmtpMailer`]: SMTP through lettre (plain, STARTTLS or implicit TLS, with rustls).
//! - [`FileMailer`]: one `.eml` file per e-mail in a directory, for development.
//!
//! Delivery is at-least-once like every job: a worker that dies after the server
//! accepted the message but before the job was marked done sends it again. Every
//! attempt of a job carries the same `Message-ID`, made from the job's id, so that such
//! a copy can be recognised by the receiving side.

mod file;
mod smtp;
pub mod templates;

use std::sync::Arc;

use async_trait::async_trait;
use lettre::Message;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox as LettreMailbox, MultiPart};
use mindsp_core::jobs::{Job, NewJob};
use mindsp_core::mail::{Email, MailError, Mailbox, Mailer};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::worker::{Handler, JobError};

pub use file::FileMailer;
pub use smtp::{DEFAULT_SMTP_TIMEOUT, SmtpConfig, SmtpCredentials, SmtpMailer, SmtpTls};

/// The job kind that sends one e-mail.
pub const SEND_EMAIL: &str = "email.send";
/// The queue e-mail jobs wait in, so a slow SMTP server never holds up other work.
pub const EMAIL_QUEUE: &str = "email";
/// Attempts an e-mail job gets: with the worker's backoff, enough to ride out an SMTP
/// server restart or a short outage.
pub const EMAIL_MAX_ATTEMPTS: u32 = 8;

/// Why a mailer could not be set up. Configuration errors never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum MailConfigError {
    /// The SMTP URL or one of its parts is not valid.
    #[error("invalid SMTP URL: {0}")]
    Url(String),
    /// The sender (`From`) address is not valid.
    #[error("invalid sender address {address:?}: {reason}")]
    Sender {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TLS could not be set up for the host.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

/// The payload of a [`SEND_EMAIL`] job: the rendered e-mail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailJob {
    /// What to send.
    pub email: Email,
}

impl EmailJob {
    /// A job payload for `email`.
    pub fn new(email: Email) -> Self {
        Self { email }
    }

    /// The job to enqueue: kind [`SEND_EMAIL`] on [`EMAIL_QUEUE`] with
    /// [`EMAIL_MAX_ATTEMPTS`] attempts, due now and belonging to no tenant. Chain
    /// [`NewJob::tenant`], [`NewJob::run_at`] or [`NewJob::unique`] as needed.
    pub fn to_job(&self) -> NewJob {
        NewJob::new(SEND_EMAIL, self.to_payload())
            .queue(EMAIL_QUEUE)
            .max_attempts(EMAIL_MAX_ATTEMPTS)
    }

    /// The payload as JSON.
    pub fn to_payload(&self) -> serde_json::Value {
        // A struct of strings always serializes; `Value::Null` is never produced.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Reads the payload of `job`.
    pub fn from_job(job: &Job) -> Result<Self, serde_json::Error> {
        Self::deserialize(&job.payload)
    }
}

/// Runs [`SEND_EMAIL`] jobs through a [`Mailer`].
///
/// A payload that does not read as an [`EmailJob`] and a [`MailError::Permanent`] end
/// the job dead ([`JobError::Permanent`]); a [`MailError::Transient`] asks for another
/// attempt ([`JobError::Retry`]).
#[derive(Clone)]
pub struct SendEmail {
    mailer: Arc<dyn Mailer>,
}

impl SendEmail {
    /// A handler sending through `mailer`.
    pub fn new(mailer: Arc<dyn Mailer>) -> Self {
        Self { mailer }
    }
}

impl std::fmt::Debug for SendEmail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendEmail").finish_non_exhaustive()
    }
}

#[async_trait]
impl Handler for SendEmail {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        let payload = EmailJob::from_job(job).map_err(|e| {
            JobError::Permanent(format!(
                "the payload of an {SEND_EMAIL} job is invalid: {e}"
            ))
        })?;
        send_for_job(self.mailer.as_ref(), job, payload.email).await
    }
}

/// Sends `email` as an attempt of `job`, for every handler whose job sends an e-mail:
/// unless the e-mail names its own, the `Message-ID` is made from the job's id, so a
/// retry after an attempt the server accepted but did not confirm (a timeout after the
/// data, a worker that died) sends the same one again. A [`MailError::Permanent`] ends
/// the job ([`JobError::Permanent`]), a [`MailError::Transient`] asks for another
/// attempt ([`JobError::Retry`]).
pub(crate) async fn send_for_job(
    mailer: &dyn Mailer,
    job: &Job,
    mut email: Email,
) -> Result<(), JobError> {
    email
        .message_id
        .get_or_insert_with(|| job.id.0.simple().to_string());
    match mailer.send(&email).await {
        Ok(()) => {
            tracing::debug!(job = %job.id, attempt = job.attempts, "e-mail handed to the mailer");
            Ok(())
        }
        Err(MailError::Permanent(reason)) => {
            tracing::warn!(job = %job.id, %reason, "e-mail refused for good");
            Err(JobError::Permanent(reason))
        }
        Err(MailError::Transient(reason)) => {
            tracing::info!(job = %job.id, attempt = job.attempts, %reason, "e-mail not sent, temporary failure");
            Err(JobError::Retry(reason))
        }
    }
}

/// Replaces control characters (line breaks above all, which could inject headers) by
/// spaces and trims.
fn header_text(value: &str) -> String {
    let cleaned: String = value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    cleaned.trim().to_owned()
}

/// Parses a sender address given in configuration.
fn sender_mailbox(from: &Mailbox) -> Result<LettreMailbox, MailConfigError> {
    lettre_mailbox(from).map_err(|reason| MailConfigError::Sender {
        address: from.address.clone(),
        reason,
    })
}

fn lettre_mailbox(mailbox: &Mailbox) -> Result<LettreMailbox, String> {
    let address = mailbox
        .address
        .trim()
        .parse::<lettre::Address>()
        .map_err(|e| e.to_string())?;
    let name = mailbox
        .name
        .as_deref()
        .map(header_text)
        .filter(|n| !n.is_empty());
    Ok(LettreMailbox::new(name, address))
}

/// Whether `id` may be the left part of a Message-ID as [`Email::message_id`] says.
fn valid_message_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && !id.starts_with('.')
        && !id.ends_with('.')
        && !id.contains("..")
}

/// Builds the RFC 5322 message for `email` from `from`: `multipart/alternative` with
/// the text and HTML parts when there is HTML, plain text otherwise; UTF-8 throughout
/// (lettre encodes headers as encoded-words and picks the body transfer encoding).
fn build_message(from: &LettreMailbox, email: &Email) -> Result<Message, MailError> {
    let to = lettre_mailbox(&email.to).map_err(|reason| {
        MailError::Permanent(format!(
            "invalid recipient {:?}: {reason}",
            email.to.address
        ))
    })?;
    let left = match &email.message_id {
        Some(id) if valid_message_id(id) => id.clone(),
        Some(id) => {
            return Err(MailError::Permanent(format!(
                "invalid Message-ID part {id:?}"
            )));
        }
        None => Uuid::new_v4().simple().to_string(),
    };
    let builder = Message::builder()
        .from(from.clone())
        .to(to)
        .subject(header_text(&email.subject))
        .message_id(Some(format!("<{left}@{}>", from.email.domain())));
    let built = match &email.html {
        Some(html) => builder.multipart(MultiPart::alternative_plain_html(
            email.text.clone(),
            html.clone(),
        )),
        None => builder
            .header(ContentType::TEXT_PLAIN)
            .body(email.text.clone()),
    };
    built.map_err(|e| MailError::Permanent(format!("cannot build the message: {e}")))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use mindsp_core::jobs::JobState;
    use mindsp_core::{JobId, TenantId};

    use super::*;

    fn email() -> Email {
        Email {
            to: Mailbox {
                name: Some("Sergent Élodie Martin".into()),
                address: "elodie.martin@sdis13.fr".into(),
            },
            subject: "Rappel : FMPA « Secours routier » dans 24 heures".into(),
            text: "Bonjour,\nLa séance commence à 14 h 00.".into(),
            html: Some("<p>Bonjour,</p><p>La séance commence à 14 h 00.</p>".into()),
            message_id: None,
        }
    }

    /// A sender without a display name, at sdis83.fr.
    fn sender_83() -> LettreMailbox {
        sender_mailbox(&Mailbox {
            name: None,
            address: "mindsp@sdis83.fr".into(),
        })
        .unwrap()
    }

    fn job_of(new: &NewJob) -> Job {
        let now = chrono::Utc::now();
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

    /// Answers with the next scripted result and records what it was given.
    struct Scripted {
        answers: Mutex<Vec<Result<(), MailError>>>,
        sent: Mutex<Vec<Email>>,
    }

    impl Scripted {
        fn new(answers: Vec<Result<(), MailError>>) -> Arc<Self> {
            Arc::new(Self {
                answers: Mutex::new(answers),
                sent: Mutex::new(Vec::new()),
            })
        }
    }

    #[async_trait]
    impl Mailer for Scripted {
        async fn send(&self, email: &Email) -> Result<(), MailError> {
            self.sent.lock().unwrap().push(email.clone());
            self.answers.lock().unwrap().remove(0)
        }
    }

    #[test]
    fn email_job_builds_a_valid_new_job() {
        let tenant = TenantId::new();
        let job = EmailJob::new(email()).to_job().tenant(tenant);
        assert_eq!(job.kind, SEND_EMAIL);
        assert_eq!(job.queue, EMAIL_QUEUE);
        assert_eq!(job.max_attempts, EMAIL_MAX_ATTEMPTS);
        assert_eq!(job.tenant, Some(tenant));
        assert!(job.run_at.is_none());
        job.validate().unwrap();
        let back = EmailJob::from_job(&job_of(&job)).unwrap();
        assert_eq!(back.email, email());
    }

    #[tokio::test]
    async fn handler_maps_mail_errors_to_job_errors() {
        let mailer = Scripted::new(vec![
            Ok(()),
            Err(MailError::Transient("421 busy".into())),
            Err(MailError::Permanent("550 no such user".into())),
        ]);
        let handler = SendEmail::new(mailer.clone());
        let job = job_of(&EmailJob::new(email()).to_job());
        handler.run(&job).await.unwrap();
        assert!(matches!(handler.run(&job).await, Err(JobError::Retry(m)) if m == "421 busy"));
        assert!(
            matches!(handler.run(&job).await, Err(JobError::Permanent(m)) if m == "550 no such user")
        );
        let sent = mailer.sent.lock().unwrap();
        assert_eq!(sent.len(), 3);
        let expected = Email {
            message_id: Some(job.id.0.simple().to_string()),
            ..email()
        };
        assert!(
            sent.iter().all(|e| *e == expected),
            "every attempt sends the same mail, Message-ID included: {sent:?}"
        );
    }

    #[test]
    fn a_given_message_id_is_kept_and_an_unsafe_one_refused() {
        let from = sender_83();
        let mut mail = email();
        mail.message_id = Some("0193a7c2.rappel-fmpa_42".into());
        let raw = String::from_utf8(build_message(&from, &mail).unwrap().formatted()).unwrap();
        assert!(
            raw.contains("Message-ID: <0193a7c2.rappel-fmpa_42@sdis83.fr>"),
            "{raw}"
        );
        for bad in [
            "",
            "a@b",
            "a>\r\nBcc: x",
            "a b",
            ".a",
            "a..b",
            &"x".repeat(65),
        ] {
            mail.message_id = Some(bad.into());
            assert!(
                matches!(build_message(&from, &mail), Err(MailError::Permanent(_))),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn undecodable_payload_is_permanent_and_sends_nothing() {
        let mailer = Scripted::new(vec![]);
        let handler = SendEmail::new(mailer.clone());
        for payload in [
            serde_json::json!({}),
            serde_json::json!({"email": {"to": "martin@sdis13.fr"}}),
            serde_json::json!("email"),
        ] {
            let job = job_of(&NewJob::new(SEND_EMAIL, payload));
            assert!(matches!(
                handler.run(&job).await,
                Err(JobError::Permanent(_))
            ));
        }
        assert!(mailer.sent.lock().unwrap().is_empty());
    }

    #[test]
    fn message_is_multipart_alternative_with_encoded_subject() {
        let from = sender_mailbox(&Mailbox {
            name: Some("MindSP SDIS 13".into()),
            address: "ne-pas-repondre@sdis13.fr".into(),
        })
        .unwrap();
        let raw = String::from_utf8(build_message(&from, &email()).unwrap().formatted()).unwrap();
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("text/plain; charset=utf-8"), "{raw}");
        assert!(raw.contains("text/html; charset=utf-8"), "{raw}");
        assert!(raw.contains("Subject: Rappel : FMPA =?utf-8?"), "{raw}");
        assert!(raw.contains("Message-ID: <"), "{raw}");
        assert!(raw.contains("@sdis13.fr>"), "{raw}");
        assert!(raw.is_ascii(), "every header and part is encoded");
    }

    #[test]
    fn text_only_email_is_a_single_text_part() {
        let from = sender_83();
        let mut mail = email();
        mail.html = None;
        let raw = String::from_utf8(build_message(&from, &mail).unwrap().formatted()).unwrap();
        assert!(!raw.contains("multipart"), "{raw}");
        assert!(
            raw.contains("Content-Type: text/plain; charset=utf-8"),
            "{raw}"
        );
    }

    #[test]
    fn line_breaks_in_headers_cannot_inject() {
        let from = sender_83();
        let mut mail = email();
        mail.subject = "Salut\r\nBcc: victime@example.com".into();
        mail.to.name = Some("Martin\r\nBcc: autre@example.com".into());
        let raw = String::from_utf8(build_message(&from, &mail).unwrap().formatted()).unwrap();
        assert!(!raw.contains("\r\nBcc:"), "{raw}");
    }

    #[test]
    fn invalid_addresses_are_refused() {
        let from = sender_83();
        let mut mail = email();
        mail.to.address = "pas une adresse".into();
        assert!(matches!(
            build_message(&from, &mail),
            Err(MailError::Permanent(_))
        ));
        assert!(matches!(
            sender_mailbox(&Mailbox {
                name: None,
                address: "@sdis83".into()
            }),
            Err(MailConfigError::Sender { .. })
        ));
    }
}
