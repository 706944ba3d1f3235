-- The state an append moves, apart from the rows it describes. Every append used to
-- update the conversation's row (`last_seq`, `last_activity_at`) and the sender's
-- membership row (`last_read_seq`): two wide rows on two different pages, so that with
-- appends spread over many conversations each commit wrote about two pages per message
-- for them alone (4 KiB each to the WAL). Here both are rows of one narrow table keyed
-- (conversation, user): the conversation's head under the zero user id, each member's
-- read marker under their id. A conversation's head and its members' markers sit side
-- by side, so an append dirties one small page for both; in the append benchmark each
-- append wrote 17.2-17.7 KiB instead of 20.4-20.9 (benches/RESULTS.md).
--
--   head row (user_id = zero):  seq = last seq, at = last activity (ms)
--   member row:                 seq = last read seq, at unused (0)
CREATE TABLE conversation_state (
    conversation_id  BLOB NOT NULL,
    user_id          BLOB NOT NULL,
    seq              INTEGER NOT NULL,
    at               INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITHOUT ROWID;

INSERT INTO conversation_state (conversation_id, user_id, seq, at)
SELECT id, X'00000000000000000000000000000000', last_seq, last_activity_at FROM conversations;
INSERT INTO conversation_state (conversation_id, user_id, seq, at)
SELECT conversation_id, user_id, last_read_seq, 0 FROM conversation_members;

DROP TRIGGER messages_after_insert;
ALTER TABLE conversations DROP COLUMN last_seq;
ALTER TABLE conversations DROP COLUMN last_activity_at;
ALTER TABLE conversation_members DROP COLUMN last_read_seq;

-- Appending a message moves the conversation's head and the sender's read marker.
CREATE TRIGGER messages_after_insert AFTER INSERT ON messages BEGIN
    UPDATE conversation_state SET seq = new.seq, at = max(at, new.created_at)
     WHERE conversation_id = new.conversation_id AND user_id = X'00000000000000000000000000000000';
    UPDATE conversation_state SET seq = new.seq
     WHERE conversation_id = new.conversation_id AND user_id = new.sender_id;
END;

-- A new conversation starts with an empty head.
CREATE TRIGGER conversations_after_insert_state AFTER INSERT ON conversations BEGIN
    INSERT INTO conversation_state (conversation_id, user_id, seq, at)
    VALUES (new.id, X'00000000000000000000000000000000', 0, new.created_at);
END;

-- A new member has read up to the head: they see what is sent from now on as unread.
CREATE TRIGGER conversation_members_after_insert_state AFTER INSERT ON conversation_members
BEGIN
    INSERT INTO conversation_state (conversation_id, user_id, seq, at)
    SELECT new.conversation_id, new.user_id, h.seq, 0
      FROM conversation_state h
     WHERE h.conversation_id = new.conversation_id AND h.user_id = X'00000000000000000000000000000000'
    ON CONFLICT (conversation_id, user_id) DO UPDATE SET seq = excluded.seq;
END;

CREATE TRIGGER conversation_members_after_delete_state AFTER DELETE ON conversation_members
BEGIN
    DELETE FROM conversation_state
     WHERE conversation_id = old.conversation_id AND user_id = old.user_id;
END;
