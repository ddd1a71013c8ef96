-- The privacy ledger records where each answer was produced (issue 18): the host of a
-- network provider (`gpu-box:8000`, `api.z.ai`; NULL for the in-process engine), and
-- whether the answer left the machine, decided when it was written (any host other than
-- loopback). Rows written before this migration: every provider but `local` left.
ALTER TABLE messages ADD COLUMN host TEXT;
ALTER TABLE messages ADD COLUMN left_machine INTEGER NOT NULL DEFAULT 0
    CHECK (left_machine IN (0, 1));
UPDATE messages SET left_machine = 1 WHERE provider IS NOT NULL AND provider <> 'local';
