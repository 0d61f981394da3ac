//! When an HTTP/1.1 connection has been idle long enough to park, has taken too long to
//! send a request head, or to take any of a response. Pure: the connection looks at itself
//! every `period` and tells [`Vigil`] what it saw.
//!
//! A timer per connection that fires every `period` replaces a timer reset on every request
//! (hyper's header-read timeout and a park timer): on a busy connection a timer reset costs
//! about as much as a tenth of the whole request.

use std::time::Duration;

/// What the connection showed at one look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sight {
    /// Requests handed to the service since the connection began.
    pub requests: u64,
    /// Nothing half read, nothing unwritten, no request being answered.
    pub idle: bool,
    /// No request being answered, but bytes of the next one have begun: its head is still
    /// on its way (or the rest of a body nobody waits for any more).
    pub awaiting_head: bool,
    /// The last write to the client waits for room.
    pub write_blocked: bool,
    /// Writes to the client finished since the connection began.
    pub writes: u64,
}

/// What to do after a look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finding {
    Carry,
    /// Idle for at least the park delay: give up the buffers.
    Park,
    /// The head has been on its way for at least the header-read timeout: close.
    TooSlow,
    /// The client has taken nothing for at least the send timeout: close.
    Unread,
}

/// Counts looks in a row that saw the same state with no new request in between. `n` such
/// looks span at least `(n - 1) × period`.
#[derive(Debug)]
pub struct Vigil {
    period: Duration,
    park_looks: u32,
    slow_looks: u32,
    stuck_looks: u32,
    requests: u64,
    writes: u64,
    idle: u32,
    awaiting: u32,
    stuck: u32,
}

