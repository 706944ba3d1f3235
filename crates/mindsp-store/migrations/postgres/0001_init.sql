-- MindSP schema for PostgreSQL. Everything is created in the current schema (the first
-- of the search_path, which the store sets when it is configured with a schema), except
-- the `unaccent` extension, which exists once per database.

-- Accent folding for full-text search. Parallel migrations of different schemas in the
-- same database race on the extension; whoever loses finds it there.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS unaccent SCHEMA public;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

-- French stemming after accent folding: « securite » finds « sécurité », « interventions »
-- finds « intervention ». ASCII words keep the plain stemmer; they have no accents.
CREATE TEXT SEARCH CONFIGURATION mindsp_french (COPY = pg_catalog.french);
DO $$
BEGIN
    -- The dictionary lives wherever the extension was installed (public unless an
    -- earlier installation chose otherwise).
    EXECUTE format(
        'ALTER TEXT SEARCH CONFIGURATION mindsp_french
             ALTER MAPPING FOR hword, hword_part, word WITH %I.unaccent, french_stem',
        (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
          WHERE e.extname = 'unaccent'));
END
$$;

CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    slug        text NOT NULL CONSTRAINT tenants_slug_key UNIQUE,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE users (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants(id),
    email           text NOT NULL,
    display_name    text NOT NULL,
    role            text NOT NULL CHECK (role IN ('admin', 'officer', 'member')),
    active          boolean NOT NULL,
    password_hash   text NOT NULL,
    created_at      timestamptz NOT NULL,
    CONSTRAINT users_email_key UNIQUE (tenant_id, email)
);
CREATE INDEX users_by_name ON users (tenant_id, display_name, id);

-- Every append updates its conversation's row: room on the page keeps those updates HOT
-- (no indexed column changes).
CREATE TABLE conversations (
    id                uuid PRIMARY KEY,
    tenant_id         uuid NOT NULL REFERENCES tenants(id),
    kind              text NOT NULL CHECK (kind IN ('direct', 'group')),
    name              text,
    -- "smaller-uuid:larger-uuid" for direct conversations: one per pair.
    direct_key        text,
    created_by        uuid NOT NULL REFERENCES users(id),
    created_at        timestamptz NOT NULL,
    last_activity_at  timestamptz NOT NULL,
    last_seq          bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 70);
CREATE UNIQUE INDEX conversations_direct_key ON conversations (tenant_id, direct_key)
    WHERE direct_key IS NOT NULL;

-- Read markers move on every append and every read: same reasoning as above.
CREATE TABLE conversation_members (
    conversation_id  uuid NOT NULL REFERENCES conversations(id),
    user_id          uuid NOT NULL REFERENCES users(id),
    tenant_id        uuid NOT NULL,
    role             text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    last_read_seq    bigint NOT NULL DEFAULT 0,
    joined_at        timestamptz NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITH (fillfactor = 80);
CREATE INDEX members_by_user ON conversation_members (user_id, conversation_id);

CREATE TABLE messages (
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL,
    conversation_id  uuid NOT NULL REFERENCES conversations(id),
    sender_id        uuid NOT NULL REFERENCES users(id),
    seq              bigint NOT NULL,
    content          text NOT NULL,
    idempotency_key  text,
    created_at       timestamptz NOT NULL,
    -- The configuration is resolved to its OID here, so later search_path changes do not
    -- affect the column.
    tsv              tsvector GENERATED ALWAYS AS (to_tsvector('mindsp_french'::regconfig, content)) STORED
);
CREATE UNIQUE INDEX messages_conversation_seq ON messages (conversation_id, seq);
CREATE UNIQUE INDEX messages_idempotency_key ON messages (conversation_id, sender_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX messages_tsv ON messages USING gin (tsv);

-- Row-level security: the second tenancy wall, behind the explicit `tenant_id = $tenant`
-- of every query. Each unit of work sets `mindsp.tenant_id` for its transaction only;
-- without it (NULL, or '' once a transaction that set it has ended) no row is visible
-- and no row can be written. FORCE makes the policies bind the tables' owner too.
-- Tenants have no policy: login looks a tenant up by slug before any scope exists.
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON users
    USING (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid);

ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;
ALTER TABLE conversations FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON conversations
    USING (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid);

ALTER TABLE conversation_members ENABLE ROW LEVEL SECURITY;
ALTER TABLE conversation_members FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON conversation_members
    USING (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid);

ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
ALTER TABLE messages FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON messages
    USING (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid);

-- Superusers and BYPASSRLS roles ignore row-level security even when it is forced. When
-- the store connects as one, it switches every serving connection to this role (SET
-- ROLE), which has the table privileges the adapter needs and nothing else. Roles are
-- per cluster: parallel migrations race on it, and a connecting role that may not
-- create roles (an ordinary owner, to which FORCE applies anyway) goes without.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mindsp_app') THEN
        CREATE ROLE mindsp_app NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
    WHEN insufficient_privilege THEN
        RAISE NOTICE 'role mindsp_app not created (%); connect as a role without BYPASSRLS', SQLERRM;
END
$$;

-- A later migration that adds a table grants it the same way.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mindsp_app') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO mindsp_app', current_schema());
        GRANT SELECT, INSERT, UPDATE, DELETE
            ON tenants, users, conversations, conversation_members, messages
            TO mindsp_app;
    END IF;
END
$$;
