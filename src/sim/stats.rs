//! Request counts: per `METHOD route-template` and answered status, the total of
//! authenticated requests and the number throttled by the rate limiter.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

/// The status key under which connection resets are counted.
pub(crate) const RESET: &str = "reset";

#[derive(Debug, Default)]
pub(crate) struct Stats {
    total: u64,
    throttled: u64,
    by_route: HashMap<String, HashMap<String, u64>>,
    /// Requests being served now, by route: lets a test wait until a call is in progress.
    in_flight: HashMap<String, u64>,
}

impl Stats {
    /// Counts one answer; `authenticated` requests also count in `total`.
    pub fn record(&mut self, route: &str, status: &str, authenticated: bool) {
        if authenticated {
            self.total += 1;
        }
        let statuses = match self.by_route.get_mut(route) {
            Some(statuses) => statuses,
            None => self.by_route.entry(route.to_owned()).or_default(),
        };
        match statuses.get_mut(status) {
            Some(n) => *n += 1,
            None => {
                statuses.insert(status.to_owned(), 1);
            }
        }
    }

    pub fn started(&mut self, route: &str) {
        *self.in_flight.entry(route.to_owned()).or_default() += 1;
    }

    pub fn finished(&mut self, route: &str) {
        if let Some(n) = self.in_flight.get_mut(route) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(route);
            }
        }
    }

    pub fn throttled(&mut self) {
        self.throttled += 1;
    }

    pub fn to_json(&self) -> Value {
        let by_route: BTreeMap<&String, BTreeMap<&String, &u64>> = self
            .by_route
            .iter()
            .map(|(route, statuses)| (route, statuses.iter().collect()))
            .collect();
        let in_flight: BTreeMap<&String, &u64> = self.in_flight.iter().collect();
        json!({
            "total": self.total,
            "throttled": self.throttled,
            "by_route": by_route,
            "in_flight": in_flight,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_route_and_status() {
        let mut stats = Stats::default();
        stats.record("GET /a", "200", true);
        stats.record("GET /a", "200", true);
        stats.record("GET /a", "429", true);
        stats.throttled();
        stats.record("POST /auth/token", "200", false);
        let json = stats.to_json();
        assert_eq!(json["total"], 3);
        assert_eq!(json["throttled"], 1);
        assert_eq!(json["by_route"]["GET /a"]["200"], 2);
        assert_eq!(json["by_route"]["POST /auth/token"]["200"], 1);
    }
}
