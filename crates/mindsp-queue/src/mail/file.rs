//! A mailer that drops each e-mail as an `.eml` file, for development and demos.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::Utc;
use lettre::message::Mailbox as LettreMailbox;
use mindsp_core::mail::{Email, MailError, Mailbox, Mailer};
use uuid::Uuid;

use super::{MailConfigError, build_message, sender_mailbox};

/// Writes each e-mail as an RFC 5322 message (`.eml`, openable by any mail client)
/// into a directory, created if missing.
///
/// Files are named `<UTC time to the microsecond>-<UUIDv7>.eml`, e.g.
/// `20260303T130000.123456Z-019cb0f2a5c07a3e8b6d4f1e2a3b4c5d.eml`: they sort by time of
/// sending, and the random part (plus an exclusive create) means two never collide.
/// A file appears whole: it is written under a hidden temporary name, then renamed.
#[derive(Clone)]
pub struct FileMailer {
    dir: PathBuf,
    from: LettreMailbox,
}

impl FileMailer {
    /// A mailer writing into `dir` with `from` as sender. Does not touch the disk yet.
    pub fn new(dir: impl Into<PathBuf>, from: Mailbox) -> Result<Self, MailConfigError> {
        Ok(Self {
            dir: dir.into(),
            from: sender_mailbox(&from)?,
        })
    }

    /// The directory written to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl std::fmt::Debug for FileMailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileMailer")
            .field("dir", &self.dir)
            .field("from", &self.from.to_string())
            .finish()
    }
}

#[async_trait]
impl Mailer for FileMailer {
    async fn send(&self, email: &Email) -> Result<(), MailError> {
        let bytes = build_message(&self.from, email)?.formatted();
        let dir = self.dir.clone();
        let path = tokio::task::spawn_blocking(move || write_eml(&dir, &bytes))
            .await
            .map_err(|e| MailError::Transient(format!("the file writer stopped: {e}")))?
            .map_err(|e| {
                MailError::Transient(format!("cannot write into {}: {e}", self.dir.display()))
            })?;
        tracing::debug!(path = %path.display(), "e-mail written");
        Ok(())
    }
}

fn write_eml(dir: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = format!(
        "{}-{}.eml",
        Utc::now().format("%Y%m%dT%H%M%S%.6fZ"),
        Uuid::now_v7().simple()
    );
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(&name);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if path.exists() {
        let _ = std::fs::remove_file(&tmp);
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{name} already exists"),
        ));
    }
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}
