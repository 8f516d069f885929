-- `fleetmark agents prune`: an agent retired at some time is hidden from ListAgents until it is
-- heard from again (a later last_seen_at). Its results keep pointing at it.
ALTER TABLE agents ADD COLUMN retired_at timestamptz;
