//! The auditor's report of `evidence export --format html`: one self-contained file (inline CSS
//! and SVG, no script, no network) with the SLA picture on top — how many leavers lost access
//! within the limit, a chart of every time to revoke against the limit — then the counts and
//! the full table.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::export::{Counts, Row};

/// What the report says about itself.
pub struct Meta<'a> {
    pub title: &'a str,
    pub period: String,
    pub generated_at: DateTime<Utc>,
    pub bucket: &'a str,
    /// The SLA limit most rows carry (seconds).
    pub sla_secs: Option<u64>,
    /// `Some(n, seed)` when the rows are a sample.
    pub sample: Option<(usize, u64)>,
    /// Rows in the period before sampling.
    pub population: usize,
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// "4 h", "90 min", "45 s".
pub fn human(secs: f64) -> String {
    if secs >= 2.0 * 3600.0 {
        format!("{:.1} h", secs / 3600.0)
    } else if secs >= 120.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{secs:.1} s")
    }
}

fn pct(n: usize, of: usize) -> String {
    if of == 0 {
        "–".to_owned()
    } else {
        format!("{:.1} %", 100.0 * n as f64 / of as f64)
    }
}

const CSS: &str = r#"
:root { --ok: #1a7f37; --bad: #cf222e; --wait: #9a6700; --ink: #1f2328; --muted: #59636e;
        --line: #d1d9e0; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--ink);
       margin: 0; padding: 28px 36px; max-width: 1280px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 10px; }
.sub { color: var(--muted); margin: 0 0 20px; }
.verdict { font-size: 18px; padding: 14px 18px; border-radius: 8px; margin: 0 0 18px;
           border: 1px solid var(--line); background: var(--bg); }
