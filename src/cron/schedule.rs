//! Cron expressions and time zones: parsing (5 or 6 fields, `@nicknames`), the errors that
//! say which field is wrong, occurrences in a job's own zone, and the expression in words.
//! Pure functions of their inputs and the clock: no database, no scheduler, no HTTP.

use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

/// Longest expression accepted. The longest useful one (six lists of values) is far
/// shorter; the bound keeps a pasted page out of the parser and out of error messages.
pub const MAX_EXPRESSION_CHARS: usize = 200;

/// A parsed cron expression.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Six fields, seconds first.
    six_fields: String,
    cron: Cron,
}

impl Schedule {
    /// Parses a 5- or 6-field expression or an `@nickname`; the error says what is wrong.
    pub fn parse(expression: &str) -> Result<Schedule, String> {
        if expression.chars().count() > MAX_EXPRESSION_CHARS {
            return Err(format!(
                "the schedule is longer than {MAX_EXPRESSION_CHARS} characters: write a cron \
                 expression such as `0 8 * * *`"
            ));
        }
        let six_fields = to_six_fields(expression)?;
        match parse_six_fields(&six_fields) {
            Some(cron) => Ok(Schedule { six_fields, cron }),
            None => Err(explain_invalid(expression, &six_fields)),
        }
    }

    /// `parse`, and makes sure the expression ever happens (`0 0 30 2 *` never does).
    pub fn parse_checked(expression: &str) -> Result<Schedule, String> {
        let schedule = Schedule::parse(expression)?;
        if schedule.next_after(Utc::now(), Tz::UTC).is_none() {
            return Err(format!("cron expression `{}` never happens", expression.trim()));
        }
        Ok(schedule)
    }

    /// The expression with its seconds field, nicknames expanded.
    pub fn six_fields(&self) -> &str {
        &self.six_fields
    }

    /// The first occurrence strictly after `after`, in the zone `timezone`.
    pub fn next_after(&self, after: DateTime<Utc>, timezone: Tz) -> Option<DateTime<Utc>> {
        let local = whole_second(after).with_timezone(&timezone);
        self.cron.find_next_occurrence(&local, false).ok().map(|t| t.with_timezone(&Utc))
    }

    /// The latest occurrence at or before `at`, in the zone `timezone`.
    pub fn latest_at_or_before(&self, at: DateTime<Utc>, timezone: Tz) -> Option<DateTime<Utc>> {
        let local = whole_second(at).with_timezone(&timezone);
        self.cron.find_previous_occurrence(&local, true).ok().map(|t| t.with_timezone(&Utc))
    }

    /// The next `count` occurrences after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, timezone: Tz, count: usize) -> Vec<DateTime<Utc>> {
        let mut times = Vec::with_capacity(count);
        let mut cursor = after;
        while times.len() < count {
            match self.next_after(cursor, timezone) {
                Some(next) => {
                    times.push(next);
                    cursor = next;
                }
                None => break,
            }
        }
        times
    }

    /// The expression in words, with the zone when the zone matters ("every day at 08:00
    /// Europe/Paris", "every 5 seconds"). The one describer: the page shows what the API
    /// returns.
    pub fn describe(&self, timezone: Tz) -> String {
        let fields: Vec<&str> = self.six_fields.split(' ').collect();
        let &[second, minute, hour, dom, month, dow] = fields.as_slice() else {
            return self.six_fields.clone();
        };
        let words = super::describe::fields(second, minute, hour, dom, month, dow);
        // The zone only matters once the hour or the day is fixed.
        let zone_matters = ![hour, dom, month, dow].into_iter().all(super::describe::is_star);
        if zone_matters {
            format!("{words} {}", timezone.name())
        } else {
            words
        }
    }
}

/// Parses an IANA zone name, with a message that says what to write instead.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.trim().parse::<Tz>().map_err(|_| {
        let shown: String = name.chars().take(64).collect();
        format!("unknown time zone `{shown}`: use an IANA name such as Europe/Paris or UTC")
    })
}

