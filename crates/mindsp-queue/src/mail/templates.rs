//! The e-mails MindSP sends, in French: training-session invitation, reminder and
//! cancellation, and the digest of unread messages.
//!
//! Each produces an [`Email`] with a subject, a plain-text part and an HTML part. The
//! templates live in `templates/mail/` of this crate and are compiled in by askama;
//! every value put into the HTML part is escaped by askama's HTML escaper (the `.txt`
//! templates are not escaped: plain text has nothing to escape). Links are only made
//! clickable when they are `http` or `https`.
//!
//! Dates are rendered in the time zone of [`Templates`] — Europe/Paris by default,
//! daylight saving included — in the French style « mardi 3 mars, 14 h 00 ». An SDIS
//! overseas (La Réunion, the Antilles, …) uses [`Templates::new`] with its own zone.

use askama::Template;
use chrono::{DateTime, Datelike, TimeDelta, Timelike, Utc};
use chrono_tz::Tz;
use mindsp_core::mail::{Email, Mailbox};

/// At most this many conversations are listed in a digest; the rest are counted.
pub const DIGEST_MAX_CONVERSATIONS: usize = 10;
/// At most this many excerpts are shown per conversation (the most recent ones).
pub const DIGEST_MAX_EXCERPTS: usize = 3;
/// An excerpt longer than this many characters is cut, with an ellipsis.
pub const EXCERPT_MAX_CHARS: usize = 200;

/// A training session, as the e-mails about it show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingSession {
    /// What is practised, e.g. « Secours routier et désincarcération ».
    pub title: String,
    /// The kind of training, e.g. `FMPA` (spelled out in the e-mails).
    pub kind: String,
    /// Start.
    pub starts_at: DateTime<Utc>,
    /// End.
    pub ends_at: DateTime<Utc>,
    /// Where, e.g. « CIS Aix-en-Provence, plateau technique ».
    pub location: String,
    /// Who organises it, e.g. « Lieutenant Dubois ».
    pub organiser: String,
    /// The session's page, where the recipient answers présent / absent.
    pub url: String,
}

/// Unread messages to summarise in a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadDigest {
    /// Conversations with unread messages, the most important first.
    pub conversations: Vec<DigestConversation>,
    /// Where to read them.
    pub url: String,
}

/// One conversation of a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestConversation {
    /// Its name, e.g. « Garde CS Marseille-Nord » or the other person's name.
    pub title: String,
    /// How many messages are unread in it.
    pub unread: u32,
    /// Some unread messages, oldest first; only the last [`DIGEST_MAX_EXCERPTS`] are shown.
    pub excerpts: Vec<DigestExcerpt>,
}

/// One message quoted in a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestExcerpt {
    /// Who wrote it.
    pub author: String,
    /// When it was sent.
    pub sent_at: DateTime<Utc>,
    /// Its text; cut to [`EXCERPT_MAX_CHARS`] characters, line breaks become spaces.
    pub text: String,
}

/// A template failed to render.
#[derive(Debug, thiserror::Error)]
#[error("cannot render the {template} e-mail: {reason}")]
pub struct TemplateError {
    template: &'static str,
    reason: String,
}

/// Renders the e-mails, with dates in one time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Templates {
    time_zone: Tz,
}

impl Default for Templates {
    /// Europe/Paris.
    fn default() -> Self {
        Self::new(chrono_tz::Europe::Paris)
    }
}

impl Templates {
    /// Templates rendering dates in `time_zone`.
    pub fn new(time_zone: Tz) -> Self {
        Self { time_zone }
    }

    /// The time zone dates are rendered in.
    pub fn time_zone(&self) -> Tz {
        self.time_zone
    }

    /// The invitation to a session, asking for présent / absent.
    pub fn invitation(
        &self,
        to: &Mailbox,
        session: &TrainingSession,
    ) -> Result<Email, TemplateError> {
        let mut s = self.session_view(to, session);
        s.subject = format!(
            "Invitation : {} « {} », {}",
            s.kind,
            s.title,
            self.format_datetime(session.starts_at)
        );
        email(
            "invitation",
            to,
            &s.subject,
            InvitationText { s: &s },
            InvitationHtml {
                subject: &s.subject,
                s: &s,
            },
        )
    }

