-- The live one-time sign-in codes (`db::sign_in`): a code is issued by the server (its start
-- on a terminal, `POST /api/sign-in/codes`) or by `my-claw sign-in-link`, which writes its
-- row here instead of asking the server over the network, so whoever may write this file
-- (mode 600 in a private data directory) may make a code, and no secret travels.
-- Only the code's SHA-256 digest is stored (32 bytes), never the code: a copy of the file (a
-- backup) holds nothing that signs in. `expires_at` is Unix milliseconds, like every time.
-- A code is spent by deleting its row; expired rows and the oldest beyond 16 live codes are
-- deleted when the next one is issued. `id` orders the codes by issue.
-- Migrations are never edited once applied: change the schema by adding a new file.

CREATE TABLE sign_in_codes (
    id         INTEGER PRIMARY KEY,
    digest     BLOB    NOT NULL UNIQUE CHECK (length(digest) = 32),
    expires_at INTEGER NOT NULL
);
