-- The durable job queue of mindsp-queue, in the same file as the messages so a job can
-- be stored in the transaction of the change that caused it. Times in ms since epoch.
-- A job waits as 'scheduled' (or 'retrying') until its run_at; a worker's reservation
-- first promotes the due ones to 'ready', then takes the best 'ready' ones by priority.
-- Keeping the two apart keeps both steps index range scans, however many jobs wait.

CREATE TABLE jobs (
    id                BLOB PRIMARY KEY,
    tenant_id         BLOB,
    -- The scope of unique_key: the tenant, or sixteen zero bytes for jobs without one.
    uniq_scope        BLOB NOT NULL,
    kind              TEXT NOT NULL,
    queue             TEXT NOT NULL,
    payload           TEXT NOT NULL,
    priority          INTEGER NOT NULL,
    state             TEXT NOT NULL CHECK (state IN
                        ('scheduled', 'ready', 'running', 'succeeded', 'retrying', 'dead', 'cancelled')),
    run_at            INTEGER NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    max_attempts      INTEGER NOT NULL,
    unique_key        TEXT,
    last_error        TEXT,
    lease_token       BLOB,
    lease_expires_at  INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    finished_at       INTEGER
);
-- What a worker takes next: highest priority, then earliest run_at.
CREATE INDEX jobs_due ON jobs (queue, priority DESC, run_at, id) WHERE state = 'ready';
-- Leases to recover when a worker died.
-- Jobs waiting for their time: promoted to 'ready' when due, and the next wake-up.
CREATE INDEX jobs_next ON jobs (queue, run_at) WHERE state IN ('scheduled', 'retrying');
CREATE INDEX jobs_leases ON jobs (queue, lease_expires_at) WHERE state = 'running';
-- At most one pending job per unique key and scope.
CREATE UNIQUE INDEX jobs_unique ON jobs (uniq_scope, unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'ready', 'retrying');
-- Monitoring lists (dead jobs of a tenant...) and pruning.
CREATE INDEX jobs_by_state ON jobs (state, tenant_id, updated_at, id);

-- One row per firing of a repeating schedule: the first node to insert it enqueues.
CREATE TABLE job_ticks (
    schedule  TEXT NOT NULL,
    fire_at   INTEGER NOT NULL,
    PRIMARY KEY (schedule, fire_at)
) WITHOUT ROWID;

-- Finished attempts per minute and scope, for the throughput figures.
CREATE TABLE job_minutes (
    scope      BLOB NOT NULL,
    minute     INTEGER NOT NULL,
    succeeded  INTEGER NOT NULL DEFAULT 0,
    failed     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, minute)
) WITHOUT ROWID;
