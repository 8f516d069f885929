-- Results are identified by their content, and imported ones say who imported them.
--
-- content_sha256: SHA-256 of the record as it was sent (BenchResult::content_hash). Unique, so
-- importing the same records twice, or importing a spooled record that was delivered after
-- all, adds nothing. Rows stored before this migration have none (NULLs never collide).
-- imported_by: the identity of the credential that imported the result; NULL for results an
-- agent delivered itself through SubmitResult.
ALTER TABLE results ADD COLUMN content_sha256 text
    CHECK (content_sha256 IS NULL OR content_sha256 ~ '^[0-9a-f]{64}$');
ALTER TABLE results ADD COLUMN imported_by text
    CHECK (imported_by IS NULL OR length(imported_by) BETWEEN 1 AND 200);
CREATE UNIQUE INDEX results_content_sha256 ON results (content_sha256);
