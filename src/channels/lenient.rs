//! Reading JSON from outside without letting one bad part spoil the rest: splits a document
//! into the raw text of its object members or array items (without parsing their contents,
//! so a lone surrogate or a deep nest inside one item does not touch its neighbours), and
//! describes serde errors without quoting the input. Pure text code: no I/O, no wire types.

/// Why a document could not be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} at byte {at}")]
pub struct SplitError {
    pub what: &'static str,
    pub at: usize,
}

/// One member of an object: its key (`None` when the key is not a valid string, e.g. a lone
/// surrogate) and its raw value.
pub type Member<'a> = (Option<String>, &'a [u8]);

/// The members of the JSON object `text`, in order.
pub fn object_members(text: &[u8]) -> Result<Vec<Member<'_>>, SplitError> {
    let mut pos = skip_ws(text, 0);
    expect(text, pos, b'{', "expected an object")?;
    pos = skip_ws(text, pos + 1);
    let mut members = Vec::new();
    if text.get(pos) == Some(&b'}') {
        return end_of_document(text, pos + 1).map(|_| members);
    }
    loop {
        expect(text, pos, b'"', "expected a key")?;
        let key_end = skip_string(text, pos)?;
        let key = serde_json::from_slice::<String>(&text[pos..key_end]).ok();
        pos = skip_ws(text, key_end);
        expect(text, pos, b':', "expected `:`")?;
        let value_start = skip_ws(text, pos + 1);
        let value_end = skip_value(text, value_start)?;
        members.push((key, &text[value_start..value_end]));
        pos = skip_ws(text, value_end);
        match text.get(pos) {
            Some(b',') => pos = skip_ws(text, pos + 1),
            Some(b'}') => return end_of_document(text, pos + 1).map(|_| members),
            _ => return Err(SplitError { what: "expected `,` or `}`", at: pos }),
        }
    }
}

/// The items of the JSON array `text`, as raw values.
pub fn array_items(text: &[u8]) -> Result<Vec<&[u8]>, SplitError> {
    let mut pos = skip_ws(text, 0);
    expect(text, pos, b'[', "expected an array")?;
    pos = skip_ws(text, pos + 1);
    let mut items = Vec::new();
    if text.get(pos) == Some(&b']') {
        return end_of_document(text, pos + 1).map(|_| items);
    }
    loop {
        let end = skip_value(text, pos)?;
        items.push(&text[pos..end]);
        pos = skip_ws(text, end);
        match text.get(pos) {
            Some(b',') => pos = skip_ws(text, pos + 1),
            Some(b']') => return end_of_document(text, pos + 1).map(|_| items),
            _ => return Err(SplitError { what: "expected `,` or `]`", at: pos }),
        }
    }
}

/// The raw value of member `key` of the object `text`, if it has one.
pub fn member<'a>(text: &'a [u8], key: &str) -> Option<&'a [u8]> {
    object_members(text).ok()?.into_iter().find(|(k, _)| k.as_deref() == Some(key)).map(|(_, v)| v)
}

/// A serde error in words that never quote the input: serde's messages name the offending
/// value (``invalid type: integer `33612345678` ``), which may be a phone number or a
/// message. Keeps the kind, the first words before any quoted part, and the position.
pub fn describe_json_error(error: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let kind = match error.classify() {
        Category::Io => "unreadable input",
        Category::Syntax => "not valid JSON",
        Category::Data => "unexpected content",
        Category::Eof => "truncated JSON",
    };
    let message = error.to_string();
    let head = message.split([':', '`', '"', '\'']).next().unwrap_or_default();
    // `at line N column M` is serde's own suffix; it is added back below from the numbers.
    let head = head.split(" at line ").next().unwrap_or_default().trim();
    let head: String = head.chars().filter(|c| !c.is_control()).take(60).collect();
    if error.line() > 0 {
        format!("{kind} ({head}) at line {} column {}", error.line(), error.column())
    } else {
        format!("{kind} ({head})")
    }
}

fn expect(text: &[u8], pos: usize, byte: u8, what: &'static str) -> Result<(), SplitError> {
    if text.get(pos) == Some(&byte) {
        Ok(())
    } else {
        Err(SplitError { what, at: pos })
    }
}

fn end_of_document(text: &[u8], pos: usize) -> Result<(), SplitError> {
    let pos = skip_ws(text, pos);
    if pos == text.len() {
        Ok(())
    } else {
        Err(SplitError { what: "trailing characters", at: pos })
    }
}

