-- Notifications, their preferences, the unread-message digest and training sessions
-- (FMPA). Every table carries tenant_id under the same row-level policy as the
-- messages (see 0001_init.sql).

CREATE TABLE notifications (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL,
    user_id     uuid NOT NULL REFERENCES users(id),
    kind        text NOT NULL,
    title       text NOT NULL,
    body        text NOT NULL,
    link        text,
    data        jsonb NOT NULL,
    -- Deduplication key, per recipient.
    key         text,
    created_at  timestamptz NOT NULL,
    read_at     timestamptz
);
-- A recipient holds at most one notification per key.
CREATE UNIQUE INDEX notifications_key ON notifications (tenant_id, user_id, key)
    WHERE key IS NOT NULL;
-- The bell: newest first, and the unread ones alone. The tenant leads so that both
-- equalities of a listing are index conditions: the planner multiplies their
-- selectivities as if independent (a user belongs to one tenant), so with the tenant as
-- a mere filter it expects about one row, prefers a bitmap scan and sorts every
-- notification of the user (12 ms at 10,000) instead of walking the index backwards.
CREATE INDEX notifications_by_user ON notifications (tenant_id, user_id, id);
CREATE INDEX notifications_unread ON notifications (tenant_id, user_id, id) WHERE read_at IS NULL;
-- A user's tenant is a function of the user: tell the planner, once analysed.
CREATE STATISTICS notifications_user_tenant (dependencies) ON tenant_id, user_id FROM notifications;

-- Unread count per user, kept by the statement triggers below in the statement that
-- changes notifications: reading a count is one row, however many notifications there
-- are (counting a partial index costs a visit per unread row).
CREATE TABLE notification_counters (
    user_id    uuid PRIMARY KEY REFERENCES users(id),
    tenant_id  uuid NOT NULL,
    unread     bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 70);

-- One grouped statement per changing statement (a tenant notified at once is one
-- upsert of 5,000 rows, not 5,000 upserts). Locks are taken in user order, so two
-- transactions notifying overlapping users do not deadlock on the counters.
CREATE FUNCTION mindsp_notifications_inserted() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO notification_counters AS c (user_id, tenant_id, unread)
    SELECT user_id, tenant_id, count(*) FROM new_rows
     WHERE read_at IS NULL
     GROUP BY user_id, tenant_id
     ORDER BY user_id
    ON CONFLICT (user_id) DO UPDATE SET unread = c.unread + excluded.unread;
    RETURN NULL;
END
$$;

CREATE FUNCTION mindsp_notifications_updated() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE notification_counters c SET unread = c.unread + d.delta
      FROM (SELECT n.user_id, sum(CASE WHEN n.read_at IS NULL THEN 1 ELSE -1 END) AS delta
              FROM new_rows n JOIN old_rows o ON o.id = n.id
             WHERE (o.read_at IS NULL) <> (n.read_at IS NULL)
             GROUP BY n.user_id) d
     WHERE c.user_id = d.user_id AND d.delta <> 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION mindsp_notifications_deleted() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE notification_counters c SET unread = c.unread - d.n
      FROM (SELECT user_id, count(*) AS n FROM old_rows
             WHERE read_at IS NULL GROUP BY user_id) d
     WHERE c.user_id = d.user_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER notifications_inserted AFTER INSERT ON notifications
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mindsp_notifications_inserted();
CREATE TRIGGER notifications_updated AFTER UPDATE ON notifications
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mindsp_notifications_updated();
CREATE TRIGGER notifications_deleted AFTER DELETE ON notifications
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mindsp_notifications_deleted();

-- Preferences of a user, and the tenant's defaults for its users.
CREATE TABLE notification_prefs (
    user_id     uuid PRIMARY KEY REFERENCES users(id),
    tenant_id   uuid NOT NULL,
    prefs       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE TABLE tenant_settings (
    tenant_id           uuid PRIMARY KEY REFERENCES tenants(id),
    notification_prefs  jsonb,
    updated_at          timestamptz NOT NULL
);

-- Up to when each user was sent (or did not need) an unread digest.
CREATE TABLE digest_state (
    user_id       uuid PRIMARY KEY REFERENCES users(id),
    tenant_id     uuid NOT NULL,
    sent_through  timestamptz NOT NULL
);

CREATE TABLE training_sessions (
    id                uuid PRIMARY KEY,
    tenant_id         uuid NOT NULL REFERENCES tenants(id),
    title             text NOT NULL,
    kind              text NOT NULL,
    description       text NOT NULL,
    location          text NOT NULL,
    start_at          timestamptz NOT NULL,
    end_at            timestamptz NOT NULL,
    organizer_id      uuid NOT NULL REFERENCES users(id),
    status            text NOT NULL CHECK (status IN ('scheduled', 'cancelled')),
    -- Minutes before the start, largest first.
    reminder_offsets  bigint[] NOT NULL,
    cancel_reason     text,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL
);
CREATE INDEX training_sessions_by_start ON training_sessions (tenant_id, start_at, id);
CREATE INDEX training_sessions_by_organizer ON training_sessions (organizer_id, start_at, id);

CREATE TABLE training_invitees (
    session_id    uuid NOT NULL REFERENCES training_sessions(id),
    user_id       uuid NOT NULL REFERENCES users(id),
    tenant_id     uuid NOT NULL,
    response      text NOT NULL CHECK (response IN ('pending', 'present', 'absent')),
    responded_at  timestamptz,
    invited_at    timestamptz NOT NULL,
    PRIMARY KEY (session_id, user_id)
);
CREATE INDEX training_invitees_by_user ON training_invitees (user_id, session_id);

-- Row-level security, as for the tables of 0001_init.sql.
ALTER TABLE notifications ENABLE ROW LEVEL SECURITY;
ALTER TABLE notifications FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON notifications
    USING (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid);

ALTER TABLE notification_counters ENABLE ROW LEVEL SECURITY;
ALTER TABLE notification_counters FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON notification_counters
    USING (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid);

ALTER TABLE notification_prefs ENABLE ROW LEVEL SECURITY;
ALTER TABLE notification_prefs FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON notification_prefs
    USING (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid);

ALTER TABLE tenant_settings ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_settings FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenant_settings
    USING (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid);

ALTER TABLE digest_state ENABLE ROW LEVEL SECURITY;
ALTER TABLE digest_state FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON digest_state
    USING (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid);

ALTER TABLE training_sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE training_sessions FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON training_sessions
    USING (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid);

ALTER TABLE training_invitees ENABLE ROW LEVEL SECURITY;
ALTER TABLE training_invitees FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON training_invitees
    USING (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mindsp_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE
            ON notifications, notification_counters, notification_prefs, tenant_settings,
               digest_state, training_sessions, training_invitees
            TO mindsp_app;
    END IF;
END
$$;
