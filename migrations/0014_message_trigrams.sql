-- Words inside text written without spaces (GET /api/search). `messages_fts` (0003) splits
-- text at spaces and symbols only, so `我用Python写代码` is one token there: a search for
-- "python" never found it, and `天气` inside `今天天气很好` was found only by reading every
-- message. This index holds every three-character sequence (FTS5's trigram tokenizer, case
-- folded) of the messages that hold such text, so that a word of three characters or more
-- is found inside them through the index; `db::search` then keeps the matches that are
-- words of their own. Only those messages: in the others the word index finds every word,
-- and the trigram index would be about 2.6 times their text on disk and make each insert
-- several times slower.
--
-- "Such text": a character of the scripts of `unspaced_script` in `db/search.rs` (Thai and
-- Lao, Myanmar, Khmer, kana, CJK ideographs, Hangul, half-width katakana), written below
-- as `char()` code points three times (the two triggers and the first fill), which must
-- stay the same as there: `db::search::tests::the_trigram_index_takes_the_messages_*`
-- check both triggers and the fill against `unspaced_script`.
--
-- Contentless (the text lives once, in `messages`) with deletes by rowid, so a message
-- that is not in the index may be deleted like any other.

CREATE VIRTUAL TABLE messages_trigram USING fts5(
    content,
    content = '',
    contentless_delete = 1,
    tokenize = 'trigram'
);

CREATE TRIGGER messages_trigram_after_insert AFTER INSERT ON messages
WHEN new.content GLOB ('*[' || char(0x0E00, 45, 0x0EFF, 0x1000, 45, 0x109F, 0x1780, 45, 0x17FF,
    0x3040, 45, 0x30FF, 0x31F0, 45, 0x31FF, 0x3400, 45, 0x4DBF, 0x4E00, 45, 0x9FFF,
    0xAC00, 45, 0xD7AF, 0xF900, 45, 0xFAFF, 0xFF66, 45, 0xFF9F, 0x20000, 45, 0x3FFFF) || ']*')
BEGIN
    INSERT INTO messages_trigram (rowid, content) VALUES (new.id, new.content);
END;

CREATE TRIGGER messages_trigram_after_delete AFTER DELETE ON messages BEGIN
    DELETE FROM messages_trigram WHERE rowid = old.id;
END;

CREATE TRIGGER messages_trigram_after_update AFTER UPDATE OF content ON messages BEGIN
    DELETE FROM messages_trigram WHERE rowid = old.id;
    INSERT INTO messages_trigram (rowid, content)
    SELECT new.id, new.content
    WHERE new.content GLOB ('*[' || char(0x0E00, 45, 0x0EFF, 0x1000, 45, 0x109F, 0x1780, 45,
        0x17FF, 0x3040, 45, 0x30FF, 0x31F0, 45, 0x31FF, 0x3400, 45, 0x4DBF, 0x4E00, 45, 0x9FFF,
        0xAC00, 45, 0xD7AF, 0xF900, 45, 0xFAFF, 0xFF66, 45, 0xFF9F, 0x20000, 45, 0x3FFFF)
        || ']*');
END;

-- Messages stored before this migration.
INSERT INTO messages_trigram (rowid, content)
SELECT id, content
FROM messages
WHERE content GLOB ('*[' || char(0x0E00, 45, 0x0EFF, 0x1000, 45, 0x109F, 0x1780, 45, 0x17FF,
    0x3040, 45, 0x30FF, 0x31F0, 45, 0x31FF, 0x3400, 45, 0x4DBF, 0x4E00, 45, 0x9FFF,
    0xAC00, 45, 0xD7AF, 0xF900, 45, 0xFAFF, 0xFF66, 45, 0xFF9F, 0x20000, 45, 0x3FFFF) || ']*');