/// The system's zone: `TZ`, else `/etc/timezone`, else the target of `/etc/localtime`,
/// else UTC.
pub fn system_timezone() -> Tz {
    let from_env = std::env::var("TZ").ok().map(|tz| tz.trim_start_matches(':').to_string());
    let from_file = || std::fs::read_to_string("/etc/timezone").ok();
    let from_link = || {
        let target = std::fs::read_link("/etc/localtime").ok()?;
        let target = target.to_string_lossy().into_owned();
        target.split_once("zoneinfo/").map(|(_, name)| name.to_string())
    };
    [from_env, from_file(), from_link()]
        .into_iter()
        .flatten()
        .find_map(|name| name.trim().parse::<Tz>().ok())
        .unwrap_or(Tz::UTC)
}

fn to_six_fields(expression: &str) -> Result<String, String> {
    let fields: Vec<&str> = expression.split_whitespace().collect();
    match fields.as_slice() {
        [] => Err("the schedule is empty: write a cron expression such as `0 8 * * *` (every \
                   day at 08:00)"
            .into()),
        [nickname] if nickname.starts_with('@') => {
            let six = match nickname.to_ascii_lowercase().as_str() {
                "@yearly" | "@annually" => "0 0 0 1 1 *",
                "@monthly" => "0 0 0 1 * *",
                "@weekly" => "0 0 0 * * 0",
                "@daily" | "@midnight" => "0 0 0 * * *",
                "@hourly" => "0 0 * * * *",
                _ => {
                    return Err(format!(
                        "unknown schedule `{nickname}`: use @hourly, @daily, @weekly, @monthly, \
                         @yearly or a cron expression"
                    ))
                }
            };
            Ok(six.to_string())
        }
        [_, _, _, _, _] => Ok(format!("0 {}", fields.join(" "))),
        [_, _, _, _, _, _] => Ok(fields.join(" ")),
        _ => Err(format!(
            "cron expression `{}` has {} fields: write 5 (minute hour day-of-month month \
             day-of-week) or 6 (a seconds field first)",
            expression.trim(),
            fields.len()
        )),
    }
}

/// croner's parse of exactly six fields; `None` when it rejects the expression. When both
/// day-of-month and day-of-week are restricted a day must match both (`dom_and_dow`), the
/// rule this scheduler has always had, unlike Vixie cron where either one is enough.
fn parse_six_fields(six_fields: &str) -> Option<Cron> {
    CronParser::builder()
        .seconds(Seconds::Required)
        .year(Year::Disallowed)
        .dom_and_dow(true)
        .build()
        .parse(six_fields)
        .ok()
}

/// Finds the first field the parser rejects on its own, to say which one is wrong.
fn explain_invalid(expression: &str, six_fields: &str) -> String {
    const FIELDS: [(&str, &str); 6] = [
        ("second", "0-59"),
        ("minute", "0-59"),
        ("hour", "0-23"),
        ("day-of-month", "1-31, L or W"),
        ("month", "1-12 or JAN-DEC"),
        ("day-of-week", "0-7 or SUN-SAT, where 0 and 7 are Sunday"),
    ];
    let fields: Vec<&str> = six_fields.split(' ').collect();
    for (index, value) in fields.iter().enumerate() {
        let mut probe = ["*"; 6];
        probe[index] = value;
        if parse_six_fields(&probe.join(" ")).is_none() {
            let (name, allowed) = FIELDS[index];
            return format!(
                "invalid cron expression `{}`: the {name} field `{value}` is not valid ({allowed})",
                expression.trim()
            );
        }
    }
    format!("invalid cron expression `{}`", expression.trim())
}

