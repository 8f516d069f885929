-- Dispatch cost per completed job (issue 8, item 6).
--
-- 1. Progress reports are HOT updates. A report changes `phase`, `iterations`, `fraction`,
--    `lease_expires_at` and `claim_ack_by`; the last two were indexed (`jobs_leases`,
--    `jobs_unacked`), so every report wrote a new entry into every index of `jobs`. The reaper's
--    scan now reads the running jobs through `jobs_running`, keyed by the lease holder (which
--    never changes while a job runs), and checks the two deadlines on the rows: one entry per
--    running job, which is one per busy device.
-- 2. Room on each page for the new version of an updated row (HOT needs the same page).
-- 3. `results_check_lease` checks the lease first and reads the sweep only for a result that
--    does not answer the current lease (an import into an imported sweep): the same results are
--    accepted and refused, with one read fewer per result.
-- 4. A result no longer locks its sweep's row. The foreign key `results.sweep_id -> sweeps`
--    took a KEY SHARE lock on the sweep row at every result insert; all results of a sweep share
--    that one row, so concurrent inserts turned its lock into a new MultiXact almost every time
--    (measured: about one per completion). `results_check_lease` now checks instead that a
--    result's sweep is its job's sweep, which `jobs.sweep_id` references (deleting a sweep still
--    deletes its results, through its jobs).

ALTER TABLE jobs SET (fillfactor = 75);

ALTER TABLE results DROP CONSTRAINT IF EXISTS results_sweep_id_fkey;

DROP INDEX IF EXISTS jobs_leases;
DROP INDEX IF EXISTS jobs_unacked;
CREATE INDEX jobs_running ON jobs (lease_agent_id) WHERE state = 'running';

CREATE OR REPLACE FUNCTION results_check_lease() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    j_state   job_state;
    j_attempt integer;
    j_agent   uuid;
    j_sweep   uuid;
BEGIN
    SELECT state, attempt, lease_agent_id, sweep_id INTO j_state, j_attempt, j_agent, j_sweep
        FROM jobs WHERE id = NEW.job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job %', NEW.job_id USING ERRCODE = 'FM002';
    END IF;
    IF NEW.sweep_id IS DISTINCT FROM j_sweep THEN
        RAISE EXCEPTION 'a result for job % must name its sweep %, not %', NEW.job_id, j_sweep,
            NEW.sweep_id USING ERRCODE = 'FM001';
    END IF;
    IF j_state = 'running' AND j_attempt = NEW.attempt AND j_agent = NEW.agent_id THEN
        RETURN NEW;
    END IF;
    IF (SELECT state FROM sweeps WHERE id = j_sweep) = 'imported' THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'stale result for job % attempt %: the job is % on attempt %',
        NEW.job_id, NEW.attempt, j_state, j_attempt
        USING ERRCODE = 'FM002';
END;
$$;
