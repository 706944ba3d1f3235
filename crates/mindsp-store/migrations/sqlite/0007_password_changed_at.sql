-- When a user's password last changed (milliseconds since the epoch): access tokens
-- issued before it no longer open anything.
ALTER TABLE users ADD COLUMN password_changed_at INTEGER;
