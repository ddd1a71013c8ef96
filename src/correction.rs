//! The reminder-claim check of the agent loop (issue 15): a small model sometimes says "I've
//! set a reminder" without calling `reminders_create`, or after the call failed. The
//! assistant then adds a short correction to the answer, so the user is never told that
//! something will happen when nothing will. This module only recognises the claim, in
//! English and French; it knows nothing of tools, storage or channels.

/// The note added to an answer that claims a reminder no call created.
pub const REMINDER_CORRECTION: &str = "(Note: no reminder was actually created.)";

/// The notice kind of the correction in the event stream.
pub const CORRECTION_NOTICE_KIND: &str = "correction";

/// Phrases that say a reminder now exists or that the assistant will remind the user,
/// lowercase, with straight apostrophes. Each must stand as whole words in the answer
/// ("reminder set" matches "Reminder set for 9:00" but not "reminder settings"). The list
/// is short on purpose: a claim missed costs a missing note, a false match a wrong one.
const CLAIMS: &[&str] = &[
    // English
    "i've set a reminder",
    "i have set a reminder",
    "i set a reminder",
    "i've set up a reminder",
    "i've created a reminder",
    "i have created a reminder",
    "i created a reminder",
    "i've added a reminder",
    "i've scheduled a reminder",
    "i have scheduled a reminder",
    "i scheduled a reminder",
    "reminder set",
    "reminder is set",
    "reminder has been set",
    "reminder created",
    "reminder has been created",
    "reminder scheduled",
    "reminder has been scheduled",
    "i'll remind you",
    "i will remind you",
    // French (tu and vous)
    "je te le rappellerai",
    "je vous le rappellerai",
    "je te rappellerai",
    "je vous rappellerai",
    "rappel créé",
    "rappel enregistré",
    "rappel programmé",
    "rappel a été créé",
    "rappel a été programmé",
    "rappel a été enregistré",
    "rappel est créé",
    "rappel est programmé",
    "j'ai créé un rappel",
    "j'ai programmé un rappel",
    "j'ai mis un rappel",
    "j'ai ajouté un rappel",
    "j'ai enregistré un rappel",
];

/// Whether `answer` claims that a reminder was set (see `CLAIMS`). Case and the typographic
/// apostrophe (’) do not matter.
pub fn claims_reminder(answer: &str) -> bool {
    let text = answer.to_lowercase().replace(['\u{2019}', '\u{2018}'], "'");
    CLAIMS.iter().any(|claim| contains_words(&text, claim))
}

/// `needle` in `haystack` with no letter or digit touching either end.
fn contains_words(haystack: &str, needle: &str) -> bool {
    let mut from = 0;
    while let Some(found) = haystack[from..].find(needle) {
        let start = from + found;
        let end = start + needle.len();
        let before = haystack[..start].chars().next_back();
        let after = haystack[end..].chars().next();
        let is_word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
        if !is_word(before) && !is_word(after) {
            return true;
        }
        // Step past the first character of this match (char boundary safe).
        from = start + haystack[start..].chars().next().map_or(1, char::len_utf8);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_in_english_and_french_are_recognised() {
        for answer in [
            "Done! I've set a reminder for tomorrow at 9.",
            "I’ve set a reminder to call the plumber.",
            "Reminder set: call the plumber at 9:00.",
            "OK, I'll remind you in 20 minutes.",
            "Sure — I will remind you every Monday.",
            "Your reminder has been created.",
            "C'est noté, je te le rappellerai demain à 9 h.",
            "Rappel créé pour demain 9 h.",
            "J’ai programmé un rappel pour lundi.",
            "Très bien, je vous rappellerai à 18 h.",
        ] {
            assert!(claims_reminder(answer), "{answer}");
        }
    }

    #[test]
    fn other_answers_are_not_claims() {
        for answer in [
            "It is 9:14 in Paris.",
            "Do you want me to set a reminder?",
            "You can change your reminder settings in the Schedules panel.",
            "I could not create the reminder: the time is in the past.",
            "Les rappels créés apparaissent dans le panneau Schedules.",
            "",
        ] {
            assert!(!claims_reminder(answer), "{answer}");
        }
    }

    #[test]
    fn whole_words_only() {
        assert!(contains_words("a reminder set.", "reminder set"));
        assert!(!contains_words("reminder settings", "reminder set"));
        assert!(!contains_words("xreminder set", "reminder set"));
        assert!(contains_words("éé reminder set", "reminder set"));
    }
}
