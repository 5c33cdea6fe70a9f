//! Completed-contact histories, generated on demand: contact `i` of a user is a pure function
//! of (user, `i`), contacts are spread evenly over the 300 days before the user's creation
//! instant in ascending start order, so a date range maps to an index range arithmetically and
//! a page costs O(page size) whatever the history's length.

use std::ops::Range;

use chrono::{DateTime, SecondsFormat, TimeZone as _, Utc};
use serde_json::{Value, json};

/// The period a history covers, ending at the user's creation instant.
pub(crate) const SPAN_MS: i64 = 300 * 86_400_000;

/// One user's completed contacts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct History {
    pub user_index: u64,
    pub agent_id: u64,
    pub team_id: u64,
    pub count: u64,
    pub created: DateTime<Utc>,
}

/// SplitMix64: a cheap, well-mixed deterministic hash.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn rfc3339_ms(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|at| at.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

impl History {
    fn base_ms(&self) -> i64 {
        self.created.timestamp_millis() - SPAN_MS
    }

    /// Start instant of contact `i`, in milliseconds since the epoch; non-decreasing in `i`.
    pub fn start_ms(&self, i: u64) -> i64 {
        let offset = i128::from(i) * i128::from(SPAN_MS) / i128::from(self.count.max(1));
        self.base_ms() + i64::try_from(offset).unwrap_or(SPAN_MS)
    }

    /// The first contact index whose start is at or after `at_ms` (`count` if none).
    fn first_at_or_after(&self, at_ms: i64) -> u64 {
        let d = i128::from(at_ms) - i128::from(self.base_ms());
        if d <= 0 {
            return 0;
        }
        // floor(i * SPAN / count) >= d  <=>  i >= ceil(d * count / SPAN)
        let n = i128::from(self.count);
        let span = i128::from(SPAN_MS);
        let i = (d * n + span - 1) / span;
        u64::try_from(i.min(n)).unwrap_or(self.count)
    }

    /// Indices of contacts starting in `[start, end)`; open ends are unbounded.
    pub fn range(&self, start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>) -> Range<u64> {
        let lo = start.map_or(0, |at| self.first_at_or_after(at.timestamp_millis()));
        let hi = end.map_or(self.count, |at| {
            self.first_at_or_after(at.timestamp_millis())
        });
        lo..hi.max(lo)
    }

    /// The contact id of contact `i`: unique across users (user number in the high bits).
    pub fn contact_id(&self, i: u64) -> u64 {
        (self.user_index << 32) | (i & 0xFFFF_FFFF)
    }

    /// Contact `i` as `/contacts/completed` returns it.
    pub fn contact(&self, i: u64) -> Value {
        let id = self.contact_id(i);
        let h = mix(id);
        let start = self.start_ms(i);
        let duration_s = 30 + (h % 870) as i64;
        let (media_type, media_name) = match (h >> 16) % 10 {
            0 => (1, "Email"),
            1 => (3, "Chat"),
            _ => (4, "Phone Call"),
        };
        let skill = if (h >> 24).is_multiple_of(2) { 11 } else { 12 };
        let outbound = (h >> 32).is_multiple_of(4);
        let customer = format!("+1555{:07}", (h >> 40) % 10_000_000);
        let agent_line = format!("+1800{:07}", self.agent_id % 10_000_000);
        let (from, to) = if outbound {
            (agent_line, customer)
        } else {
            (customer, agent_line)
        };
        json!({
            "contactId": id,
            "masterContactId": id,
            "contactStartDate": rfc3339_ms(start),
            "contactEndDate": rfc3339_ms(start + duration_s * 1000),
            "agentId": self.agent_id,
            "teamId": self.team_id,
            "skillId": skill,
            "skillName": format!("Skill {skill}"),
            "mediaTypeId": media_type,
            "mediaTypeName": media_name,
            "isOutbound": outbound,
            "fromAddr": from,
            "toAddr": to,
            "totalDurationSeconds": duration_s,
            "abandoned": false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn history(count: u64) -> History {
        History {
            user_index: 3,
            agent_id: 1003,
            team_id: 103,
            count,
            created: Utc
                .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
                .single()
                .expect("valid date"),
        }
    }

    #[test]
    fn the_whole_history_lies_in_the_300_days_before_creation() {
        let h = history(1_000_000);
        assert_eq!(h.range(None, None), 0..1_000_000);
        let lookback = h.created - Duration::days(365);
        assert_eq!(h.range(Some(lookback), Some(h.created)), 0..1_000_000);
        assert!(h.start_ms(999_999) < h.created.timestamp_millis());
    }

    #[test]
    fn a_date_range_maps_to_exactly_the_contacts_inside_it() {
        for count in [1, 7, 1000, 12_345] {
            let h = history(count);
            let start = h.created - Duration::days(200);
            let end = h.created - Duration::days(100) + Duration::milliseconds(17);
            let range = h.range(Some(start), Some(end));
            for i in 0..count {
                let t = h.start_ms(i);
                let inside = t >= start.timestamp_millis() && t < end.timestamp_millis();
                assert_eq!(range.contains(&i), inside, "count {count}, contact {i}");
            }
        }
    }

    #[test]
    fn contact_ids_are_unique_across_users_and_deterministic() {
        let a = history(10);
        let b = History { user_index: 4, ..a };
        assert_ne!(a.contact_id(0), b.contact_id(0));
        assert_eq!(a.contact(5), a.contact(5));
        assert_eq!(a.contact(5)["agentId"], 1003);
    }

    #[test]
    fn an_empty_history_has_an_empty_range() {
        let h = history(0);
        assert_eq!(h.range(None, None), 0..0);
    }
}
