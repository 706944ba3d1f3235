-- When a user's password last changed: access tokens issued before it no longer open
-- anything.
ALTER TABLE users ADD COLUMN password_changed_at timestamptz;