    /// The reminder sent `lead` before the session starts (« dans 24 heures »).
    pub fn reminder(
        &self,
        to: &Mailbox,
        session: &TrainingSession,
        lead: TimeDelta,
    ) -> Result<Email, TemplateError> {
        let mut s = self.session_view(to, session);
        s.lead = format_lead(lead);
        s.subject = format!("Rappel : {} « {} » {}", s.kind, s.title, s.lead);
        email(
            "reminder",
            to,
            &s.subject,
            ReminderText { s: &s },
            ReminderHtml {
                subject: &s.subject,
                s: &s,
            },
        )
    }

    /// The notice that a session is cancelled, with the reason if given.
    pub fn cancellation(
        &self,
        to: &Mailbox,
        session: &TrainingSession,
        reason: Option<&str>,
    ) -> Result<Email, TemplateError> {
        let mut s = self.session_view(to, session);
        s.reason = reason.map(one_line).filter(|r| !r.is_empty());
        s.subject = format!(
            "Annulation : {} « {} » du {}",
            s.kind,
            s.title,
            self.format_day(session.starts_at)
        );
        email(
            "cancellation",
            to,
            &s.subject,
            CancellationText { s: &s },
            CancellationHtml {
                subject: &s.subject,
                s: &s,
            },
        )
    }

    /// The digest of unread messages: counts per conversation, a few excerpts, a link.
    pub fn unread_digest(
        &self,
        to: &Mailbox,
        digest: &UnreadDigest,
    ) -> Result<Email, TemplateError> {
        let total: u64 = digest
            .conversations
            .iter()
            .map(|c| u64::from(c.unread))
            .sum();
        let count = digest.conversations.len();
        let shown = count.min(DIGEST_MAX_CONVERSATIONS);
        let d = DigestView {
            subject: format!(
                "{} dans {}",
                plural(total, "message non lu", "messages non lus"),
                plural(count as u64, "conversation", "conversations")
            ),
            greeting: greeting(to),
            total_label: plural(total, "message non lu", "messages non lus"),
            conversations_label: plural(count as u64, "conversation", "conversations"),
            conversations: digest.conversations[..shown]
                .iter()
                .map(|c| ConversationView {
                    title: one_line(&c.title),
                    unread_label: plural(u64::from(c.unread), "non lu", "non lus"),
                    excerpts: c.excerpts[c.excerpts.len().saturating_sub(DIGEST_MAX_EXCERPTS)..]
                        .iter()
                        .map(|e| ExcerptView {
                            author: one_line(&e.author),
                            when: self.format_datetime(e.sent_at),
                            text: excerpt(&e.text),
                        })
                        .collect(),
                })
                .collect(),
            hidden_label: (count > shown).then(|| {
                let hidden = (count - shown) as u64;
                plural(hidden, "autre conversation", "autres conversations")
            }),
            url: digest.url.clone(),
            href: http_link(&digest.url),
        };
        email(
            "digest",
            to,
            &d.subject,
            DigestText { d: &d },
            DigestHtml {
                subject: &d.subject,
                d: &d,
            },
        )
    }

    /// Any other notification: its title (the subject), its text and a link.
    pub fn notification(
        &self,
        to: &Mailbox,
        title: &str,
        body: &str,
        url: &str,
    ) -> Result<Email, TemplateError> {
        let n = NotificationView {
            greeting: greeting(to),
            title: one_line(title),
            body: body.trim().to_owned(),
            url: url.to_owned(),
            href: http_link(url),
        };
        email(
            "notification",
            to,
            &n.title,
            NotificationText { n: &n },
            NotificationHtml {
                subject: &n.title,
                n: &n,
            },
        )
    }

    /// « mardi 3 mars, 14 h 00 » in the templates' zone.
    pub fn format_datetime(&self, at: DateTime<Utc>) -> String {
        let local = at.with_timezone(&self.time_zone);
        format!("{}, {}", day_of(&local), time_of(&local))
    }

    /// « mardi 3 mars » in the templates' zone.
    pub fn format_day(&self, at: DateTime<Utc>) -> String {
        day_of(&at.with_timezone(&self.time_zone))
    }

