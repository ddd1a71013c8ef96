//! Stop sequences of `/v1/chat/completions` (OpenAI's `stop`): parsing the field, and the
//! matcher that cuts an answer before the first stop sequence while it streams. It knows
//! text only; what to do once a sequence matched (cancel the model, finish the answer) is
//! `openai.rs`'s.

use serde_json::Value;

/// Most stop sequences one request may give (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;

/// The request's `stop`: absent or `null` (none), a string, or an array of 1 to
/// `MAX_STOP_SEQUENCES` strings, none empty. The error is a sentence naming the field.
pub fn parse_stop(value: Option<&Value>) -> Result<Vec<String>, String> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(one)) => vec![one],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP_SEQUENCES {
                return Err(format!(
                    "stop has {} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                    items.len()
                ));
            }
            let mut strings = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => strings.push(s),
                    _ => return Err(format!("stop[{index}] must be a string")),
                }
            }
            strings
        }
        Some(_) => {
            return Err(format!(
                "stop must be a string or an array of up to {MAX_STOP_SEQUENCES} strings"
            ))
        }
    };
    // An empty sequence would match before the first character: the answer would always
    // be empty, which no client means.
    if items.iter().any(|s| s.is_empty()) {
        return Err("stop sequences must not be empty".into());
    }
    Ok(items.into_iter().cloned().collect())
}

/// Finds the first stop sequence in text that arrives in pieces, however the pieces split
/// it, and releases only text that can no longer be part of a match: at any moment it
/// holds back at most the longest tail that is the start of some stop sequence. So text
/// once released is never taken back, and a match is found even when it spans pieces.
#[derive(Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not released yet: the start of a possible match.
    held: String,
    stopped: bool,
}

