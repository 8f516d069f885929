-- Hardware kinds in one spelling: ASCII lowercase, as sweep targets are parsed and listing
-- filters are read (`normalize_kind` in core/src/hardware.rs).
--
-- Until now a kind was stored as the agent sent it. The stock agent sends lowercase, but an
-- agent speaking the wire protocol itself could register `H100`: the claim statement compares
-- a job's target (`h100`) with the device's kind exactly, so that agent was never handed an
-- `h100` job, and its results listed and compared apart from every other H100. The coordinator
-- now lowercases kinds at registration and in results; this brings stored rows into line and
-- makes another spelling unrepresentable.
--
-- `translate` lowercases A-Z only, exactly as Rust's `to_ascii_lowercase`; `lower()` would
-- follow the database's locale for other letters. The checks scan `results` once, under this
-- migration's lock: on a large table, results wait that long.
UPDATE agents a
SET devices = (
    SELECT jsonb_agg(
        CASE WHEN jsonb_typeof(d->'kind') = 'string'
             THEN jsonb_set(d, '{kind}',
                  to_jsonb(translate(d->>'kind', 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                                                 'abcdefghijklmnopqrstuvwxyz')))
             ELSE d END
        ORDER BY o)
    FROM jsonb_array_elements(a.devices) WITH ORDINALITY AS e(d, o))
WHERE jsonb_typeof(a.devices) = 'array'
  AND EXISTS (SELECT 1 FROM jsonb_array_elements(a.devices) d
              WHERE d->>'kind' <> translate(d->>'kind', 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                                                        'abcdefghijklmnopqrstuvwxyz'));

UPDATE health_checks
SET kind = translate(kind, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')
WHERE kind <> translate(kind, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz');

-- The result's own JSON (`record`, which listings are built from) says the same. Its
-- `content_sha256` stays the hash of the record as it was sent, so a re-import of such a record
-- as it was first sent is no longer recognised as a repeat: it is normalised first, and its hash
-- differs.
UPDATE results
SET hardware_kind = translate(hardware_kind, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                              'abcdefghijklmnopqrstuvwxyz'),
    record = CASE WHEN jsonb_typeof(record->'hardware_kind') = 'string'
                  THEN jsonb_set(record, '{hardware_kind}',
                       to_jsonb(translate(hardware_kind, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                                                         'abcdefghijklmnopqrstuvwxyz')))
                  ELSE record END
WHERE hardware_kind <> translate(hardware_kind, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                                 'abcdefghijklmnopqrstuvwxyz');

ALTER TABLE health_checks ADD CONSTRAINT health_checks_kind_lowercase CHECK (
    kind = translate(kind, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'));
ALTER TABLE results ADD CONSTRAINT results_kind_lowercase CHECK (
    hardware_kind = translate(hardware_kind, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                              'abcdefghijklmnopqrstuvwxyz'));
