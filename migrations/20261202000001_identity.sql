-- Identity: API tokens with roles, per-agent secrets bound to the token that registered the
-- agent, and the submitting token of each sweep. Secrets are never stored, only their SHA-256.

CREATE TYPE token_role AS ENUM ('agent', 'reader', 'submitter', 'admin');

CREATE TABLE api_tokens (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    role        token_role NOT NULL,
    -- SHA-256 of the whole secret string.
    hash        bytea NOT NULL UNIQUE CHECK (length(hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz,
    -- The admin token that created this one; NULL for tokens made from the database side.
    created_by  uuid REFERENCES api_tokens (id)
);

-- The agent's current secret (its hash) and the token it registered with. A new registration
-- of the same name with the same token rotates the secret; another token cannot take the name.
ALTER TABLE agents
    ADD COLUMN secret_hash   bytea UNIQUE CHECK (secret_hash IS NULL OR length(secret_hash) = 32),
    ADD COLUMN registered_by uuid REFERENCES api_tokens (id),
    ADD COLUMN incarnation   integer NOT NULL DEFAULT 0;

-- Who submitted (or imported) a sweep, so a submitter can cancel its own and is held to its cap.
ALTER TABLE sweeps ADD COLUMN submitted_by uuid REFERENCES api_tokens (id);
CREATE INDEX sweeps_submitted_by ON sweeps (submitted_by) WHERE state = 'active';
