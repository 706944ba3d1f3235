-- When a user's last connection closed, as the node that saw it close recorded it:
-- presence keeps `last_seen` in memory (or in Redis), and this is what is left of it
-- after a restart.
ALTER TABLE users ADD COLUMN last_seen_at timestamptz;