    /// « mardi 3 mars, de 14 h 00 à 17 h 00 » on one day, « du mardi 3 mars, 14 h 00
    /// au mercredi 4 mars, 12 h 00 » across days, the start alone if `end` is not
    /// after `start`.
    pub fn format_range(&self, start: DateTime<Utc>, end: DateTime<Utc>) -> String {
        if end <= start {
            return self.format_datetime(start);
        }
        let (s, e) = (
            start.with_timezone(&self.time_zone),
            end.with_timezone(&self.time_zone),
        );
        if s.date_naive() == e.date_naive() {
            format!("{}, de {} à {}", day_of(&s), time_of(&s), time_of(&e))
        } else {
            format!(
                "du {}, {} au {}, {}",
                day_of(&s),
                time_of(&s),
                day_of(&e),
                time_of(&e)
            )
        }
    }

    fn session_view(&self, to: &Mailbox, session: &TrainingSession) -> SessionView {
        let kind = one_line(&session.kind);
        let kind_label = if kind.eq_ignore_ascii_case("FMPA") {
            format!("{kind} (formation de maintien et de perfectionnement des acquis)")
        } else {
            kind.clone()
        };
        SessionView {
            subject: String::new(),
            greeting: greeting(to),
            kind,
            kind_label,
            title: one_line(&session.title),
            when: self.format_range(session.starts_at, session.ends_at),
            location: one_line(&session.location),
            organiser: one_line(&session.organiser),
            url: session.url.clone(),
            href: http_link(&session.url),
            lead: String::new(),
            reason: None,
        }
    }
}

/// « dans 24 heures », « dans 1 heure », « dans 2 jours », « dans 1 h 30 »,
/// « dans 15 minutes », to the nearest minute.
pub fn format_lead(lead: TimeDelta) -> String {
    let minutes = (lead.num_seconds().max(0) + 30) / 60;
    if minutes == 0 {
        return "dans moins d'une minute".to_owned();
    }
    if minutes < 60 {
        return format!("dans {}", plural(minutes as u64, "minute", "minutes"));
    }
    let (hours, rest) = (minutes / 60, minutes % 60);
    if rest != 0 {
        return format!("dans {hours} h {rest:02}");
    }
    if hours >= 48 && hours % 24 == 0 {
        return format!("dans {} jours", hours / 24);
    }
    format!("dans {}", plural(hours as u64, "heure", "heures"))
}

const DAYS: [&str; 7] = [
    "lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche",
];
const MONTHS: [&str; 12] = [
    "janvier",
    "février",
    "mars",
    "avril",
    "mai",
    "juin",
    "juillet",
    "août",
    "septembre",
    "octobre",
    "novembre",
    "décembre",
];

fn day_of(local: &DateTime<Tz>) -> String {
    let day = local.day();
    format!(
        "{} {}{} {}",
        DAYS[local.weekday().num_days_from_monday() as usize],
        day,
        if day == 1 { "er" } else { "" },
        MONTHS[local.month0() as usize]
    )
}

fn time_of(local: &DateTime<Tz>) -> String {
    format!("{} h {:02}", local.hour(), local.minute())
}

/// « 1 message non lu », « 0 message non lu », « 3 messages non lus ».
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n < 2 { one } else { many })
}

fn greeting(to: &Mailbox) -> String {
    match to.name.as_deref().map(one_line) {
        Some(name) if !name.is_empty() => format!("Bonjour {name},"),
        _ => "Bonjour,".to_owned(),
    }
}

/// Collapses every run of whitespace (line breaks included) into one space.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn excerpt(text: &str) -> String {
    let text = one_line(text);
    if text.chars().count() <= EXCERPT_MAX_CHARS {
        return text;
    }
    let mut cut: String = text.chars().take(EXCERPT_MAX_CHARS - 1).collect();
    cut.truncate(cut.trim_end().len());
    cut.push('…');
    cut
}

/// The URL if it is `http(s)`, so it can be a clickable link; empty otherwise.
fn http_link(url: &str) -> String {
    let url = url.trim();
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("https://") || lower.starts_with("http://") {
        url.to_owned()
    } else {
        String::new()
    }
}

