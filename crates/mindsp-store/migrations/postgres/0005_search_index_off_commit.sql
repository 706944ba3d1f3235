-- Full-text indexing leaves the append transaction. The row trigger of 0002 ran, for
-- every message, a PL/pgSQL call, `to_tsvector` and the insert into `message_search` with
-- its GIN entries: the largest cost of an append batch after the insert itself, and now
-- and then a long stall when the GIN pending list was merged inside a commit.
--
-- Instead, one statement-level trigger copies an INSERT's new messages into
-- `message_search_pending` (a plain heap insert per row, no index), and the store moves
-- them into `message_search` in bulk beside the appends (`mindsp_index_pending`). A
-- search reads both (`mindsp_search` below): a pending message is matched on the fly, so
-- a message is found as soon as it is committed, as before, in the snapshot of the
-- search itself. The move is one statement, so a snapshot sees each message in exactly
-- one of the two tables.
--
-- Like `message_search`, the table has no row-level security and the serving role may
-- not read it; only the SECURITY DEFINER functions below touch it, and they apply the
-- tenant of the transaction as `mindsp_search` always did.
CREATE TABLE message_search_pending (
    message_id       uuid NOT NULL,
    tenant_id        uuid NOT NULL,
    conversation_id  uuid NOT NULL,
    content          text NOT NULL
);
REVOKE ALL ON message_search_pending FROM PUBLIC;

DROP TRIGGER messages_search_index ON messages;
DROP FUNCTION mindsp_index_message();

CREATE FUNCTION mindsp_queue_for_search() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO message_search_pending (message_id, tenant_id, conversation_id, content)
    SELECT id, tenant_id, conversation_id, content FROM new_messages;
    RETURN NULL;
END
$$;
CREATE TRIGGER messages_search_pending AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_messages
    FOR EACH STATEMENT EXECUTE FUNCTION mindsp_queue_for_search();

-- Moves up to `max_rows` pending messages into the index; returns how many it took.
-- Rows locked by a concurrent call (another node) are skipped, not waited for; a message
-- already indexed is left as it is.
CREATE FUNCTION mindsp_index_pending(max_rows int) RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    taken int;
BEGIN
    WITH batch AS (
        DELETE FROM message_search_pending
         WHERE ctid = ANY (ARRAY(SELECT ctid FROM message_search_pending
                                  LIMIT max_rows FOR UPDATE SKIP LOCKED))
        RETURNING message_id, tenant_id, conversation_id, content
    ), indexed AS (
        INSERT INTO message_search (message_id, tenant_id, conversation_id, tsv)
        SELECT message_id, tenant_id, conversation_id,
               to_tsvector('mindsp_french'::regconfig, content)
          FROM batch
        ON CONFLICT (message_id) DO NOTHING
    )
    SELECT count(*) INTO taken FROM batch;
    RETURN taken;
END
$$;

-- As in 0002, plus the pending messages of the same conversations, matched on the fly
-- (after the cheap tenant and membership filters: `OFFSET 0` keeps `to_tsvector` from
-- running before them). The indexed part keeps its own newest-first window, so its plan
-- is the one 0002 chose for each word.
CREATE OR REPLACE FUNCTION mindsp_search(query tsquery, member uuid, conv uuid, lim int,
                                         skip int, window_size int)
RETURNS TABLE (message_id uuid, rank real)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $fn$
BEGIN
    RETURN QUERY EXECUTE $q$
        SELECT w.message_id, w.rank FROM (
            (SELECT s.message_id, ts_rank(s.tsv, $1) AS rank
               FROM message_search s
              WHERE s.tsv @@ $1
                AND s.tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid
                AND ($3::uuid IS NULL OR s.conversation_id = $3)
                AND s.conversation_id IN (
                      SELECT m.conversation_id FROM conversation_members m
                       WHERE m.user_id = $2
                         AND m.tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
              ORDER BY s.message_id DESC
              LIMIT $6)
            UNION ALL
            (SELECT p.message_id, ts_rank(p.tsv, $1) AS rank
               FROM (SELECT q.message_id, to_tsvector('mindsp_french'::regconfig, q.content) AS tsv
                       FROM message_search_pending q
                      WHERE q.tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid
                        AND ($3::uuid IS NULL OR q.conversation_id = $3)
                        AND q.conversation_id IN (
                              SELECT m.conversation_id FROM conversation_members m
                               WHERE m.user_id = $2
                                 AND m.tenant_id = NULLIF(current_setting('mindsp.tenant_id', true), '')::uuid)
                     OFFSET 0) AS p
              WHERE p.tsv @@ $1)
            ORDER BY message_id DESC
            LIMIT $6) AS w
         ORDER BY w.rank DESC, w.message_id DESC
         LIMIT $4 OFFSET $5
    $q$ USING query, member, conv, lim, skip, window_size;
END
$fn$;

REVOKE ALL ON FUNCTION mindsp_index_pending(int) FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mindsp_app') THEN
        GRANT EXECUTE ON FUNCTION mindsp_index_pending(int) TO mindsp_app;
    END IF;
END
$$;
