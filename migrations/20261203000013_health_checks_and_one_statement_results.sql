-- Two changes of stop 16.
--
-- 1. Node health checks get their own table: every check an agent declares at registration is
--    kept (a node's history), with the flags it carries against the median of its GPU kind,
--    and every result names the check that was in force on its device when it was stored.
--
-- 2. A result is stored in one statement (insert + finish the job), which needs a way to abort
--    that statement when the job did not finish: `fleetmark_assert`.

CREATE TABLE health_checks (
    id          bigserial PRIMARY KEY,
    agent_id    uuid NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    -- The agent's registration this check came with (agents.incarnation).
    incarnation integer NOT NULL CHECK (incarnation >= 0),
    device      text NOT NULL CHECK (length(device) BETWEEN 1 AND 256),
    kind        text NOT NULL CHECK (length(kind) BETWEEN 1 AND 256),
    checked_at  timestamptz NOT NULL,
    -- fleetmark_core::DeviceHealth, validated by the coordinator before it is stored.
    health      jsonb NOT NULL CHECK (jsonb_typeof(health) = 'object'),
    -- The metrics on which this device was more than 10% below the median of its kind (the
    -- latest check of every device of the kind), as text such as "gemm_f16_tflops -14%";
    -- recomputed for the kind's current checks whenever one of them registers. Empty: healthy.
    flags       text[] NOT NULL DEFAULT '{}',
    flags_at    timestamptz NOT NULL DEFAULT now()
);
-- The check in force on a device: its latest.
CREATE INDEX health_checks_in_force ON health_checks (agent_id, device, id DESC);
CREATE INDEX health_checks_kind ON health_checks (kind, agent_id, device, id DESC);

ALTER TABLE results ADD COLUMN health_check_id bigint REFERENCES health_checks (id);

-- Raises FM002 (a stale lease) with `message` when `ok` is false; used inside a statement
-- whose other parts must not commit in that case.
CREATE FUNCTION fleetmark_assert(ok boolean, message text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION '%', message USING ERRCODE = 'FM002';
    END IF;
    RETURN true;
END;
$$;