fn email(
    template: &'static str,
    to: &Mailbox,
    subject: &str,
    text: impl Template,
    html: impl Template,
) -> Result<Email, TemplateError> {
    let fail = |e: askama::Error| TemplateError {
        template,
        reason: e.to_string(),
    };
    Ok(Email {
        to: to.clone(),
        subject: subject.to_owned(),
        text: text.render().map_err(fail)?,
        html: Some(html.render().map_err(fail)?),
        message_id: None,
    })
}

/// What the session templates show; every field is already on one line.
struct SessionView {
    subject: String,
    greeting: String,
    kind: String,
    kind_label: String,
    title: String,
    when: String,
    location: String,
    organiser: String,
    url: String,
    /// `url` if it may be a link, else empty.
    href: String,
    lead: String,
    reason: Option<String>,
}

struct DigestView {
    subject: String,
    greeting: String,
    total_label: String,
    conversations_label: String,
    conversations: Vec<ConversationView>,
    hidden_label: Option<String>,
    url: String,
    href: String,
}

struct ConversationView {
    title: String,
    unread_label: String,
    excerpts: Vec<ExcerptView>,
}

struct ExcerptView {
    author: String,
    when: String,
    text: String,
}

#[derive(Template)]
#[template(path = "mail/invitation.txt")]
struct InvitationText<'a> {
    s: &'a SessionView,
}

#[derive(Template)]
#[template(path = "mail/invitation.html")]
struct InvitationHtml<'a> {
    subject: &'a str,
    s: &'a SessionView,
}

#[derive(Template)]
#[template(path = "mail/reminder.txt")]
struct ReminderText<'a> {
    s: &'a SessionView,
}

#[derive(Template)]
#[template(path = "mail/reminder.html")]
struct ReminderHtml<'a> {
    subject: &'a str,
    s: &'a SessionView,
}

#[derive(Template)]
#[template(path = "mail/cancellation.txt")]
struct CancellationText<'a> {
    s: &'a SessionView,
}

#[derive(Template)]
#[template(path = "mail/cancellation.html")]
struct CancellationHtml<'a> {
    subject: &'a str,
    s: &'a SessionView,
}

#[derive(Template)]
#[template(path = "mail/digest.txt")]
struct DigestText<'a> {
    d: &'a DigestView,
}

#[derive(Template)]
#[template(path = "mail/digest.html")]
struct DigestHtml<'a> {
    subject: &'a str,
    d: &'a DigestView,
}

struct NotificationView {
    greeting: String,
    title: String,
    body: String,
    url: String,
    href: String,
}

#[derive(Template)]
#[template(path = "mail/notification.txt")]
struct NotificationText<'a> {
    n: &'a NotificationView,
}