.verdict.ok { border-color: var(--ok); background: #dafbe1; }
.verdict.bad { border-color: var(--bad); background: #ffebe9; }
.tiles { display: grid; grid-template-columns: repeat(5, 1fr); gap: 12px; }
.tile { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; background: #fff; }
.tile .n { font-size: 28px; font-weight: 600; }
.tile .l { color: var(--muted); }
.tile.ok .n { color: var(--ok); } .tile.bad .n { color: var(--bad); }
.tile.wait .n { color: var(--wait); }
svg text { font: 12px -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; fill: var(--ink); }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 7px; text-align: left;
         vertical-align: top; }
th { background: var(--bg); position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.mono, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 11.5px; }
td.t { white-space: nowrap; }
.stats { color: var(--muted); margin: 10px 0 0; }
.yes { color: var(--ok); font-weight: 600; } .no { color: var(--bad); font-weight: 600; }
.pending { color: var(--wait); }
.legend span { margin-right: 16px; }
.dot { display: inline-block; width: 10px; height: 10px; border-radius: 50%;
       margin-right: 5px; vertical-align: -1px; }
footer { color: var(--muted); margin-top: 28px; font-size: 12.5px; }
@media print { body { padding: 0; } th { position: static; } }
"#;

/// The report.
pub fn render(meta: &Meta<'_>, rows: &[Row], counts: &Counts) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{CSS}</style></head><body>",
        esc(meta.title)
    );
    let _ = write!(h, "<h1>{}</h1>", esc(meta.title));
    let sample = meta.sample.map_or_else(String::new, |(n, seed)| {
        format!(
            " · a random sample of {n} of {} sagas (seed {seed}: the same seed picks the same sample)",
            meta.population
        )
    });
    let _ = write!(
        h,
        "<p class=\"sub\">Terminations that arrived {} · bucket <span class=\"mono\">{}</span> · \
         generated {} by cxone-offboard {}{}</p>",
        esc(&meta.period),
        esc(meta.bucket),
        meta.generated_at.format("%Y-%m-%d %H:%M UTC"),
        env!("CARGO_PKG_VERSION"),
        esc(&sample)
    );

    // The verdict in one sentence.
    let limit = meta
        .sla_secs
        .map_or_else(|| "the SLA".to_owned(), |s| human(s as f64));
    let revoked = counts.sla_met + counts.sla_breached;
    let (class, sentence) = if counts.sagas == 0 {
        ("", "No terminations arrived in this period.".to_owned())
    } else if counts.sla_breached == 0 && counts.manifests_failed == 0 {
        (
            "ok",
            format!(
                "All {} leavers whose access was due to be removed lost it within {limit}; \
                 {} of {} manifests verified.",
                counts.sla_met,
                counts.manifests_verified,
                counts.manifests_verified + counts.manifests_failed
            ),
        )
    } else {
        (
            "bad",
            format!(
                "{} of {} leavers did not lose access within {limit}; {} manifest(s) failed \
                 verification.",
                counts.sla_breached,
                revoked + counts.sla_pending,
                counts.manifests_failed
            ),
        )
    };
    let _ = write!(h, "<div class=\"verdict {class}\">{}</div>", esc(&sentence));

    let tile = |h: &mut String, class: &str, n: String, label: &str| {
        let _ = write!(
            h,
            "<div class=\"tile {class}\"><div class=\"n\">{n}</div><div class=\"l\">{}</div></div>",
            esc(label)
        );
    };
    h.push_str("<div class=\"tiles\">");
    tile(&mut h, "", counts.sagas.to_string(), "terminations");
    tile(
        &mut h,
        "ok",
        counts.sla_met.to_string(),
        &format!(
            "access removed within the SLA ({})",
            pct(counts.sla_met, counts.sagas)
        ),
    );
    tile(
        &mut h,
        if counts.sla_breached > 0 { "bad" } else { "" },
        counts.sla_breached.to_string(),
        "SLA breached (late, or still not revoked)",
    );
    tile(
        &mut h,
        if counts.sla_pending > 0 { "wait" } else { "" },
        counts.sla_pending.to_string(),
        "not revoked yet, still within the SLA",
    );
    tile(
        &mut h,
        if counts.manifests_failed > 0 {
            "bad"
        } else {
            "ok"
        },
        format!(
            "{}/{}",
            counts.manifests_verified,
            counts.manifests_verified + counts.manifests_failed
        ),
        "manifests verified (hash chain, document hash, archive checksum)",
    );
    h.push_str("</div>");

    h.push_str("<h2>Time to revoke against the SLA</h2>");
    h.push_str(&chart(rows, meta.sla_secs));
    let mut ttr: Vec<f64> = rows.iter().filter_map(|r| r.time_to_revoke_secs).collect();
    ttr.sort_by(f64::total_cmp);
    if !ttr.is_empty() {
        let at = |p: f64| ttr[((p * ttr.len() as f64).ceil() as usize).clamp(1, ttr.len()) - 1];
        let max = ttr[ttr.len() - 1];
        let share = meta
            .sla_secs
            .map(|s| format!(" — {:.2} % of the SLA", 100.0 * max / s as f64))
            .unwrap_or_default();
        let _ = write!(
            h,
            "<p class=\"stats\">Time to revoke: median {}, p99 {}, slowest {}{share}.</p>",
            human(at(0.5)),
            human(at(0.99)),
            human(max)
        );
    }
    h.push_str(
        "<p class=\"legend\"><span><i class=\"dot\" style=\"background:#1a7f37\"></i>within the SLA</span>\
         <span><i class=\"dot\" style=\"background:#cf222e\"></i>late</span>\
         <span><i class=\"dot\" style=\"background:#fff;border:2px solid #cf222e\"></i>not revoked, past due (drawn at the age it has now)</span>\
         <span><i class=\"dot\" style=\"background:#fff;border:2px solid #9a6700\"></i>not revoked, not yet due</span>\
         Time to revoke counts from the termination's effective time (or its arrival when it has none) to login blocked, sessions ended and keys revoked.</p>",
    );

    h.push_str("<h2>Sagas by status</h2><table style=\"width:auto\"><tr><th>status</th><th>sagas</th></tr>");
    for (status, n) in &counts.by_status {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"num\">{n}</td></tr>",
            esc(status)
        );
    }
    h.push_str("</table>");

    let _ = write!(h, "<h2>Every saga ({})</h2>", rows.len());
    h.push_str(
        "<table><tr><th>employee</th><th>status</th><th>reason</th><th>received</th>\
         <th>effective</th><th>revoked</th><th>time to revoke</th><th>SLA due</th>\
         <th>SLA met</th><th>manifest</th><th>verified</th></tr>",
    );
    let short = |s: Option<&str>| {
        s.map_or_else(
            || "–".to_owned(),
            |s| s.replacen('T', " ", 1).trim_end_matches('Z').to_owned(),
        )
    };
    for r in rows {
        let flag = |v: Option<bool>| match v {
            Some(true) => "<span class=\"yes\">yes</span>".to_owned(),
            Some(false) => "<span class=\"no\">no</span>".to_owned(),
            None => "<span class=\"pending\">–</span>".to_owned(),
        };
        let manifest = r.manifest_uri.as_deref().map_or_else(
            || "–".to_owned(),
            |u| {
                format!(
                    "<span class=\"mono\" title=\"sha256 {}\">{}</span>",
                    esc(r.manifest_sha256.as_deref().unwrap_or("")),
                    esc(u)
                )
            },
        );
        let _ = write!(
            h,
            "<tr><td class=\"mono\" title=\"saga {} · event {}\">{}</td><td>{}</td><td>{}</td>\
             <td class=\"mono t\">{}</td><td class=\"mono t\">{}</td><td class=\"mono t\">{}</td>\
             <td class=\"num\">{}</td><td class=\"mono t\">{}</td><td>{}</td><td>{manifest}</td>\
             <td>{}</td></tr>",
            esc(&r.saga_id),
            esc(&r.event_id),
            esc(&r.external_id),
            esc(&r.status),
            esc(r.reason.as_deref().unwrap_or("–")),
            esc(&short(Some(&r.received_at))),
            esc(&short(r.effective_at.as_deref())),
            esc(&short(r.revoked_at.as_deref())),
            r.time_to_revoke_secs.map_or_else(|| "–".to_owned(), human),
            esc(&short(r.sla_due_at.as_deref())),
            flag(r.sla_met),
            flag(r.manifest_verified),
        );
    }
    h.push_str("</table>");
    h.push_str(
        "<footer>Each manifest is an immutable object (written once) whose steps form a SHA-256 \
         hash chain and whose whole document carries its own SHA-256; \"verified\" means both \
         were recomputed from the stored bytes, the manifest's hash matches the one the saga \
         recorded when it wrote it, and the interaction archive it names was read back and \
         matched its checksum, record count and size. Anyone can repeat the check for one row \
         with <span class=\"mono\">cxone-offboard verify MANIFEST_URI</span>.</footer>",
    );
    h.push_str("</body></html>\n");
    h
}

