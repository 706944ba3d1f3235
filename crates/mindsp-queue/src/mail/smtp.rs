//! SMTP delivery through lettre (tokio, rustls with the Mozilla root certificates).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use lettre::message::Mailbox as LettreMailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use mindsp_core::mail::{Email, MailError, Mailbox, Mailer};

use super::{MailConfigError, build_message, sender_mailbox};

/// How long one send may take, from connecting to the server's last reply, unless
/// configured otherwise.
pub const DEFAULT_SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// How the connection to the SMTP server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SmtpTls {
    /// Plain text, never encrypted: only for a relay on loopback or a trusted network.
    None,
    /// Plain connection upgraded with STARTTLS, which the server must offer (usually
    /// port 587). Nothing is sent unencrypted.
    #[default]
    StartTls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Implicit,
}

impl SmtpTls {
    /// The port conventionally used with this mode: 25, 587 or 465.
    pub fn default_port(self) -> u16 {
        match self {
            SmtpTls::None => 25,
            SmtpTls::StartTls => 587,
            SmtpTls::Implicit => 465,
        }
    }

    /// The name used in URLs: `none`, `starttls` or `implicit`.
    pub fn as_str(self) -> &'static str {
        match self {
            SmtpTls::None => "none",
            SmtpTls::StartTls => "starttls",
            SmtpTls::Implicit => "implicit",
        }
    }
}

impl FromStr for SmtpTls {
    type Err = MailConfigError;

    /// Reads `none`, `starttls` (or lettre's `required`) and `implicit` (or `tls`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(SmtpTls::None),
            "starttls" | "required" => Ok(SmtpTls::StartTls),
            "implicit" | "tls" => Ok(SmtpTls::Implicit),
            other => Err(MailConfigError::Url(format!(
                "unknown TLS mode {other:?} (expected none, starttls or implicit)"
            ))),
        }
    }
}

/// A user name and password for SMTP AUTH. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpCredentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for SmtpCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where and how to send e-mail over SMTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    /// Server host name or IP address.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Connection protection.
    pub tls: SmtpTls,
    /// Credentials for SMTP AUTH, if the server asks for them.
    pub credentials: Option<SmtpCredentials>,
    /// Longest time one send may take, from connecting to the server's last reply.
    pub timeout: Duration,
    /// The sender, used for `From` and the envelope.
    pub from: Mailbox,
    /// The name given in `EHLO`; unset, lettre gives the address literal `[127.0.0.1]`.
    pub hello_name: Option<String>,
}

impl SmtpConfig {
    /// STARTTLS on port 587, no credentials, [`DEFAULT_SMTP_TIMEOUT`].
    pub fn new(host: impl Into<String>, from: Mailbox) -> Self {
        Self {
            host: host.into(),
            port: SmtpTls::StartTls.default_port(),
            tls: SmtpTls::StartTls,
            credentials: None,
            timeout: DEFAULT_SMTP_TIMEOUT,
            from,
            hello_name: None,
        }
    }

    /// Reads a URL `scheme://[user:password@]host[:port][/ehlo-name][?tls=..&timeout=..]`:
    ///
    /// | URL | protection | default port |
    /// |---|---|---|
    /// | `smtp://host` or `smtp://host?tls=none` | none | 25 |
    /// | `smtp://host?tls=starttls` (or `tls=required`) | STARTTLS required | 587 |
    /// | `smtps://host` | implicit TLS | 465 |
    ///
    /// User name and password are percent-decoded; `timeout` is in seconds. Any other
    /// query parameter, or `tls=opportunistic` (open to downgrade), is refused.
    ///
    /// lettre's own `AsyncSmtpTransport::from_url` reads a similar syntax, but it knows
    /// neither `tls=starttls` nor a timeout, and it builds a transport whose settings
    /// cannot be read back; this reads into a config that [`SmtpMailer::new`] uses.
    pub fn from_url(url: &str, from: Mailbox) -> Result<Self, MailConfigError> {
        let url = url::Url::parse(url).map_err(|e| MailConfigError::Url(e.to_string()))?;
        let implicit = match url.scheme() {
            "smtp" => false,
            "smtps" => true,
            other => {
                return Err(MailConfigError::Url(format!(
                    "unknown scheme {other:?} (expected smtp or smtps)"
                )));
            }
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) => decode(d, "host")?,
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(MailConfigError::Url("no host".into())),
        };
        if host.is_empty() {
            return Err(MailConfigError::Url("no host".into()));
        }

