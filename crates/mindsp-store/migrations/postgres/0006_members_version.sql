-- Every member added to or removed from a conversation moves its members_version. An
-- append returns the version it saw (read under the conversation's row lock), so a
-- node that cached the members it publishes a message to knows, without reading them,
-- whether its copy is still right.
ALTER TABLE conversations ADD COLUMN members_version BIGINT NOT NULL DEFAULT 0;

CREATE FUNCTION mindsp_members_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE conversations SET members_version = members_version + 1
         WHERE tenant_id = OLD.tenant_id AND id = OLD.conversation_id;
    ELSE
        UPDATE conversations SET members_version = members_version + 1
         WHERE tenant_id = NEW.tenant_id AND id = NEW.conversation_id;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER conversation_members_changed AFTER INSERT OR DELETE ON conversation_members
    FOR EACH ROW EXECUTE FUNCTION mindsp_members_changed();