/// A scatter of time to revoke (hours) by arrival, with the SLA as a line.
fn chart(rows: &[Row], sla_secs: Option<u64>) -> String {
    let (w, hgt) = (1200.0_f64, 340.0_f64);
    let (left, right, top, bottom) = (70.0, 20.0, 16.0, 46.0);
    let pw = w - left - right;
    let ph = hgt - top - bottom;
    let parse = |s: &str| {
        DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    };
    let now = Utc::now();
    struct Point {
        t: DateTime<Utc>,
        secs: f64,
        kind: &'static str,
    }
    let mut points = Vec::new();
    for r in rows {
        let Some(t) = parse(&r.received_at) else {
            continue;
        };
        match (r.time_to_revoke_secs, r.sla_met) {
            (Some(s), Some(false)) => points.push(Point {
                t,
                secs: s,
                kind: "late",
            }),
            (Some(s), _) => points.push(Point {
                t,
                secs: s,
                kind: "ok",
            }),
            (None, met) => {
                // Not revoked: drawn at the age the SLA clock shows now.
                let start = r.effective_at.as_deref().and_then(parse).unwrap_or(t);
                points.push(Point {
                    t,
                    secs: (now - start).num_seconds().max(0) as f64,
                    kind: if met == Some(false) {
                        "overdue"
                    } else {
                        "waiting"
                    },
                });
            }
        }
    }
    let mut svg = format!(
        "<svg viewBox=\"0 0 {w} {hgt}\" width=\"100%\" role=\"img\" \
         aria-label=\"time to revoke per saga against the SLA\">"
    );
    if points.is_empty() {
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no revocations in this period</text></svg>",
            w / 2.0,
            hgt / 2.0
        );
        return svg;
    }
    let t0 = points.iter().map(|p| p.t).min().unwrap_or(now);
    let t1 = points.iter().map(|p| p.t).max().unwrap_or(now);
    let span = (t1 - t0).num_seconds().max(1) as f64;
    let sla = sla_secs.map(|s| s as f64);
    // A log scale: a revocation in seconds and an SLA in hours both stay readable.
    let lo = 0.1_f64;
    let hi = points
        .iter()
        .map(|p| p.secs)
        .fold(sla.unwrap_or(0.0) * 2.0, f64::max)
        .max(120.0);
    let (llo, lhi) = (lo.log10(), hi.log10());
    let x = |t: DateTime<Utc>| left + pw * ((t - t0).num_seconds() as f64 / span);
    let y = |v: f64| top + ph * (1.0 - (v.max(lo).log10() - llo) / (lhi - llo));
    let _ = write!(
        svg,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"#fff\" stroke=\"#d1d9e0\"/>"
    );
    for (v, label) in [
        (0.1, "0.1 s"),
        (1.0, "1 s"),
        (10.0, "10 s"),
        (60.0, "1 min"),
        (600.0, "10 min"),
        (3600.0, "1 h"),
        (6.0 * 3600.0, "6 h"),
        (86400.0, "1 day"),
        (7.0 * 86400.0, "1 week"),
    ] {
        if v > hi {
            break;
        }
        let yy = y(v);
        let _ = write!(
            svg,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#eef1f4\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
            left + pw,
            left - 8.0,
            yy + 4.0,
        );
    }
    let _ = write!(
        svg,
        "<text transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">time to revoke (log scale)</text>",
        top + ph / 2.0
    );
    for (frac, anchor) in [(0.0, "start"), (0.5, "middle"), (1.0, "end")] {
        let t = t0 + chrono::Duration::seconds((span * frac) as i64);
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"{anchor}\">{}</text>",
            left + pw * frac,
            top + ph + 18.0,
            t.format("%Y-%m-%d %H:%M")
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#59636e\">termination arrived (UTC)</text>",
        left + pw / 2.0,
        hgt - 6.0
    );
    if let Some(s) = sla {
        let yy = y(s);
        let _ = write!(
            svg,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#cf222e\" \
             stroke-width=\"2\" stroke-dasharray=\"8 5\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#cf222e\">SLA {}</text>",
            left + pw,
            left + pw - 6.0,
            yy - 6.0,
            human(s)
        );
    }
    for p in &points {
        let (fill, stroke) = match p.kind {
            "ok" => ("#1a7f37", "#1a7f37"),
            "late" => ("#cf222e", "#cf222e"),
            "overdue" => ("#fff", "#cf222e"),
            _ => ("#fff", "#9a6700"),
        };
        let _ = write!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{fill}\" fill-opacity=\"0.75\" \
             stroke=\"{stroke}\" stroke-width=\"1.5\"/>",
            x(p.t),
            y(p.secs.min(hi))
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_from_the_data_is_escaped() {
        let row = Row {
            saga_id: "s".into(),
            external_id: "<script>alert(1)</script>".into(),
            event_id: "e\"x".into(),
            reason: Some("a&b".into()),
            effective_at: None,
            received_at: "2026-11-27T10:00:00Z".into(),
            revoked_at: None,
            verified_at: None,
            completed_at: None,
            status: "RUNNING".into(),
            time_to_revoke_secs: None,
            sla_due_at: None,
            sla_met: None,
            manifest_uri: None,
            manifest_sha256: None,
            manifest_verified: None,
        };
        let meta = Meta {
            title: "t",
            period: "p".into(),
            generated_at: Utc::now(),
            bucket: "b",
            sla_secs: Some(14400),
            sample: None,
            population: 1,
        };
        let html = render(
            &meta,
            std::slice::from_ref(&row),
            &super::super::export::counts(std::slice::from_ref(&row)),
        );
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("a&amp;b"));
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no network resource"
        );
    }
}
