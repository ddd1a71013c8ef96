-- Why an answer failed (the provider's or the engine's error, as the page showed it when
-- it happened), so a reloaded page can say it again; NULL for answers that completed or
-- that the user stopped. Rows written before this migration have none.
ALTER TABLE messages ADD COLUMN failure TEXT;
