//! A parsed cron expression in words ("every weekday (Monday to Friday) at 07:30"): common
//! patterns get a sentence, anything else a field-by-field reading; and a one-shot `at …`
//! with the time it really runs when a clock change moves it. Only wording: fields and
//! instants come from `schedule::Schedule` (already valid, six fields); zones are added there.

use chrono::{Datelike, NaiveDateTime, Timelike};

const DAY_NAMES: [&str; 7] =
    ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
const MONTH_NAMES: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAY_ALIASES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
const MONTH_ALIASES: [&str; 12] =
    ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"];

/// The six fields (seconds first) in words, without the zone.
pub(super) fn fields(
    second: &str,
    minute: &str,
    hour: &str,
    dom: &str,
    month: &str,
    dow: &str,
) -> String {
    let all_days = is_star(dom) && is_star(month) && is_star(dow);
    let rest_star = is_star(minute) && is_star(hour) && all_days;
    // Sub-minute and sub-hour repeats.
    if second == "*" && rest_star {
        return "every second".into();
    }
    if let (Some(n), true) = (every(second), rest_star) {
        return every_n(n, "second");
    }
    if second == "0" && rest_star {
        return "every minute".into();
    }
    if let (Some(s), true) = (number(second).filter(|s| *s <= 59), rest_star) {
        return format!("every minute at :{s:02}");
    }
    if let (Some(n), true) = (every(minute), second == "0" && is_star(hour) && all_days) {
        return every_n(n, "minute");
    }
    if let Some(time) = time_of_day(second, minute, hour) {
        let repeats = time.starts_with("every");
        if all_days {
            return if repeats { time } else { format!("every day {time}") };
        }
        if is_star(dom) && is_star(month) {
            if let Some(days) = days(dow) {
                return format!("{days}{}{time}", if repeats { ", " } else { " " });
            }
        }
        if let (Some(day), true) = (number(dom), is_star(dow)) {
            if is_star(month) {
                return format!("on the {} of every month {time}", ordinal(day));
            }
            if let Some(months) = months(month) {
                return format!("every year on {day} {months} {time}");
            }
        }
        if dom.eq_ignore_ascii_case("L") && is_star(dow) {
            if is_star(month) {
                return format!("on the last day of every month {time}");
            }
            if let Some(months) = months(month) {
                return format!("on the last day of {months} {time}");
            }
        }
        if let (Some(day), true) = (weekday_of_month(dow), is_star(dom)) {
            if is_star(month) {
                return format!("on {day} of every month {time}");
            }
            if let Some(months) = months(month) {
                return format!("on {day} of {months} {time}");
            }
        }
    }
    field_by_field(second, minute, hour, dom, month, dow)
}

/// A weekday field naming one weekday of the month, as croner reads it: `5L` or `FRIL` the
/// last Friday, `1#2` or `MON#2` the second Monday (1 to 5).
fn weekday_of_month(field: &str) -> Option<String> {
    let upper = field.to_ascii_uppercase();
    let (day, which) = if let Some(day) = upper.strip_suffix('L') {
        (day, "last")
    } else {
        let (day, n) = upper.split_once('#')?;
        let which = match n {
            "1" => "first",
            "2" => "second",
            "3" => "third",
            "4" => "fourth",
            "5" => "fifth",
            _ => return None,
        };
        (day, which)
    };
    let [day] = list_values(day, &DAY_ALIASES, 0, 7)?[..] else { return None };
    Some(format!("the {which} {}", DAY_NAMES[(day % 7) as usize]))
}

/// How a one-shot's local time falls on its day's clock, as `schedule` found it.
pub(super) enum OnTheClock {
    /// It happens once.
    Once,
    /// The clocks go back over it, so it happens twice: the first one runs.
    Twice,
    /// The clocks go forward over it: it runs at `runs`, when they resume.
    Skipped { runs: NaiveDateTime },
}