/// croner carries sub-second parts into the times it finds; occurrences are whole seconds.
fn whole_second(time: DateTime<Utc>) -> DateTime<Utc> {
    time.with_nanosecond(0).unwrap_or(time)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn check_next(expression: &str, timezone: &str, after: &str, expected: &str) {
        let schedule = Schedule::parse(expression).unwrap();
        let tz = parse_timezone(timezone).unwrap();
        let next = schedule.next_after(utc(after), tz).unwrap();
        assert_eq!(next, utc(expected), "{expression} in {timezone} after {after}");
    }

    fn check_invalid(expression: &str, expected_part: &str) {
        let err = Schedule::parse_checked(expression).unwrap_err();
        assert!(err.contains(expected_part), "{expression}: {err}");
    }

    #[test]
    fn five_and_six_field_expressions() {
        assert_eq!(Schedule::parse("0 8 * * *").unwrap().six_fields(), "0 0 8 * * *");
        assert_eq!(Schedule::parse(" */2  * * * * * ").unwrap().six_fields(), "*/2 * * * * *");
        assert_eq!(Schedule::parse("@daily").unwrap().six_fields(), "0 0 0 * * *");
        check_next("*/2 * * * * *", "UTC", "2026-01-01T10:00:01Z", "2026-01-01T10:00:02Z");
        check_next("*/2 * * * * *", "UTC", "2026-01-01T10:00:02.5Z", "2026-01-01T10:00:04Z");
        check_next("30 7 * * 1-5", "UTC", "2026-01-02T08:00:00Z", "2026-01-05T07:30:00Z");
    }

    #[test]
    fn day_of_month_and_day_of_week_must_both_match() {
        // The 13th that is a Friday: 2026-02-13, then 2026-03-13.
        check_next("0 9 13 * 5", "UTC", "2026-01-01T00:00:00Z", "2026-02-13T09:00:00Z");
        check_next("0 9 13 * 5", "UTC", "2026-02-14T00:00:00Z", "2026-03-13T09:00:00Z");
    }

    #[test]
    fn time_zones_follow_daylight_saving() {
        // Paris is UTC+1 in winter and UTC+2 in summer (from 2026-03-29).
        check_next("0 8 * * *", "Europe/Paris", "2026-01-10T12:00:00Z", "2026-01-11T07:00:00Z");
        check_next("0 8 * * *", "Europe/Paris", "2026-03-28T12:00:00Z", "2026-03-29T06:00:00Z");
        check_next("0 8 * * *", "America/New_York", "2026-06-01T00:00:00Z", "2026-06-01T12:00:00Z");
        // The offset at each occurrence is the zone's offset then, not when asked.
        let schedule = Schedule::parse("0 8 * * *").unwrap();
        let runs = schedule.upcoming(utc("2026-03-27T12:00:00Z"), Tz::Europe__Paris, 3);
        let hours: Vec<u32> = runs.iter().map(|t| t.hour()).collect();
        assert_eq!(hours, [7, 6, 6], "{runs:?}");
    }

    #[test]
    fn latest_occurrence_is_inclusive() {
        let schedule = Schedule::parse("0 8 * * *").unwrap();
        let at = utc("2026-01-10T08:00:00Z");
        assert_eq!(schedule.latest_at_or_before(at, Tz::UTC), Some(at));
        let later = utc("2026-01-10T09:30:12.345Z");
        assert_eq!(schedule.latest_at_or_before(later, Tz::UTC), Some(at));
    }

    #[test]
    fn invalid_expressions_say_what_is_wrong() {
        check_invalid("", "empty");
        check_invalid("* * *", "has 3 fields");
        check_invalid("1 2 3 4 5 6 7", "has 7 fields");
        check_invalid("0 25 * * *", "hour field `25`");
        check_invalid("61 * * * *", "minute field `61`");
        check_invalid("0 8 * * MOON", "day-of-week field");
        check_invalid("0 0 30 2 *", "never happens");
        check_invalid("@often", "unknown schedule");
        check_invalid(&"1,".repeat(150), "longer than 200 characters");
    }

    #[test]
    fn time_zone_names() {
        assert_eq!(parse_timezone("Europe/Paris").unwrap(), Tz::Europe__Paris);
        assert!(parse_timezone("Mars/Olympus").unwrap_err().contains("unknown time zone"));
        assert!(parse_timezone(&"x".repeat(10_000)).unwrap_err().len() < 200);
    }
}
