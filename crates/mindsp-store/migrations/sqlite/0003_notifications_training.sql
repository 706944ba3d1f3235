-- Notifications, their preferences, the unread-message digest and training sessions
-- (FMPA). Times are milliseconds since the Unix epoch, UUIDs 16-byte blobs (so ordering
-- by an id column is UUID order, which for UUIDv7 is creation order).

CREATE TABLE notifications (
    id          BLOB PRIMARY KEY,
    tenant_id   BLOB NOT NULL,
    user_id     BLOB NOT NULL REFERENCES users(id),
    kind        TEXT NOT NULL,
    title       TEXT NOT NULL,
    body        TEXT NOT NULL,
    link        TEXT,
    data        TEXT NOT NULL,  -- JSON
    key         TEXT,           -- deduplication key, per recipient
    created_at  INTEGER NOT NULL,
    read_at     INTEGER
);
-- A recipient holds at most one notification per key.
CREATE UNIQUE INDEX notifications_key ON notifications (tenant_id, user_id, key)
    WHERE key IS NOT NULL;
-- The bell: newest first, and the unread ones alone.
CREATE INDEX notifications_by_user ON notifications (user_id, id);
CREATE INDEX notifications_unread ON notifications (user_id, id) WHERE read_at IS NULL;

-- Unread count per user, kept by the triggers below in the statement that changes a
-- notification, so the count is one row read however many notifications there are.
CREATE TABLE notification_counters (
    user_id    BLOB PRIMARY KEY,
    tenant_id  BLOB NOT NULL,
    unread     INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TRIGGER notifications_after_insert AFTER INSERT ON notifications
WHEN new.read_at IS NULL BEGIN
    INSERT INTO notification_counters (user_id, tenant_id, unread)
    VALUES (new.user_id, new.tenant_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET unread = unread + 1;
END;

CREATE TRIGGER notifications_after_read AFTER UPDATE OF read_at ON notifications
WHEN (old.read_at IS NULL) <> (new.read_at IS NULL) BEGIN
    UPDATE notification_counters
       SET unread = unread + (CASE WHEN new.read_at IS NULL THEN 1 ELSE -1 END)
     WHERE user_id = new.user_id;
END;

CREATE TRIGGER notifications_after_delete AFTER DELETE ON notifications
WHEN old.read_at IS NULL BEGIN
    UPDATE notification_counters SET unread = unread - 1 WHERE user_id = old.user_id;
END;

-- Preferences of a user (JSON), and the tenant's defaults for its users.
CREATE TABLE notification_prefs (
    user_id     BLOB PRIMARY KEY REFERENCES users(id),
    tenant_id   BLOB NOT NULL,
    prefs       TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE tenant_settings (
    tenant_id           BLOB PRIMARY KEY REFERENCES tenants(id),
    notification_prefs  TEXT,
    updated_at          INTEGER NOT NULL
) WITHOUT ROWID;

-- Up to when each user was sent (or did not need) an unread digest.
CREATE TABLE digest_state (
    user_id       BLOB PRIMARY KEY REFERENCES users(id),
    tenant_id     BLOB NOT NULL,
    sent_through  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE training_sessions (
    id                BLOB PRIMARY KEY,
    tenant_id         BLOB NOT NULL REFERENCES tenants(id),
    title             TEXT NOT NULL,
    kind              TEXT NOT NULL,
    description       TEXT NOT NULL,
    location          TEXT NOT NULL,
    start_at          INTEGER NOT NULL,
    end_at            INTEGER NOT NULL,
    organizer_id      BLOB NOT NULL REFERENCES users(id),
    status            TEXT NOT NULL CHECK (status IN ('scheduled', 'cancelled')),
    reminder_offsets  TEXT NOT NULL,  -- JSON array of minutes
    cancel_reason     TEXT,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);
CREATE INDEX training_sessions_by_start ON training_sessions (tenant_id, start_at, id);
CREATE INDEX training_sessions_by_organizer ON training_sessions (organizer_id, start_at, id);

CREATE TABLE training_invitees (
    session_id    BLOB NOT NULL REFERENCES training_sessions(id),
    user_id       BLOB NOT NULL REFERENCES users(id),
    tenant_id     BLOB NOT NULL,
    response      TEXT NOT NULL CHECK (response IN ('pending', 'present', 'absent')),
    responded_at  INTEGER,
    invited_at    INTEGER NOT NULL,
    PRIMARY KEY (session_id, user_id)
) WITHOUT ROWID;
CREATE INDEX training_invitees_by_user ON training_invitees (user_id, session_id);
