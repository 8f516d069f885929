-- A claim is served by `jobs_pending_by_target` whatever the planner's statistics say.
--
-- Found by the load run with 100,000 finished jobs (docs/reliability.md): with statistics
-- taken while nothing was pending, the planner estimated one pending row and served the claim
-- from `jobs_unfinished` (partial on state IN ('pending', 'running'), which a claim's
-- `state = 'pending'` implies) plus a sort, reading every unfinished job on every claim.
-- The completion check keeps its index, now keyed on a predicate no claim mentions:
-- `finished_at IS NULL`, which the constraint below makes the same thing as "not finished".
-- Every transition already keeps it so (a terminal state sets finished_at, a return to
-- pending clears it, imports arrive finished with one).
ALTER TABLE jobs ADD CONSTRAINT jobs_finished_iff_terminal
    CHECK ((finished_at IS NULL) = (state IN ('pending', 'running')));

DROP INDEX IF EXISTS jobs_unfinished;
CREATE INDEX jobs_unfinished ON jobs (sweep_id) WHERE finished_at IS NULL;
