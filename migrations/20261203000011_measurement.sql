-- The stability rule (issue 11): summary columns for SQL and dashboards. The full report
-- (windows, spread, rule, percentile target) lives in `results.record`; results from agents
-- that predate the rule have NULL here (unknown, not unstable).
CREATE TYPE stop_reason AS ENUM ('stable', 'max_duration', 'max_iterations');

ALTER TABLE results
    ADD COLUMN stable        boolean,
    ADD COLUMN stop_reason   stop_reason,
    -- max/min - 1 of the last k windows' throughput; NULL when fewer than k windows closed.
    ADD COLUMN window_spread double precision,
    ADD CONSTRAINT results_stable_iff_reason CHECK ((stable IS NULL) = (stop_reason IS NULL)),
    ADD CONSTRAINT results_stable_stop_is_stable CHECK (stop_reason <> 'stable' OR stable);
