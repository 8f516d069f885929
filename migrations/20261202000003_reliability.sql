-- Reliability and dispatch scale (issue 8).
--
-- 1. Attempts count only the job's own failures. `attempt` stays the run number (every claim
--    starts the next one, so a late result from an earlier run is still told apart), while
--    `failures` counts the runs that failed through the job's fault and is what `max_attempts`
--    bounds. Hand-backs (a stopping agent, a lease whose agent was stopped by its operator, a
--    claim never acknowledged) count in `handbacks`, bounded by `max_handbacks`, so a job
--    cannot bounce forever either.
-- 2. A claim must be acknowledged (the agent's first progress report) by `claim_ack_by`, or it
--    returns to the queue without costing an attempt: a claim lost on its way to the agent no
--    longer holds the job for a whole lease.
-- 3. Agents say when they are stopping (`agents.stopping_since`), so the expiry of a lease they
--    could not hand back is not the job's fault.
-- 4. `service_clock` records when a coordinator last served, so a starting coordinator renews
--    only the leases of agents heard from before the outage.
-- 5. Indexes that keep a claim and a completion check independent of the queue's length.

ALTER TABLE jobs
    ADD COLUMN failures integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    ADD COLUMN handbacks integer NOT NULL DEFAULT 0 CHECK (handbacks >= 0),
    ADD COLUMN max_handbacks integer NOT NULL DEFAULT 20 CHECK (max_handbacks >= 1),
    ADD COLUMN claim_ack_by timestamptz;

-- Existing jobs: every return to the queue used to be a failure.
ALTER TABLE jobs DISABLE TRIGGER jobs_check_transition;
UPDATE jobs SET failures = least(max_attempts,
    CASE WHEN state = 'running' THEN attempt - 1
         WHEN state = 'succeeded' THEN greatest(attempt - 1, 0)
         ELSE attempt END)
WHERE attempt > 0;
ALTER TABLE jobs ENABLE TRIGGER jobs_check_transition;

ALTER TABLE jobs DROP CONSTRAINT attempts_bounded;
ALTER TABLE jobs ADD CONSTRAINT failures_bounded CHECK (failures <= max_attempts);
ALTER TABLE jobs ADD CONSTRAINT handbacks_bounded CHECK (handbacks <= max_handbacks);
ALTER TABLE jobs ADD CONSTRAINT ack_only_while_running
    CHECK (claim_ack_by IS NULL OR state = 'running');

ALTER TABLE agents ADD COLUMN stopping_since timestamptz;

CREATE TABLE service_clock (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    alive_at timestamptz NOT NULL
);

-- Claims look up the oldest pending job of each target they can run: one short index probe
-- per target, however many jobs are queued, and nothing for targets no agent asks for.
DROP INDEX IF EXISTS jobs_claimable;
CREATE INDEX jobs_pending_by_target ON jobs (target, created_at, seq) WHERE state = 'pending';
-- "Is anything of this sweep still unfinished?" after each completion, without reading the
-- sweep's finished jobs.
CREATE INDEX jobs_unfinished ON jobs (sweep_id) WHERE state IN ('pending', 'running');
CREATE INDEX jobs_unacked ON jobs (claim_ack_by) WHERE claim_ack_by IS NOT NULL;
-- The same columns as the UNIQUE (sweep_id, seq) constraint's index: every job write paid twice.
DROP INDEX IF EXISTS jobs_sweep;

-- The transition rules of the initial schema, plus: a job that leaves `running` for `pending`
-- or `failed` counts that exactly once, as a failure or as a hand-back; the counters never
-- move otherwise; and the acknowledgement deadline ends with the run.
CREATE OR REPLACE FUNCTION jobs_check_transition() RETURNS trigger
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
    IF OLD.state = 'running' AND NEW.state IN ('pending', 'failed') THEN
        IF (NEW.failures - OLD.failures) + (NEW.handbacks - OLD.handbacks) <> 1
           OR NEW.failures < OLD.failures OR NEW.handbacks < OLD.handbacks THEN
            RAISE EXCEPTION 'job % left its run without counting it once as a failure or a hand-back', OLD.id
                USING ERRCODE = 'FM001';
        END IF;
    ELSIF NEW.failures <> OLD.failures OR NEW.handbacks <> OLD.handbacks THEN
        RAISE EXCEPTION 'the failure and hand-back counts of job % change only when a run ends', OLD.id
            USING ERRCODE = 'FM001';
    END IF;
    IF NEW.state <> 'running' THEN
        NEW.claim_ack_by := NULL;
    END IF;
    RETURN NEW;
END;
$$;

-- `ListResults` pages in its listing order by keyset; `compare` aggregates in SQL over the
-- existing `results_compare` index.
CREATE INDEX results_listing ON results (hardware_kind, model, precision, batch_size, finished_at, id);