impl Vigil {
    /// Looks every `min(park_after, header_timeout, send_timeout) / 2`, so that each
    /// deadline is met within half its length.
    pub fn new(park_after: Duration, header_timeout: Duration, send_timeout: Duration) -> Self {
        let shortest = park_after.min(header_timeout).min(send_timeout);
        let period = (shortest / 2).max(Duration::from_millis(1));
        let looks =
            |span: Duration| (span.div_duration_f64(period).ceil() as u32).saturating_add(1);
        Vigil {
            period,
            park_looks: looks(park_after),
            slow_looks: looks(header_timeout),
            // A look that finds a write waiting and none finished since the last one speaks
            // for the whole period before it: no `+ 1` here.
            stuck_looks: (send_timeout.div_duration_f64(period).ceil() as u32).max(1),
            requests: 0,
            writes: 0,
            idle: 0,
            awaiting: 0,
            stuck: 0,
        }
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    pub fn look(&mut self, sight: Sight) -> Finding {
        let fresh = sight.requests != self.requests;
        self.requests = sight.requests;
        let streak = |count: u32, now: bool| match (now, fresh) {
            (false, _) => 0,
            (true, true) => 1,
            (true, false) => count.saturating_add(1),
        };
        self.idle = streak(self.idle, sight.idle);
        self.awaiting = streak(self.awaiting, sight.awaiting_head);
        let stuck = sight.write_blocked && sight.writes == self.writes;
        self.writes = sight.writes;
        self.stuck = streak(self.stuck, stuck);
        if self.awaiting >= self.slow_looks {
            Finding::TooSlow
        } else if self.stuck >= self.stuck_looks {
            Finding::Unread
        } else if self.idle >= self.park_looks {
            Finding::Park
        } else {
            Finding::Carry
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSY: Sight = Sight {
        requests: 0,
        idle: false,
        awaiting_head: false,
        write_blocked: false,
        writes: 0,
    };
    const IDLE: Sight = Sight { idle: true, ..BUSY };
    const SLOW: Sight = Sight {
        awaiting_head: true,
        ..BUSY
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// How long the state must hold, in periods, before the finding comes.
    fn periods_until(w: &mut Vigil, sight: Sight, finding: Finding) -> u32 {
        (0..1000).find(|_| w.look(sight) == finding).unwrap()
    }

    #[test]
    fn the_period_is_half_the_shorter_deadline() {
        assert_eq!(
            Vigil::new(ms(1000), ms(10_000), ms(60_000)).period(),
            ms(500)
        );
        assert_eq!(Vigil::new(ms(1000), ms(300), ms(60_000)).period(), ms(150));
    }

    #[test]
    fn an_idle_connection_parks_after_the_park_delay_and_no_sooner() {
        let mut w = Vigil::new(ms(1000), ms(10_000), ms(60_000));
        // Idle seen at looks 0, 1, 2: at least two periods (1 s) of idleness.
        assert_eq!(periods_until(&mut w, IDLE, Finding::Park), 2);
        let mut w = Vigil::new(ms(1000), ms(300), ms(60_000));
        // 150 ms periods: ceil(1000 / 150) = 7 periods, 1050 ms.
        assert_eq!(periods_until(&mut w, IDLE, Finding::Park), 7);
    }

    #[test]
    fn a_request_between_two_looks_restarts_the_idle_count() {
        let mut w = Vigil::new(ms(1000), ms(10_000), ms(60_000));
        assert_eq!(w.look(IDLE), Finding::Carry);
        assert_eq!(w.look(IDLE), Finding::Carry);
        // Served a request in between: idle again, but only known to be since this look.
        let after = Sight {
            requests: 1,
            ..IDLE
        };
        assert_eq!(w.look(after), Finding::Carry);
        assert_eq!(w.look(after), Finding::Carry);
        assert_eq!(w.look(after), Finding::Park);
    }

    #[test]
    fn busy_looks_break_the_idle_count() {
        let mut w = Vigil::new(ms(1000), ms(10_000), ms(60_000));
        for _ in 0..10 {
            assert_eq!(w.look(IDLE), Finding::Carry);
            assert_eq!(w.look(BUSY), Finding::Carry);
        }
    }

    #[test]
    fn a_head_that_takes_longer_than_the_header_timeout_closes_the_connection() {
        let mut w = Vigil::new(ms(1000), ms(300), ms(60_000));
        // 150 ms periods: the head was on its way at looks 0, 1, 2, that is for 300 ms.
        assert_eq!(periods_until(&mut w, SLOW, Finding::TooSlow), 2);
        let mut w = Vigil::new(ms(1000), ms(10_000), ms(60_000));
        assert_eq!(periods_until(&mut w, SLOW, Finding::TooSlow), 20);
    }

    const STUCK: Sight = Sight {
        write_blocked: true,
        ..BUSY
    };

    #[test]
    fn the_send_timeout_shortens_the_period_when_it_is_the_shortest() {
        assert_eq!(Vigil::new(ms(1000), ms(10_000), ms(400)).period(), ms(200));
    }

    #[test]
    fn a_client_that_takes_nothing_for_the_send_timeout_is_cut() {
        let mut w = Vigil::new(ms(1000), ms(10_000), ms(60_000));
        // 500 ms periods: 120 looks in a row, each finding nothing taken for the period
        // before it, span 60 s.
        assert_eq!(periods_until(&mut w, STUCK, Finding::Unread), 119);
        let mut w = Vigil::new(ms(1000), ms(10_000), ms(400));
        assert_eq!(periods_until(&mut w, STUCK, Finding::Unread), 1);
    }

    #[test]
    fn a_client_that_takes_a_little_between_looks_is_not_cut() {
        let mut w = Vigil::new(ms(1000), ms(10_000), ms(400));
        for writes in 0..100 {
            // Waiting for room at every look, but a write finished in between each time.
            let sight = Sight { writes, ..STUCK };
            assert_eq!(w.look(sight), Finding::Carry);
        }
    }

    #[test]
    fn a_response_waiting_for_its_backend_is_not_the_clients_doing() {
        let mut w = Vigil::new(ms(1000), ms(10_000), ms(400));
        // Nothing written, and nothing waiting to be: the backend is quiet.
        for _ in 0..100 {
            assert_eq!(w.look(BUSY), Finding::Carry);
        }
    }

    #[test]
    fn heads_that_complete_between_looks_are_not_slow() {
        let mut w = Vigil::new(ms(1000), ms(300), ms(60_000));
        // Every look sees a head on its way, but each time a new one: the client is quick.
        for requests in 0..100 {
            let sight = Sight { requests, ..SLOW };
            assert_eq!(w.look(sight), Finding::Carry);
        }
    }
}
