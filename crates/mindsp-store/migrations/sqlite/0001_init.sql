-- MindSP schema for SQLite. Times are milliseconds since the Unix epoch, UUIDs 16-byte blobs.

CREATE TABLE tenants (
    id          BLOB PRIMARY KEY,
    slug        TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE users (
    id              BLOB PRIMARY KEY,
    tenant_id       BLOB NOT NULL REFERENCES tenants(id),
    email           TEXT NOT NULL,
    display_name    TEXT NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('admin', 'officer', 'member')),
    active          INTEGER NOT NULL,
    password_hash   TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    CONSTRAINT users_email_key UNIQUE (tenant_id, email)
);
CREATE INDEX users_by_name ON users (tenant_id, display_name, id);

CREATE TABLE conversations (
    id                BLOB PRIMARY KEY,
    tenant_id         BLOB NOT NULL REFERENCES tenants(id),
    kind              TEXT NOT NULL CHECK (kind IN ('direct', 'group')),
    name              TEXT,
    -- "smaller-uuid:larger-uuid" for direct conversations: one per pair.
    direct_key        TEXT,
    created_by        BLOB NOT NULL REFERENCES users(id),
    created_at        INTEGER NOT NULL,
    last_activity_at  INTEGER NOT NULL,
    last_seq          INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX conversations_direct_key ON conversations (tenant_id, direct_key)
    WHERE direct_key IS NOT NULL;

CREATE TABLE conversation_members (
    conversation_id  BLOB NOT NULL REFERENCES conversations(id),
    user_id          BLOB NOT NULL REFERENCES users(id),
    tenant_id        BLOB NOT NULL,
    role             TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    last_read_seq    INTEGER NOT NULL DEFAULT 0,
    joined_at        INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITHOUT ROWID;
CREATE INDEX members_by_user ON conversation_members (user_id, conversation_id);

CREATE TABLE messages (
    pk               INTEGER PRIMARY KEY,  -- rowid, the key of the full-text index
    id               BLOB NOT NULL UNIQUE,
    tenant_id        BLOB NOT NULL,
    conversation_id  BLOB NOT NULL REFERENCES conversations(id),
    sender_id        BLOB NOT NULL REFERENCES users(id),
    seq              INTEGER NOT NULL,
    content          TEXT NOT NULL,
    idempotency_key  TEXT,
    created_at       INTEGER NOT NULL
);
CREATE UNIQUE INDEX messages_conversation_seq ON messages (conversation_id, seq);
CREATE UNIQUE INDEX messages_idempotency_key ON messages (conversation_id, sender_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Accent-folding full-text index over message content (« securite » finds « sécurité »).
CREATE VIRTUAL TABLE messages_fts USING fts5 (
    content,
    content = 'messages',
    content_rowid = 'pk',
    tokenize = 'unicode61 remove_diacritics 2'
);

-- Appending a message moves the conversation's sequence and activity, the sender's read
-- marker and the full-text index, all inside the statement that inserts it.
CREATE TRIGGER messages_after_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, content) VALUES (new.pk, new.content);
    UPDATE conversations
       SET last_seq = new.seq, last_activity_at = max(last_activity_at, new.created_at)
     WHERE id = new.conversation_id;
    UPDATE conversation_members
       SET last_read_seq = new.seq
     WHERE conversation_id = new.conversation_id AND user_id = new.sender_id;
END;
