-- Full-text search beside the messages, outside row-level security, reached only
-- through a function that applies the tenant of the current transaction itself.
--
-- Why: PostgreSQL evaluates row-level security quals before any non-LEAKPROOF operator,
-- and the text-match operator `@@` is not LEAKPROOF, so under RLS a search cannot use
-- the GIN index and reads every message of the tenant. Here the index lives in a table
-- with no policy, which the serving role cannot read; `mindsp_search` (SECURITY
-- DEFINER) reads it, filters by `mindsp.tenant_id` (the same setting the policies use,
-- so it cannot be asked for another tenant) and by the caller's memberships.

-- Rows come only from the trigger below, so no foreign key is checked per append
-- (measured: ~10 % of append throughput). Messages are never deleted yet; when they
-- are, the same trigger mechanism must delete the search row.
CREATE TABLE message_search (
    message_id       uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL,
    conversation_id  uuid NOT NULL,
    tsv              tsvector NOT NULL
);
CREATE INDEX message_search_tsv ON message_search USING gin (tsv);

INSERT INTO message_search (message_id, tenant_id, conversation_id, tsv)
SELECT id, tenant_id, conversation_id, tsv FROM messages;
ALTER TABLE messages DROP COLUMN tsv;

CREATE FUNCTION mindsp_index_message() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO message_search (message_id, tenant_id, conversation_id, tsv)
    VALUES (NEW.id, NEW.tenant_id, NEW.conversation_id,
            to_tsvector('mindsp_french'::regconfig, NEW.content));
    RETURN NULL;
END
$$;
CREATE TRIGGER messages_search_index AFTER INSERT ON messages
    FOR EACH ROW EXECUTE FUNCTION mindsp_index_message();

-- Best matches first among the `window_size` most recent matches in the conversations
-- `member` belongs to (or in `conv` alone), in the transaction's tenant only. Dynamic
-- SQL so each call is planned for its own words: a rare word is best found through the
-- GIN index, a common one by walking messages newest first.
CREATE FUNCTION mindsp_search(query tsquery, member uuid, conv uuid, lim int, skip int,
                              window_size int)
RETURNS TABLE (message_id uuid, rank real)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $fn$
BEGIN
    RETURN QUERY EXECUTE $q$
        SELECT w.message_id, w.rank FROM (
            SELECT s.message_id, ts_rank(s.tsv, $1) AS rank
              FROM message_search s
             WHERE s.tsv @@ $1
               AND s.tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid
               AND ($3::uuid IS NULL OR s.conversation_id = $3)
               AND s.conversation_id IN (
                     SELECT m.conversation_id FROM conversation_members m
                      WHERE m.user_id = $2
                        AND m.tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
             ORDER BY s.message_id DESC
             LIMIT $6) AS w
         ORDER BY w.rank DESC, w.message_id DESC
         LIMIT $4 OFFSET $5
    $q$ USING query, member, conv, lim, skip, window_size;
END
$fn$;

REVOKE ALL ON message_search FROM PUBLIC;
REVOKE ALL ON FUNCTION mindsp_search(tsquery, uuid, uuid, int, int, int) FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mindsp_app') THEN
        GRANT EXECUTE ON FUNCTION mindsp_search(tsquery, uuid, uuid, int, int, int) TO mindsp_app;
    END IF;
END
$$;
