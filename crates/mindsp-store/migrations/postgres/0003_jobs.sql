-- The durable job queue of mindsp-queue, in the same database as the messages so a job
-- can be stored in the transaction of the change that caused it. A job waits as
-- 'scheduled' (or 'retrying') until its run_at; a reservation first promotes the due
-- ones to 'ready', then takes the best 'ready' ones by priority. Workers serve every
-- tenant, so these tables carry no row-level policy;
-- monitoring filters by tenant explicitly.

CREATE TABLE jobs (
    id                uuid PRIMARY KEY,
    tenant_id         uuid,
    -- The scope of unique_key: the tenant, or the nil UUID for jobs without one.
    uniq_scope        uuid NOT NULL,
    kind              text NOT NULL,
    queue             text NOT NULL,
    payload           jsonb NOT NULL,
    priority          smallint NOT NULL,
    state             text NOT NULL CHECK (state IN
                        ('scheduled', 'ready', 'running', 'succeeded', 'retrying', 'dead', 'cancelled')),
    run_at            timestamptz NOT NULL,
    attempts          integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL,
    unique_key        text,
    last_error        text,
    lease_token       uuid,
    lease_expires_at  timestamptz,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    finished_at       timestamptz
);
CREATE INDEX jobs_due ON jobs (queue, priority DESC, run_at, id) WHERE state = 'ready';
-- Jobs waiting for their time: promoted to 'ready' when due, and the next wake-up.
CREATE INDEX jobs_next ON jobs (queue, run_at) WHERE state IN ('scheduled', 'retrying');
CREATE INDEX jobs_leases ON jobs (queue, lease_expires_at) WHERE state = 'running';
CREATE UNIQUE INDEX jobs_unique ON jobs (uniq_scope, unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'ready', 'retrying');
CREATE INDEX jobs_by_state ON jobs (state, tenant_id, updated_at, id);

CREATE TABLE job_ticks (
    schedule  text NOT NULL,
    fire_at   timestamptz NOT NULL,
    PRIMARY KEY (schedule, fire_at)
);

CREATE TABLE job_minutes (
    scope      uuid NOT NULL,
    minute     timestamptz NOT NULL,
    succeeded  bigint NOT NULL DEFAULT 0,
    failed     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, minute)
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mindsp_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON jobs, job_ticks, job_minutes TO mindsp_app;
    END IF;
END
$$;
