-- The full-text index leaves the database file and the append transaction. Filling it
-- inside every append cost the single writer about a fifth of its time per message
-- (FTS5 writes a new segment at each commit), and nothing else can run beside that
-- writer. The index now lives in a file of its own beside this one (`<file>-search`,
-- attached as `search`), which the store fills in bulk on a connection of its own and
-- brings up to date before each search (see `SearchIndex` in src/sqlite.rs). It holds
-- nothing that cannot be rebuilt from `messages`: a missing or stale file is rebuilt.
DROP TRIGGER messages_after_insert;

-- Appending a message moves the conversation's sequence and activity and the sender's
-- read marker, inside the statement that inserts it.
CREATE TRIGGER messages_after_insert AFTER INSERT ON messages BEGIN
    UPDATE conversations
       SET last_seq = new.seq, last_activity_at = max(last_activity_at, new.created_at)
     WHERE id = new.conversation_id;
    UPDATE conversation_members
       SET last_read_seq = new.seq
     WHERE conversation_id = new.conversation_id AND user_id = new.sender_id;
END;

DROP TABLE messages_fts;
