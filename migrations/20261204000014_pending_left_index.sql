-- After each result, the coordinator asks whether its sweep still has a pending job
-- (`pending_left` and `settled` in store.rs), and when not, whether any job is unfinished.
--
-- Keyed on `sweep_id` alone, `jobs_unfinished` listed a sweep's unfinished jobs in heap order,
-- so the pending question read past every running job of the sweep (one heap fetch each) and
-- past the entries of jobs finished since the last vacuum before reaching a pending one.
-- Measured over a 35 s load of 100 agents (docs/reliability.md): 180 index entries read and 19.5
-- rows fetched per check. With the state in the key, the check starts at the sweep's pending
-- entries. No update becomes dearer: the only updates that change `state` also change a
-- column that the predicates of `jobs_pending_by_target` and `jobs_running` name, so they were
-- never HOT and already wrote a new entry in every index of `jobs`.
DROP INDEX IF EXISTS jobs_unfinished;
CREATE INDEX jobs_unfinished ON jobs (sweep_id, state) WHERE finished_at IS NULL;