/// What one piece of text releases.
#[derive(Debug, PartialEq, Eq)]
pub struct Release {
    /// Text to send now (before the stop sequence, when one matched).
    pub text: String,
    /// A stop sequence matched: `text` is the last of the answer, nothing else follows.
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (as `parse_stop` gives them; none means no matching at all).
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, held: String::new(), stopped: false }
    }

    /// Adds the next piece of the answer. Once a stop sequence has matched, every later
    /// piece is dropped.
    pub fn push(&mut self, piece: &str) -> Release {
        if self.stopped {
            return Release { text: String::new(), stopped: true };
        }
        if self.stops.is_empty() {
            return Release { text: piece.to_string(), stopped: false };
        }
        self.held.push_str(piece);
        // Everything released before contained no match and no start of one, so a match can
        // only begin inside `held`: the earliest beginning of any sequence there is the cut.
        let first = self.stops.iter().filter_map(|stop| self.held.find(stop.as_str())).min();
        if let Some(at) = first {
            self.held.truncate(at);
            self.stopped = true;
            return Release { text: std::mem::take(&mut self.held), stopped: true };
        }
        let keep = self.partial_match_len();
        let text: String = self.held.drain(..self.held.len() - keep).collect();
        Release { text, stopped: false }
    }

    /// Releases what is held back: at the end of the answer, or before a tool call (a stop
    /// sequence is matched within one stretch of text, never across a call).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The length in bytes of the longest tail of `held` that is a proper start of some
    /// stop sequence. A tail equal to a sequence's start is valid UTF-8 starting on a
    /// character, so cutting `held` before it is on a character boundary.
    fn partial_match_len(&self) -> usize {
        let mut longest = 0;
        for stop in &self.stops {
            for (end, _) in stop.char_indices().skip(1) {
                if end > longest && self.held.ends_with(&stop[..end]) {
                    longest = end;
                }
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Feeds `pieces` to a matcher for `stops` and returns what was released, piece by
    /// piece, then what `flush` gave, and whether a sequence matched.
    fn check(stops: &[&str], pieces: &[&str], released: &[&str], flushed: &str, stopped: bool) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut got = Vec::new();
        let mut matched = false;
        for piece in pieces {
            let release = matcher.push(piece);
            matched |= release.stopped;
            got.push(release.text);
        }
        assert_eq!(got, released, "stops {stops:?}, pieces {pieces:?}");
        assert_eq!(matcher.flush(), flushed, "stops {stops:?}, pieces {pieces:?}");
        assert_eq!(matched, stopped, "stops {stops:?}, pieces {pieces:?}");
    }

    #[test]
    fn a_stop_sequence_cuts_the_text_before_it() {
        check(&["\n\n"], &["Hello world\n\nUser: hi"], &["Hello world"], "", true);
        // The first occurrence of any sequence wins, whichever is listed first.
        check(&["END", "x"], &["abxcdEND"], &["ab"], "", true);
        check(&["cd", "bcd"], &["abcde"], &["a"], "", true);
        // A match at the very start leaves nothing.
        check(&["Hi"], &["Hi there"], &[""], "", true);
        // No stop sequence: everything passes untouched.
        check(&[], &["a", "b"], &["a", "b"], "", false);
    }

    #[test]
    fn a_stop_sequence_spanning_pieces_is_found() {
        check(&["STOP"], &["abc S", "T", "OP and more"], &["abc ", "", ""], "", true);
        check(&["\n\n"], &["one\n", "\ntwo"], &["one", ""], "", true);
        // One character per piece.
        check(&["xyz"], &["a", "x", "y", "z", "b"], &["a", "", "", "", ""], "", true);
        // Pieces after the match are dropped.
        check(&["!"], &["hey!", "more"], &["hey", ""], "", true);
    }

    #[test]
    fn only_a_possible_start_of_a_sequence_is_held_back() {
        // `ab` could start `abc`: held; `x` ends that hope, and the text is released.
        check(&["abc"], &["xxab", "x"], &["xx", "abx"], "", false);
        // The longest possible start is held, across sequences.
        check(&["abcd", "bz"], &["1abc"], &["1"], "abc", false);
        // At the end, held text comes out with `flush`.
        check(&["STOP"], &["the end ST"], &["the end "], "ST", false);
        // A repeated prefix: `aa` of `aab` is held, then the match is found.
        check(&["aab"], &["aaa", "ab"], &["a", "a"], "", true);
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        check(&["é!"], &["café", "!", "x"], &["caf", "", ""], "", true);
        check(&["日本"], &["こんにちは日", "本語"], &["こんにちは", ""], "", true);
        check(&["日本"], &["こんにちは日", "曜"], &["こんにちは", "日曜"], "", false);
        check(&["🙂🙃"], &["a🙂", "b"], &["a", "🙂b"], "", false);
    }

    #[test]
    fn stop_is_a_string_or_up_to_four_nonempty_strings() {
        assert_eq!(parse_stop(None).unwrap(), Vec::<String>::new());
        assert_eq!(parse_stop(Some(&Value::Null)).unwrap(), Vec::<String>::new());
        assert_eq!(parse_stop(Some(&json!("\n"))).unwrap(), vec!["\n"]);
        assert_eq!(parse_stop(Some(&json!(["a", "b", "c", "d"]))).unwrap().len(), 4);
        assert_eq!(parse_stop(Some(&json!([]))).unwrap(), Vec::<String>::new());
        let err = |value: Value| parse_stop(Some(&value)).unwrap_err();
        assert_eq!(
            err(json!(["a", "b", "c", "d", "e"])),
            "stop has 5 sequences; at most 4 are allowed"
        );
        assert_eq!(err(json!("")), "stop sequences must not be empty");
        assert_eq!(err(json!(["a", ""])), "stop sequences must not be empty");
        assert_eq!(err(json!(["a", 3])), "stop[1] must be a string");
        assert_eq!(err(json!(7)), "stop must be a string or an array of up to 4 strings");
        assert_eq!(err(json!({"x": 1})), "stop must be a string or an array of up to 4 strings");
    }
}