        let mut tls = None;
        let mut timeout = DEFAULT_SMTP_TIMEOUT;
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "tls" => tls = Some(value.parse::<SmtpTls>()?),
                "timeout" => {
                    let secs = value
                        .parse::<u64>()
                        .ok()
                        .filter(|s| (1..=3600).contains(s))
                        .ok_or_else(|| {
                            MailConfigError::Url(format!(
                                "timeout {value:?} is not a number of seconds from 1 to 3600"
                            ))
                        })?;
                    timeout = Duration::from_secs(secs);
                }
                other => {
                    return Err(MailConfigError::Url(format!(
                        "unknown parameter {other:?} (expected tls or timeout)"
                    )));
                }
            }
        }
        let tls = match (implicit, tls) {
            (true, None | Some(SmtpTls::Implicit)) => SmtpTls::Implicit,
            (true, Some(other)) => {
                return Err(MailConfigError::Url(format!(
                    "smtps always uses implicit TLS, not tls={}",
                    other.as_str()
                )));
            }
            (false, None) => SmtpTls::None,
            (false, Some(mode)) => mode,
        };

        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            ("", Some(_)) => return Err(MailConfigError::Url("password without a user".into())),
            (_, None) => return Err(MailConfigError::Url("user without a password".into())),
            (user, Some(password)) => Some(SmtpCredentials {
                username: decode(user, "user")?,
                password: decode(password, "password")?,
            }),
        };

        let path = url.path().trim_matches('/');
        let hello_name = if path.is_empty() {
            None
        } else {
            Some(decode(path, "EHLO name")?)
        };

        Ok(Self {
            host,
            port: url.port().unwrap_or(tls.default_port()),
            tls,
            credentials,
            timeout,
            from,
            hello_name,
        })
    }
}

fn decode(s: &str, what: &str) -> Result<String, MailConfigError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| MailConfigError::Url(format!("the {what} is not valid UTF-8")))
}

/// Sends e-mail over SMTP, one connection per e-mail.
///
/// Errors: a `5xx` reply and an invalid recipient address are
/// [`MailError::Permanent`]; everything else (connection refused, DNS, TLS, timeout,
/// `4xx`) is [`MailError::Transient`]. A `5xx` to AUTH (wrong password) is permanent
/// too: the jobs end dead, and can be retried once the configuration is fixed.
#[derive(Clone)]
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: LettreMailbox,
    timeout: Duration,
    server: String,
}

impl SmtpMailer {
    /// A mailer for `config`. Fails on an invalid sender address or TLS setup; does not
    /// connect (see [`SmtpMailer::check`]).
    pub fn new(config: SmtpConfig) -> Result<Self, MailConfigError> {
        let from = sender_mailbox(&config.from)?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host)
            .port(config.port)
            .timeout(Some(config.timeout));
        let tls_parameters = || {
            TlsParameters::new(config.host.clone()).map_err(|e| MailConfigError::Tls(e.to_string()))
        };
        builder = builder.tls(match config.tls {
            SmtpTls::None => Tls::None,
            SmtpTls::StartTls => Tls::Required(tls_parameters()?),
            SmtpTls::Implicit => Tls::Wrapper(tls_parameters()?),
        });
        if let Some(c) = &config.credentials {
            builder = builder.credentials(Credentials::new(c.username.clone(), c.password.clone()));
        }
        if let Some(name) = &config.hello_name {
            builder = builder.hello_name(ClientId::Domain(name.clone()));
        }
        let server = if config.host.contains(':') {
            format!("[{}]:{}", config.host, config.port)
        } else {
            format!("{}:{}", config.host, config.port)
        };
        Ok(Self {
            transport: builder.build(),
            from,
            timeout: config.timeout,
            server,
        })
    }

    /// A mailer for a URL (see [`SmtpConfig::from_url`]).
    pub fn from_url(url: &str, from: Mailbox) -> Result<Self, MailConfigError> {
        Self::new(SmtpConfig::from_url(url, from)?)
    }

    /// Connects, greets, authenticates if configured and quits: a start-up check that
    /// the server is reachable and accepts the credentials.
    pub async fn check(&self) -> Result<(), MailError> {
        match tokio::time::timeout(self.timeout, self.transport.test_connection()).await {
            Err(_) => Err(self.timed_out()),
            Ok(Err(e)) => Err(self.classify(&e)),
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(MailError::Transient(format!(
                "SMTP {}: the connection did not answer NOOP",
                self.server
            ))),
        }
    }

    fn timed_out(&self) -> MailError {
        MailError::Transient(format!(
            "SMTP {}: no complete answer within {:?}",
            self.server, self.timeout
        ))
    }

    fn classify(&self, e: &lettre::transport::smtp::Error) -> MailError {
        let text = format!("SMTP {}: {e}", self.server);
        if e.is_permanent() {
            MailError::Permanent(text)
        } else {
            MailError::Transient(text)
        }
    }
}

