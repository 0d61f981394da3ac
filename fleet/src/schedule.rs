//! When waves may start: weekly windows in IANA time zones, and blackout dates.
//!
//! All of it is pure arithmetic on instants passed in; nothing here reads a clock.

use chrono::{
    DateTime, Datelike, Days, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, TimeZone, Utc,
    Weekday,
};
use chrono_tz::Tz;

/// How far ahead [`Schedule::next_start`] looks before it gives up.
const HORIZON_DAYS: i64 = 3 * 366;

/// A weekly window. Valid by construction: it opens on at least one day and lasts a while.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    days: Vec<Weekday>,
    from: NaiveTime,
    to: NaiveTime,
    tz: Tz,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("the window opens on no day")]
    NoDays,
    #[error("the window opens and closes at the same time, so it is never open")]
    Empty,
}

impl Window {
    /// A window opening at `from` on each of `days`, local to `tz`, closing at `to` the same
    /// day, or the next day when `to` is earlier than `from`.
    pub fn new(
        days: Vec<Weekday>,
        from: NaiveTime,
        to: NaiveTime,
        tz: Tz,
    ) -> Result<Window, WindowError> {
        if days.is_empty() {
            return Err(WindowError::NoDays);
        }
        if from == to {
            return Err(WindowError::Empty);
        }
        Ok(Window { days, from, to, tz })
    }

    /// The instants the window opens and closes when it opens on local date `date`.
    fn opening_on(&self, date: NaiveDate) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        if !self.days.contains(&date.weekday()) {
            return None;
        }
        let close_date = match self.to > self.from {
            true => date,
            false => date.checked_add_days(Days::new(1))?,
        };
        let open = to_utc(self.tz, date.and_time(self.from))?;
        let close = to_utc(self.tz, close_date.and_time(self.to))?;
        Some((open, close))
    }

    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        let today = at.with_timezone(&self.tz).date_naive();
        [today.pred_opt(), Some(today)]
            .into_iter()
            .flatten()
            .filter_map(|d| self.opening_on(d))
            .any(|(open, close)| open <= at && at < close)
    }

    /// The earliest instant at or after `at` inside the window.
    pub fn next_open(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.contains(at) {
            return Some(at);
        }
        let today = at.with_timezone(&self.tz).date_naive();
        (0..=8)
            .filter_map(|i| today.checked_add_days(Days::new(i)))
            .filter_map(|d| self.opening_on(d))
            .map(|(open, _)| open)
            .find(|open| *open >= at)
    }
}

/// Dates, inclusive, on which no wave starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Blackout {
    from: NaiveDate,
    to: NaiveDate,
    tz: Tz,
    pub reason: Option<String>,
}

impl Blackout {
    /// `None` when `to` is before `from`.
    pub fn new(from: NaiveDate, to: NaiveDate, tz: Tz, reason: Option<String>) -> Option<Blackout> {
        (from <= to).then_some(Blackout {
            from,
            to,
            tz,
            reason,
        })
    }

    /// From local midnight of the first day to local midnight after the last.
    fn span(&self) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        let start = to_utc(self.tz, self.from.and_time(NaiveTime::MIN))?;
        let end = to_utc(
            self.tz,
            self.to
                .checked_add_days(Days::new(1))?
                .and_time(NaiveTime::MIN),
        )?;
        Some((start, end))
    }

    /// The instant the blackout lifts, if `at` falls inside it.
    fn lifts_after(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let (start, end) = self.span()?;
        (start <= at && at < end).then_some(end)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Schedule {
    pub windows: Vec<Window>,
    pub blackouts: Vec<Blackout>,
}

impl Schedule {
    /// The earliest instant at or after `at` when a wave may start: inside a window (if any
    /// are set) and outside every blackout. `None` if there is none within three years.
    pub fn next_start(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let horizon = at + TimeDelta::days(HORIZON_DAYS);
        let mut t = at;
        while t <= horizon {
            if let Some(end) = self.blackouts.iter().filter_map(|b| b.lifts_after(t)).max() {
                t = end;
                continue;
            }
            if self.windows.is_empty() || self.windows.iter().any(|w| w.contains(t)) {
                return Some(t);
            }
            t = self.windows.iter().filter_map(|w| w.next_open(t)).min()?;
        }
        None
    }
}

/// A local date and time as an instant. A time skipped by a daylight-saving jump is moved
/// forward to the first instant that exists; an ambiguous one takes the earlier instant.
fn to_utc(tz: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    (0..=4)
        .map(|quarter| local + TimeDelta::minutes(15 * quarter))
        .find_map(|t| tz.from_local_datetime(&t).earliest())
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Europe::Berlin;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn hm(h: u32, m: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, m, 0).unwrap()
    }

    fn office_hours() -> Window {
        use Weekday::*;
        Window::new(vec![Mon, Tue, Wed, Thu], hm(10, 0), hm(16, 0), Berlin).unwrap()
    }

    #[test]
    fn a_window_is_honoured_in_its_own_time_zone() {
        let w = office_hours();
        // 2026-11-23 is a Monday; Berlin is UTC+1 in November.
        assert!(w.contains(utc("2026-11-23T09:00:00Z")));
        assert!(!w.contains(utc("2026-11-23T08:59:59Z")));
        assert!(!w.contains(utc("2026-11-23T15:00:00Z")));
        assert_eq!(
            w.next_open(utc("2026-11-23T15:30:00Z")),
            Some(utc("2026-11-24T09:00:00Z"))
        );
        // Thursday evening waits for Monday.
        assert_eq!(
            w.next_open(utc("2026-11-26T16:00:00Z")),
            Some(utc("2026-11-30T09:00:00Z"))
        );
    }

    #[test]
    fn a_window_that_crosses_midnight_closes_the_next_day() {
        let w = Window::new(vec![Weekday::Fri], hm(22, 0), hm(2, 0), Tz::UTC).unwrap();
        assert!(w.contains(utc("2026-11-28T01:00:00Z"))); // Saturday 01:00, opened Friday
        assert!(!w.contains(utc("2026-11-28T02:00:00Z")));
    }

    #[test]
    fn windows_that_never_open_are_refused() {
        assert_eq!(
            Window::new(vec![], hm(1, 0), hm(2, 0), Tz::UTC),
            Err(WindowError::NoDays)
        );
        assert_eq!(
            Window::new(vec![Weekday::Mon], hm(1, 0), hm(1, 0), Tz::UTC),
            Err(WindowError::Empty)
        );
    }

    #[test]
    fn blackouts_push_the_start_past_their_last_day() {
        let day = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        let schedule = Schedule {
            windows: vec![office_hours()],
            blackouts: vec![
                Blackout::new(day("2026-11-23"), day("2026-11-24"), Berlin, None).unwrap(),
            ],
        };
        // Monday and Tuesday are blacked out: Wednesday 10:00 Berlin.
        assert_eq!(
            schedule.next_start(utc("2026-11-23T09:30:00Z")),
            Some(utc("2026-11-25T09:00:00Z"))
        );
    }

    #[test]
    fn no_windows_means_any_time() {
        let t = utc("2026-11-29T03:00:00Z");
        assert_eq!(Schedule::default().next_start(t), Some(t));
    }
}
