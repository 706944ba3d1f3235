-- Every member added to or removed from a conversation moves its members_version. An
-- append returns the version it saw, so a node that cached the members it publishes
-- a message to knows, without reading them, whether its copy is still right.
ALTER TABLE conversations ADD COLUMN members_version INTEGER NOT NULL DEFAULT 0;

CREATE TRIGGER conversation_members_after_insert AFTER INSERT ON conversation_members
BEGIN
    UPDATE conversations SET members_version = members_version + 1
     WHERE id = NEW.conversation_id;
END;

CREATE TRIGGER conversation_members_after_delete AFTER DELETE ON conversation_members
BEGIN
    UPDATE conversations SET members_version = members_version + 1
     WHERE id = OLD.conversation_id;
END;