/// A one-shot in words at the local time it runs ("once, on Friday 27 November 2026 at 09:00
/// Europe/Paris"), saying so when a clock change that day moves it or makes it ambiguous.
pub(super) fn once(at: NaiveDateTime, on_the_clock: OnTheClock, zone: &str) -> String {
    let runs = match on_the_clock {
        OnTheClock::Skipped { runs } => runs,
        OnTheClock::Once | OnTheClock::Twice => at,
    };
    let said = format!(
        "once, on {} {} {} {} at {} {zone}",
        weekday_name(runs.weekday()),
        runs.day(),
        month_name(runs.month()),
        runs.year(),
        clock_time(runs),
    );
    match on_the_clock {
        OnTheClock::Once => said,
        OnTheClock::Twice => {
            format!("{said} (the first of the two {}s that day: clocks go back)", clock_time(at))
        }
        OnTheClock::Skipped { runs } => {
            let skipped = if runs.date() == at.date() {
                format!("{} does not exist that day", clock_time(at))
            } else {
                format!("{} {} does not exist", at.format("%Y-%m-%d"), clock_time(at))
            };
            format!("{said} ({skipped}: clocks go forward)")
        }
    }
}

/// A weekday's English name ("Friday").
fn weekday_name(day: chrono::Weekday) -> &'static str {
    DAY_NAMES[day.num_days_from_sunday() as usize]
}

/// A month's English name; `month` is 1 to 12.
fn month_name(month: u32) -> &'static str {
    MONTH_NAMES[(month.clamp(1, 12) - 1) as usize]
}

/// `*` or `?`: any value.
pub(super) fn is_star(field: &str) -> bool {
    field == "*" || field == "?"
}

/// `HH:MM`, with `:SS` only when the seconds are not zero.
fn clock_time(at: NaiveDateTime) -> String {
    at.format(if at.second() == 0 { "%H:%M" } else { "%H:%M:%S" }).to_string()
}

/// `n` in `*/n` or `0/n`.
fn every(field: &str) -> Option<u32> {
    let step = field.strip_prefix("*/").or_else(|| field.strip_prefix("0/"))?;
    number(step)
}

/// "every minute" for a step of 1, "every 5 minutes" otherwise.
fn every_n(n: u32, unit: &str) -> String {
    if n == 1 {
        format!("every {unit}")
    } else {
        format!("every {n} {unit}s")
    }
}

fn number(field: &str) -> Option<u32> {
    if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok()
}

/// The time-of-day part: "at 08:00", "at 08:00 and 18:30", "every 2 hours at :15"…
fn time_of_day(second: &str, minute: &str, hour: &str) -> Option<String> {
    let second = number(second).filter(|s| *s <= 59)?;
    let seconds = if second == 0 { String::new() } else { format!(":{second:02}") };
    let minute = number(minute).filter(|m| *m <= 59)?;
    if is_star(hour) {
        return Some(format!("every hour at :{minute:02}{seconds}"));
    }
    if let Some(n) = every(hour) {
        return Some(format!("{} at :{minute:02}{seconds}", every_n(n, "hour")));
    }
    let hours: Option<Vec<u32>> = hour.split(',').map(|h| number(h).filter(|h| *h <= 23)).collect();
    let times: Vec<String> =
        hours?.iter().map(|h| format!("{h:02}:{minute:02}{seconds}")).collect();
    Some(format!("at {}", join_words(&times)))
}

fn days(field: &str) -> Option<String> {
    let mut days: Vec<u32> =
        list_values(field, &DAY_ALIASES, 0, 7)?.iter().map(|d| d % 7).collect();
    days.sort_unstable();
    days.dedup();
    Some(match days.as_slice() {
        [1, 2, 3, 4, 5] => "every weekday (Monday to Friday)".into(),
        [0, 6] => "every weekend day".into(),
        all if all.len() == 7 => "every day".into(),
        some => {
            let names: Vec<String> = some.iter().map(|d| DAY_NAMES[*d as usize].into()).collect();
            format!("every {}", join_words(&names))
        }
    })
}

fn months(field: &str) -> Option<String> {
    let months = list_values(field, &MONTH_ALIASES, 1, 12)?;
    if months.contains(&0) {
        return None;
    }
    let names: Vec<String> = months.iter().map(|m| MONTH_NAMES[*m as usize - 1].into()).collect();
    Some(join_words(&names))
}

/// The values of a list of plain numbers, names or ranges (`1,3,5`, `MON-FRI`); `None` for
/// anything else (steps, `L`, `#`), which the field-by-field reading shows as written.
/// `first` is the number of the first alias (0 for Sunday, 1 for January).
fn list_values(field: &str, aliases: &[&str], first: u32, max: u32) -> Option<Vec<u32>> {
    let value = |part: &str| -> Option<u32> {
        let upper = part.to_ascii_uppercase();
        match aliases.iter().position(|alias| *alias == upper) {
            Some(index) => Some(index as u32 + first),
            None => number(part).filter(|n| *n <= max),
        }
    };
    let mut values = Vec::new();
    for part in field.split(',') {
        match part.split('-').collect::<Vec<_>>().as_slice() {
            [single] => values.push(value(single)?),
            [from, to] => {
                let (from, to) = (value(from)?, value(to)?);
                if from > to {
                    return None;
                }
                values.extend(from..=to);
            }
            _ => return None,
        }
    }
    Some(values)
}

fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// "a", "a and b", "a, b and c".
fn join_words(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

fn field_by_field(
    second: &str,
    minute: &str,
    hour: &str,
    dom: &str,
    month: &str,
    dow: &str,
) -> String {
    let second = if second == "0" { "*" } else { second };
    let parts: Vec<String> = [
        ("second", second),
        ("minute", minute),
        ("hour", hour),
        ("day of month", dom),
        ("month", month),
        ("weekday", dow),
    ]
    .into_iter()
    .filter(|(_, value)| !is_star(value))
    .map(|(name, value)| format!("{name} {value}"))
    .collect();
    if parts.is_empty() {
        return "every second".into();
    }
    let mut text = format!("when {}", join_words(&parts));
    if !is_star(dom) && !is_star(dow) {
        text.push_str(" (both the day and the weekday must match)");
    }
    text
}

#[cfg(test)]
mod tests {
    use chrono_tz::Tz;

    use crate::cron::schedule::Schedule;

    fn check(expression: &str, timezone: Tz, expected: &str) {
        let schedule = Schedule::parse(expression).unwrap();
        assert_eq!(schedule.describe(timezone), expected, "{expression}");
    }

    #[test]
    fn repeats_within_the_hour_need_no_zone() {
        check("* * * * * *", Tz::Europe__Paris, "every second");
        check("*/5 * * * * *", Tz::Europe__Paris, "every 5 seconds");
        check("* * * * *", Tz::Europe__Paris, "every minute");
        check("7 * * * * *", Tz::Europe__Paris, "every minute at :07");
        check("*/15 * * * *", Tz::Europe__Paris, "every 15 minutes");
        check("@hourly", Tz::Europe__Paris, "every hour at :00");
        check("30 15 * * * *", Tz::UTC, "every hour at :15:30");
    }

    #[test]
    fn a_step_of_one_reads_as_every_unit() {
        check("*/1 * * * *", Tz::UTC, "every minute");
        check("0 */1 * * * *", Tz::UTC, "every minute");
        check("0/1 * * * *", Tz::UTC, "every minute");
        check("*/1 * * * * *", Tz::UTC, "every second");
        check("0/1 * * * * *", Tz::UTC, "every second");
        check("15 */1 * * *", Tz::UTC, "every hour at :15 UTC");
        check("0 0 */1 * * *", Tz::UTC, "every hour at :00 UTC");
        check("0 */1 * * 1", Tz::UTC, "every Monday, every hour at :00 UTC");
        // Other steps keep their number.
        check("*/2 * * * *", Tz::UTC, "every 2 minutes");
        check("*/2 * * * * *", Tz::UTC, "every 2 seconds");
        check("0 */3 * * *", Tz::UTC, "every 3 hours at :00 UTC");
    }

    #[test]
    fn times_of_day_and_days() {
        let paris = Tz::Europe__Paris;
        check("0 8 * * *", paris, "every day at 08:00 Europe/Paris");
        check("@daily", Tz::UTC, "every day at 00:00 UTC");
        check("30 8,18 * * *", Tz::UTC, "every day at 08:30 and 18:30 UTC");
        check("15 */2 * * *", Tz::UTC, "every 2 hours at :15 UTC");
        check("30 7 * * 1-5", paris, "every weekday (Monday to Friday) at 07:30 Europe/Paris");
        check("30 7 * * MON-FRI", Tz::UTC, "every weekday (Monday to Friday) at 07:30 UTC");
        check("0 10 * * 6,0", Tz::UTC, "every weekend day at 10:00 UTC");
        check("0 10 * * 7,6", Tz::UTC, "every weekend day at 10:00 UTC");
        check("0 9 * * 1,3,5", Tz::UTC, "every Monday, Wednesday and Friday at 09:00 UTC");
        check("0 9 * * 0-6", Tz::UTC, "every day at 09:00 UTC");
        check("@weekly", Tz::UTC, "every Sunday at 00:00 UTC");
        check("5 * * * 1", Tz::UTC, "every Monday, every hour at :05 UTC");
    }

    #[test]
    fn days_of_the_month_and_year() {
        check("@monthly", Tz::UTC, "on the 1st of every month at 00:00 UTC");
        check("0 12 22 * *", Tz::UTC, "on the 22nd of every month at 12:00 UTC");
        check("0 12 13 * *", Tz::UTC, "on the 13th of every month at 12:00 UTC");
        check("0 12 L * *", Tz::UTC, "on the last day of every month at 12:00 UTC");
        check("@yearly", Tz::UTC, "every year on 1 January at 00:00 UTC");
        check("0 9 24 DEC *", Tz::UTC, "every year on 24 December at 09:00 UTC");
        check("0 9 1 1,7 *", Tz::UTC, "every year on 1 January and July at 09:00 UTC");
    }

    #[test]
    fn one_shots_say_when_they_really_run() {
        check(
            "at 2027-03-27 02:30",
            Tz::Europe__Berlin,
            "once, on Saturday 27 March 2027 at 02:30 Europe/Berlin",
        );
        // Skipped by the clocks going forward: it runs when they resume.
        check(
            "at 2027-03-28 02:30",
            Tz::Europe__Berlin,
            "once, on Sunday 28 March 2027 at 03:00 Europe/Berlin (02:30 does not exist that \
             day: clocks go forward)",
        );
        check(
            "at 2027-03-14 02:15:30",
            Tz::America__New_York,
            "once, on Sunday 14 March 2027 at 03:00 America/New_York (02:15:30 does not exist \
             that day: clocks go forward)",
        );
        check(
            "at 2027-10-03 02:10",
            Tz::Australia__Lord_Howe,
            "once, on Sunday 3 October 2027 at 02:30 Australia/Lord_Howe (02:10 does not exist \
             that day: clocks go forward)",
        );
        // Twice on the clock when they go back: the first one.
        check(
            "at 2027-10-31 02:30",
            Tz::Europe__Berlin,
            "once, on Sunday 31 October 2027 at 02:30 Europe/Berlin (the first of the two 02:30s \
             that day: clocks go back)",
        );
        // The same wall-clock time is ordinary in a zone without the change.
        check("at 2027-03-28 02:30", Tz::UTC, "once, on Sunday 28 March 2027 at 02:30 UTC");
    }

    #[test]
    fn anything_else_is_read_field_by_field() {
        check(
            "0 9 13 * 5",
            Tz::UTC,
            "when minute 0, hour 9, day of month 13 and weekday 5 (both the day and the \
             weekday must match) UTC",
        );
        check("*/10 1-5 * * *", Tz::UTC, "when minute */10 and hour 1-5 UTC");
        check("0 9 13 * 5L", Tz::UTC, "when minute 0, hour 9, day of month 13 and weekday 5L (both the day and the weekday must match) UTC");
    }

    /// The words for `L` and `#` say the days the schedule runs on (checked on its runs).
    #[test]
    fn a_weekday_of_the_month_is_said_in_words() {
        use chrono::{Datelike, TimeZone, Utc, Weekday};
        check("0 0 9 * * 1#2", Tz::UTC, "on the second Monday of every month at 09:00 UTC");
        check("30 18 * * FRIL", Tz::UTC, "on the last Friday of every month at 18:30 UTC");
        check(
            "0 9 * 3,9 sun#1",
            Tz::UTC,
            "on the first Sunday of March and September at 09:00 UTC",
        );
        check("0 12 L 2 *", Tz::UTC, "on the last day of February at 12:00 UTC");
        let runs = |expression: &str| {
            let start = Utc.with_ymd_and_hms(2026, 11, 28, 0, 0, 0).unwrap();
            Schedule::parse(expression).unwrap().upcoming(start, Tz::UTC, 6)
        };
        for run in runs("0 0 9 * * 1#2") {
            assert_eq!((run.weekday(), (run.day() - 1) / 7), (Weekday::Mon, 1), "{run}");
        }
        for run in runs("30 18 * * FRIL") {
            let next_week = run + chrono::Duration::days(7);
            assert_eq!(run.weekday(), Weekday::Fri, "{run}");
            assert_ne!(next_week.month(), run.month(), "{run} is the last Friday");
        }
        for run in runs("0 9 * 3,9 sun#1") {
            assert!([3, 9].contains(&run.month()) && run.day() <= 7, "{run}");
            assert_eq!(run.weekday(), Weekday::Sun, "{run}");
        }
    }
}
