-- Words glued to text written without spaces (GET /api/search): `messages_fts` (0003)
-- splits text at spaces and symbols only, so `我用Python写代码` is one token there and a
-- search for "python" never found it; nor could it find `天气` inside `今天天气很好` but by
-- reading every message. This index holds every three-character sequence of each message
-- (FTS5's trigram tokenizer, case folded), so a word of three characters or more is found
-- inside any text through the index; `db::search` then keeps the matches that are words of
-- their own. External content, like 0003's: the text lives once, in `messages`.

CREATE VIRTUAL TABLE messages_trigram USING fts5(
    content,
    content = 'messages',
    content_rowid = 'id',
    tokenize = 'trigram'
);

CREATE TRIGGER messages_trigram_after_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_trigram (rowid, content) VALUES (new.id, new.content);
END;

CREATE TRIGGER messages_trigram_after_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_trigram (messages_trigram, rowid, content)
        VALUES ('delete', old.id, old.content);
END;

CREATE TRIGGER messages_trigram_after_update AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_trigram (messages_trigram, rowid, content)
        VALUES ('delete', old.id, old.content);
    INSERT INTO messages_trigram (rowid, content) VALUES (new.id, new.content);
END;

-- Messages stored before this migration.
INSERT INTO messages_trigram (messages_trigram) VALUES ('rebuild');
