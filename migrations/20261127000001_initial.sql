-- Fleetmark's schema. Postgres is the source of truth: coordinators keep no state of their own,
-- so any number of them can serve one database.

CREATE TABLE agents (
    id             uuid PRIMARY KEY,
    name           text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    labels         jsonb NOT NULL DEFAULT '{}'::jsonb,
    price_per_hour double precision CHECK (price_per_hour IS NULL OR price_per_hour >= 0),
    inventory      jsonb NOT NULL,
    -- [{device, kind, name}], one entry per device the agent serves.
    devices        jsonb NOT NULL DEFAULT '[]'::jsonb,
    -- 'registered' agents dialled in; 'imported' ones are known only from imported results.
    origin         text NOT NULL DEFAULT 'registered' CHECK (origin IN ('registered', 'imported')),
    registered_at  timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sweeps (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    spec        jsonb NOT NULL,
    spec_toml   text NOT NULL,
    state       text NOT NULL DEFAULT 'active'
                CHECK (state IN ('active', 'completed', 'cancelled', 'imported')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    CHECK ((state = 'active') = (finished_at IS NULL) OR state = 'imported')
);

CREATE TYPE job_state AS ENUM ('pending', 'running', 'succeeded', 'failed', 'cancelled');

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    sweep_id         uuid NOT NULL REFERENCES sweeps (id) ON DELETE CASCADE,
    seq              integer NOT NULL CHECK (seq >= 0),
    spec             jsonb NOT NULL,
    -- 'any', 'gpu', or a hardware kind such as 'cpu' or 'h100'.
    target           text NOT NULL,
    state            job_state NOT NULL DEFAULT 'pending',
    attempt          integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts     integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    lease_agent_id   uuid REFERENCES agents (id),
    lease_device     text,
    lease_expires_at timestamptz,
    -- The agent of the latest attempt, kept after the lease ends so users can see who ran it.
    last_agent_id    uuid REFERENCES agents (id),
    last_device      text,
    phase            text,
    iterations       integer NOT NULL DEFAULT 0,
    fraction         double precision NOT NULL DEFAULT 0,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    UNIQUE (sweep_id, seq),
    -- A lease exists exactly while the job runs.
    CONSTRAINT lease_iff_running CHECK (
        (state = 'running') = (lease_agent_id IS NOT NULL AND lease_device IS NOT NULL
                               AND lease_expires_at IS NOT NULL)),
    CONSTRAINT attempts_bounded CHECK (attempt <= max_attempts),
    CONSTRAINT running_has_attempt CHECK (state <> 'running' OR attempt >= 1)
);

CREATE INDEX jobs_claimable ON jobs (created_at, seq) WHERE state = 'pending';
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_sweep ON jobs (sweep_id, seq);

-- The only legal moves of a job. Anything else is a bug in a coordinator, and the database
-- refuses it rather than hoping nobody does it.
--   pending -> running    (claimed: a new attempt begins)
--   pending -> cancelled
--   running -> pending    (lease expired or attempt failed, with attempts left)
--   running -> succeeded | failed | cancelled
-- Finished jobs never change again.
CREATE FUNCTION jobs_check_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state IN ('succeeded', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'job % is % and can no longer change', OLD.id, OLD.state
            USING ERRCODE = 'FM001';
    END IF;
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        IF NOT ((OLD.state = 'pending' AND NEW.state IN ('running', 'cancelled'))
             OR (OLD.state = 'running' AND NEW.state IN ('pending', 'succeeded', 'failed', 'cancelled')))
        THEN
            RAISE EXCEPTION 'illegal job state transition % -> % for job %', OLD.state, NEW.state, OLD.id
                USING ERRCODE = 'FM001';
        END IF;
    END IF;
    IF OLD.state = 'pending' AND NEW.state = 'running' AND NEW.attempt <> OLD.attempt + 1 THEN
        RAISE EXCEPTION 'a claim of job % must start attempt %, not %', OLD.id, OLD.attempt + 1, NEW.attempt
            USING ERRCODE = 'FM001';
    END IF;
    IF NEW.state = OLD.state AND NEW.attempt <> OLD.attempt THEN
        RAISE EXCEPTION 'the attempt of job % changed without a claim', OLD.id
            USING ERRCODE = 'FM001';
    END IF;
    IF NEW.state = 'running' AND OLD.state = 'running'
       AND NEW.lease_agent_id IS DISTINCT FROM OLD.lease_agent_id THEN
        RAISE EXCEPTION 'the lease of running job % cannot move to another agent', OLD.id
            USING ERRCODE = 'FM001';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER jobs_check_transition
    BEFORE UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_check_transition();

-- New jobs start pending, except those written by an import, which arrive finished.
CREATE FUNCTION jobs_check_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'pending' THEN
        RETURN NEW;
    END IF;
    IF NEW.state = 'succeeded'
       AND (SELECT state FROM sweeps WHERE id = NEW.sweep_id) = 'imported' THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'job % must be created pending, not %', NEW.id, NEW.state
        USING ERRCODE = 'FM001';
END;
$$;

CREATE TRIGGER jobs_check_insert
    BEFORE INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_check_insert();

CREATE TABLE results (
    id                uuid PRIMARY KEY,
    job_id            uuid NOT NULL UNIQUE REFERENCES jobs (id) ON DELETE CASCADE,
    sweep_id          uuid NOT NULL REFERENCES sweeps (id) ON DELETE CASCADE,
    agent_id          uuid NOT NULL REFERENCES agents (id),
    attempt           integer NOT NULL CHECK (attempt >= 1),
    -- Summary columns, for SQL and dashboards; `record` holds everything the agent sent.
    model             text NOT NULL,
    batch_size        integer NOT NULL,
    precision         text NOT NULL,
    image_size        integer NOT NULL,
    hardware_kind     text NOT NULL,
    hardware_name     text NOT NULL,
    device            text NOT NULL,
    backend           text NOT NULL,
    path              text NOT NULL,
    math              text NOT NULL,
    simulated         boolean NOT NULL,
    throttled         boolean NOT NULL DEFAULT false,
    mean_ms           double precision NOT NULL,
    std_ms            double precision NOT NULL,
    p50_ms            double precision NOT NULL,
    p90_ms            double precision NOT NULL,
    p99_ms            double precision NOT NULL,
    ci95_low_ms       double precision NOT NULL,
    ci95_high_ms      double precision NOT NULL,
    images_per_sec    double precision NOT NULL,
    peak_memory_bytes bigint NOT NULL,
    price_per_hour    double precision,
    -- Every timed iteration, in order: summaries can always be recomputed.
    latencies_ms      double precision[] NOT NULL CHECK (cardinality(latencies_ms) >= 1),
    record            jsonb NOT NULL,
    finished_at       timestamptz NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX results_compare ON results (model, precision, batch_size, hardware_kind)
    WHERE NOT simulated;
CREATE INDEX results_sweep ON results (sweep_id);

-- A result is accepted only from the agent holding the job's current lease, for the current
-- attempt, while the job is running. A late result from an earlier attempt is refused here,
-- whatever the coordinator that received it believed.
CREATE FUNCTION results_check_lease() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
BEGIN
    SELECT * INTO j FROM jobs WHERE id = NEW.job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job %', NEW.job_id USING ERRCODE = 'FM002';
    END IF;
    IF (SELECT state FROM sweeps WHERE id = j.sweep_id) = 'imported' THEN
        RETURN NEW;
    END IF;
    IF j.state <> 'running' OR j.attempt <> NEW.attempt OR j.lease_agent_id <> NEW.agent_id THEN
        RAISE EXCEPTION 'stale result for job % attempt %: the job is % on attempt %',
            NEW.job_id, NEW.attempt, j.state, j.attempt
            USING ERRCODE = 'FM002';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER results_check_lease
    BEFORE INSERT ON results
    FOR EACH ROW EXECUTE FUNCTION results_check_lease();