#[derive(Template)]
#[template(path = "mail/notification.html")]
struct NotificationHtml<'a> {
    subject: &'a str,
    n: &'a NotificationView,
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn to() -> Mailbox {
        Mailbox {
            name: Some("Sergent Élodie Martin".into()),
            address: "elodie.martin@sdis13.fr".into(),
        }
    }

    fn session() -> TrainingSession {
        TrainingSession {
            title: "Secours routier et désincarcération".into(),
            kind: "FMPA".into(),
            // 14 h 00 – 17 h 00 in Paris (CET, UTC+1).
            starts_at: at(2026, 3, 3, 13, 0),
            ends_at: at(2026, 3, 3, 16, 0),
            location: "CIS Aix-en-Provence, plateau technique".into(),
            organiser: "Lieutenant Dubois".into(),
            url: "https://mindsp.sdis13.fr/formations/42".into(),
        }
    }

    #[test]
    fn dates_are_french_in_paris_time_with_daylight_saving() {
        let t = Templates::default();
        // Winter (UTC+1) and summer (UTC+2) around the switch of 29 March 2026.
        assert_eq!(
            t.format_datetime(at(2026, 3, 28, 13, 0)),
            "samedi 28 mars, 14 h 00"
        );
        assert_eq!(
            t.format_datetime(at(2026, 3, 30, 12, 0)),
            "lundi 30 mars, 14 h 00"
        );
        // Late evening UTC is already the next day in Paris; « 1er ».
        assert_eq!(
            t.format_datetime(at(2026, 7, 31, 22, 30)),
            "samedi 1er août, 0 h 30"
        );
        assert_eq!(
            t.format_range(at(2026, 3, 3, 13, 0), at(2026, 3, 3, 16, 30)),
            "mardi 3 mars, de 14 h 00 à 17 h 30"
        );
        assert_eq!(
            t.format_range(at(2026, 12, 31, 8, 0), at(2027, 1, 1, 11, 0)),
            "du jeudi 31 décembre, 9 h 00 au vendredi 1er janvier, 12 h 00"
        );
        assert_eq!(
            t.format_range(at(2026, 3, 3, 13, 0), at(2026, 3, 3, 13, 0)),
            "mardi 3 mars, 14 h 00"
        );
        let reunion = Templates::new(chrono_tz::Indian::Reunion);
        assert_eq!(
            reunion.format_datetime(at(2026, 3, 3, 13, 0)),
            "mardi 3 mars, 17 h 00"
        );
    }

    #[test]
    fn leads_read_naturally() {
        assert_eq!(format_lead(TimeDelta::hours(24)), "dans 24 heures");
        assert_eq!(format_lead(TimeDelta::hours(1)), "dans 1 heure");
        assert_eq!(format_lead(TimeDelta::hours(72)), "dans 3 jours");
        assert_eq!(format_lead(TimeDelta::minutes(90)), "dans 1 h 30");
        assert_eq!(format_lead(TimeDelta::minutes(15)), "dans 15 minutes");
        assert_eq!(format_lead(TimeDelta::minutes(1)), "dans 1 minute");
        assert_eq!(
            format_lead(TimeDelta::seconds(10)),
            "dans moins d'une minute"
        );
        assert_eq!(
            format_lead(TimeDelta::seconds(-5)),
            "dans moins d'une minute"
        );
    }

    #[test]
    fn invitation_has_subject_text_and_html() {
        let mail = Templates::default().invitation(&to(), &session()).unwrap();
        assert_eq!(mail.to, to());
        assert_eq!(
            mail.subject,
            "Invitation : FMPA « Secours routier et désincarcération », mardi 3 mars, 14 h 00"
        );
        let html = mail.html.as_deref().unwrap();
        for part in [mail.text.as_str(), html] {
            assert!(part.contains("Bonjour Sergent Élodie Martin,"), "{part}");
            assert!(
                part.contains("formation de maintien et de perfectionnement des acquis"),
                "{part}"
            );
            assert!(
                part.contains("mardi 3 mars, de 14 h 00 à 17 h 00"),
                "{part}"
            );
            assert!(
                part.contains("CIS Aix-en-Provence, plateau technique"),
                "{part}"
            );
            assert!(part.contains("Lieutenant Dubois"), "{part}");
            assert!(part.contains("présent ou absent"), "{part}");
            assert!(
                part.contains("https://mindsp.sdis13.fr/formations/42"),
                "{part}"
            );
        }
        assert!(html.contains("<a href=\"https://mindsp.sdis13.fr/formations/42\""));
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(!mail.text.contains('<'), "{}", mail.text);
    }

    #[test]
    fn reminder_and_cancellation() {
        let t = Templates::default();
        let mail = t.reminder(&to(), &session(), TimeDelta::hours(24)).unwrap();
        assert_eq!(
            mail.subject,
            "Rappel : FMPA « Secours routier et désincarcération » dans 24 heures"
        );
        assert!(
            mail.text.contains("commence dans 24 heures."),
            "{}",
            mail.text
        );
        let mail = t.reminder(&to(), &session(), TimeDelta::hours(1)).unwrap();
        assert!(mail.subject.ends_with("dans 1 heure"));
        assert!(mail.html.unwrap().contains("<strong>dans 1 heure</strong>"));

        let mail = t
            .cancellation(&to(), &session(), Some("Alerte météo\nrouge"))
            .unwrap();
        assert_eq!(
            mail.subject,
            "Annulation : FMPA « Secours routier et désincarcération » du mardi 3 mars"
        );
        assert!(mail.text.contains("est annulée"), "{}", mail.text);
        assert!(
            mail.text.contains("Motif : Alerte météo rouge"),
            "{}",
            mail.text
        );
        assert!(mail.html.unwrap().contains("Alerte météo rouge"));
        let mail = t.cancellation(&to(), &session(), None).unwrap();
        assert!(!mail.text.contains("Motif"), "{}", mail.text);
    }

    #[test]
    fn script_in_a_title_is_escaped_in_html_and_intact_in_text() {
        let mut s = session();
        s.title = "<script>alert('x')</script> & \"co\"".into();
        s.organiser = "<b>Dubois</b>".into();
        s.url = "javascript:alert(1)".into();
        let mut who = to();
        who.name = Some("<img src=x onerror=alert(1)>".into());
        let t = Templates::default();
        for mail in [
            t.invitation(&who, &s).unwrap(),
            t.reminder(&who, &s, TimeDelta::hours(1)).unwrap(),
            t.cancellation(&who, &s, Some("<i>météo</i>")).unwrap(),
        ] {
            let html = mail.html.unwrap();
            assert!(!html.contains("<script>"), "{html}");
            assert!(!html.contains("<b>Dubois"), "{html}");
            assert!(!html.contains("<img"), "{html}");
            assert!(!html.contains("<i>"), "{html}");
            assert!(!html.contains("href=\"javascript"), "{html}");
            assert!(!html.contains("'x'"), "{html}");
            assert!(
                html.contains("script&#62;") || html.contains("script&gt;"),
                "{html}"
            );
            assert!(mail.text.contains("<script>alert('x')</script> & \"co\""));
            assert!(mail.subject.contains("<script>alert('x')</script>"));
        }
    }

    #[test]
    fn digest_counts_excerpts_and_escapes() {
        let excerpt = |author: &str, text: &str| DigestExcerpt {
            author: author.into(),
            sent_at: at(2026, 3, 3, 7, 5),
            text: text.into(),
        };
        let mut conversations = vec![
            DigestConversation {
                title: "Garde CS Marseille-Nord".into(),
                unread: 5,
                excerpts: vec![
                    excerpt("Caporal Roux", "premier, trop ancien pour être montré"),
                    excerpt("Caporal Roux", "VSAV 2 indisponible jusqu'à midi."),
                    excerpt("Adjudant Petit", "Relève à 19 h, merci d'être à l'heure."),
                    excerpt("Sapeur <Léa>", &format!("{}\nfin", "é".repeat(300))),
                ],
            },
            DigestConversation {
                title: "Capitaine Morel".into(),
                unread: 1,
                excerpts: vec![excerpt("Capitaine Morel", "Pouvez-vous me rappeler ?")],
            },
        ];
        for i in 0..10 {
            conversations.push(DigestConversation {
                title: format!("Groupe {i}"),
                unread: 1,
                excerpts: vec![],
            });
        }
        let digest = UnreadDigest {
            conversations,
            url: "https://mindsp.sdis13.fr/messages".into(),
        };
        let mail = Templates::default().unread_digest(&to(), &digest).unwrap();
        assert_eq!(mail.subject, "16 messages non lus dans 12 conversations");
        let html = mail.html.unwrap();
        for part in [mail.text.as_str(), html.as_str()] {
            assert!(part.contains("Garde CS Marseille-Nord"), "{part}");
            assert!(part.contains("5 non lus"), "{part}");
            assert!(part.contains("1 non lu"), "{part}");
            assert!(part.contains("mardi 3 mars, 8 h 05"), "{part}");
            assert!(part.contains("VSAV 2 indisponible"), "{part}");
            assert!(!part.contains("trop ancien"), "{part}");
            assert!(part.contains("Groupe 7"), "{part}");
            assert!(!part.contains("Groupe 8"), "{part}");
            assert!(part.contains("et 2 autres conversations"), "{part}");
            assert!(part.contains(&format!("{}…", "é".repeat(199))), "{part}");
        }
        assert!(mail.text.contains("Sapeur <Léa>"));
        assert!(!html.contains("<Léa>"), "{html}");
        assert!(html.contains("href=\"https://mindsp.sdis13.fr/messages\""));

        let one = UnreadDigest {
            conversations: vec![DigestConversation {
                title: "Capitaine Morel".into(),
                unread: 1,
                excerpts: vec![],
            }],
            url: "https://mindsp.sdis13.fr/messages".into(),
        };
        let mail = Templates::default().unread_digest(&to(), &one).unwrap();
        assert_eq!(mail.subject, "1 message non lu dans 1 conversation");
        assert!(!mail.text.contains("autre"), "{}", mail.text);
    }
}