impl fmt::Debug for SmtpMailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpMailer")
            .field("server", &self.server)
            .field("from", &self.from.to_string())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Mailer for SmtpMailer {
    async fn send(&self, email: &Email) -> Result<(), MailError> {
        let message = build_message(&self.from, email)?;
        // lettre bounds the connection with the timeout but not each reply afterwards;
        // this bounds the whole exchange, so a server that stalls cannot hold a worker.
        match tokio::time::timeout(self.timeout, self.transport.send(message)).await {
            Err(_) => Err(self.timed_out()),
            Ok(Err(e)) => Err(self.classify(&e)),
            Ok(Ok(_response)) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from() -> Mailbox {
        Mailbox {
            name: Some("MindSP SDIS 13".into()),
            address: "ne-pas-repondre@sdis13.fr".into(),
        }
    }

    fn parse(url: &str) -> Result<SmtpConfig, MailConfigError> {
        SmtpConfig::from_url(url, from())
    }

    #[test]
    fn starttls_url_with_credentials() {
        let c =
            parse("smtp://user%40sdis13.fr:p%C3%A0ss%3Aw@mail.sdis13.fr:587?tls=starttls").unwrap();
        assert_eq!(c.host, "mail.sdis13.fr");
        assert_eq!(c.port, 587);
        assert_eq!(c.tls, SmtpTls::StartTls);
        assert_eq!(
            c.credentials,
            Some(SmtpCredentials {
                username: "user@sdis13.fr".into(),
                password: "pàss:w".into()
            })
        );
        assert_eq!(c.timeout, DEFAULT_SMTP_TIMEOUT);
        assert_eq!(c.hello_name, None);
        assert!(
            !format!("{c:?}").contains("pàss"),
            "Debug hides the password"
        );
        // lettre's spelling is accepted too; the default port follows the mode.
        let c = parse("smtp://mail.sdis13.fr?tls=required").unwrap();
        assert_eq!((c.tls, c.port), (SmtpTls::StartTls, 587));
    }

    #[test]
    fn implicit_and_plain_urls() {
        let c = parse("smtps://smtp.sdis83.fr").unwrap();
        assert_eq!(
            (c.tls, c.port, c.credentials),
            (SmtpTls::Implicit, 465, None)
        );
        let c = parse("smtp://127.0.0.1:2525").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.tls),
            ("127.0.0.1", 2525, SmtpTls::None)
        );
        let c = parse("smtp://relay.local").unwrap();
        assert_eq!((c.port, c.tls), (25, SmtpTls::None));
        let c = parse("smtp://[::1]:2525/mindsp.sdis13.fr?tls=none&timeout=5").unwrap();
        assert_eq!(c.host, "::1");
        assert_eq!(c.hello_name.as_deref(), Some("mindsp.sdis13.fr"));
        assert_eq!(c.timeout, Duration::from_secs(5));
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_secrets() {
        for url in [
            "http://mail.sdis13.fr",
            "smtp://",
            "smtp:///nohost",
            "smtp://mail.sdis13.fr?tls=opportunistic",
            "smtp://mail.sdis13.fr?tls=maybe",
            "smtps://mail.sdis13.fr?tls=starttls",
            "smtp://mail.sdis13.fr?timeout=0",
            "smtp://mail.sdis13.fr?timeout=soon",
            "smtp://mail.sdis13.fr?pool=true",
            "smtp://secretuser@mail.sdis13.fr",
            "smtp://:secretpass@mail.sdis13.fr",
            "not a url",
        ] {
            let err = parse(url).expect_err(url);
            let text = err.to_string();
            assert!(!text.contains("secret"), "{url}: {text}");
        }
    }

    #[test]
    fn mailer_needs_a_valid_sender() {
        let mut config = SmtpConfig::new("127.0.0.1", from());
        config.from.address = "not-an-address".into();
        assert!(matches!(
            SmtpMailer::new(config),
            Err(MailConfigError::Sender { .. })
        ));
        let mailer = SmtpMailer::from_url("smtps://smtp.sdis83.fr", from()).unwrap();
        assert!(format!("{mailer:?}").contains("smtp.sdis83.fr:465"));
    }
}