fn skip_ws(text: &[u8], mut pos: usize) -> usize {
    while matches!(text.get(pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        pos += 1;
    }
    pos
}

/// `pos` is on the opening quote; returns the position after the closing one.
fn skip_string(text: &[u8], pos: usize) -> Result<usize, SplitError> {
    let mut i = pos + 1;
    while i < text.len() {
        match text[i] {
            b'"' => return Ok(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Err(SplitError { what: "unterminated string", at: pos })
}

/// Skips one value without recursion (depth is only counted), so a deep nest cannot
/// exhaust the stack; its contents are checked by whoever parses it later.
fn skip_value(text: &[u8], pos: usize) -> Result<usize, SplitError> {
    let mut depth = 0usize;
    let mut i = pos;
    loop {
        i = skip_ws(text, i);
        let Some(&byte) = text.get(i) else {
            return Err(SplitError { what: "unexpected end", at: i });
        };
        match byte {
            b'{' | b'[' => {
                depth += 1;
                i += 1;
                continue;
            }
            b'}' | b']' => {
                if depth == 0 {
                    return Err(SplitError { what: "unexpected close", at: i });
                }
                depth -= 1;
                i += 1;
            }
            b'"' => i = skip_string(text, i)?,
            b',' | b':' if depth > 0 => {
                i += 1;
                continue;
            }
            _ => {
                let start = i;
                while i < text.len() && !b",:]} \t\r\n{[\"".contains(&text[i]) {
                    i += 1;
                }
                if i == start {
                    return Err(SplitError { what: "expected a value", at: i });
                }
            }
        }
        if depth == 0 {
            return Ok(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_members_and_items_without_parsing_them() {
        let text = br#" {"a": 1, "b": {"c": [1, "x]}"]}, "d\ud800": "\ud800", "e": [] } "#;
        let members = object_members(text).unwrap();
        let keys: Vec<Option<&str>> = members.iter().map(|(k, _)| k.as_deref()).collect();
        assert_eq!(keys, [Some("a"), Some("b"), None, Some("e")]);
        assert_eq!(members[1].1, br#"{"c": [1, "x]}"]}"#);
        assert_eq!(members[2].1, br#""\ud800""#);
        assert_eq!(array_items(b"[1, {\"x\": [2]}, \"s\"]").unwrap().len(), 3);
        assert!(array_items(b"[]").unwrap().is_empty());
        assert_eq!(member(text, "a"), Some(&b"1"[..]));
        assert_eq!(member(text, "zz"), None);
    }

    #[test]
    fn deep_nests_are_skipped_without_recursion() {
        let deep =
            format!("{{\"deep\": {}{}, \"ok\": true}}", "[".repeat(100_000), "]".repeat(100_000));
        let members = object_members(deep.as_bytes()).unwrap();
        assert_eq!(members[1], (Some("ok".to_string()), &b"true"[..]));
    }

    #[test]
    fn malformed_documents_are_refused() {
        for bad in [
            &b"{not json"[..],
            b"[1, 2",
            b"{\"a\": 1} x",
            b"{\"a\" 1}",
            b"",
            b"{\"a\": }",
            b"{\"a\": ]}",
        ] {
            assert!(object_members(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn serde_errors_do_not_quote_the_input() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct M {
            from: String,
        }
        let check = |json: &str, secret: &str| {
            let error = serde_json::from_str::<M>(json).unwrap_err();
            assert!(error.to_string().contains(secret), "serde quotes it: {error}");
            let described = describe_json_error(&error);
            assert!(!described.contains(secret), "{described}");
            assert!(!described.contains('\n'));
            described
        };
        let d = check(r#"{"from": 33612345678}"#, "33612345678");
        assert!(d.starts_with("unexpected content (invalid type)"), "{d}");
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct N {
            n: u32,
        }
        let error = serde_json::from_str::<N>(r#"{"n": "secret text"}"#).unwrap_err();
        assert!(error.to_string().contains("secret text"), "{error}");
        assert!(!describe_json_error(&error).contains("secret"));
        let value: serde_json::Value = serde_json::json!({"from": 33612345678u64});
        let error = serde_json::from_value::<M>(value).unwrap_err();
        assert!(!describe_json_error(&error).contains("33612345678"));
        let error = serde_json::from_str::<M>(r#"{"from": "\ud800"}"#).unwrap_err();
        assert!(describe_json_error(&error).starts_with("not valid JSON"), "{error}");
    }
}
