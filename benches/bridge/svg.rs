//! Plots as hand-written SVG (no plotting dependency): grouped throughput bars with min–max whiskers,
//! and latency CDFs on a logarithmic time axis.

use std::fmt::Write as _;

use crate::lab::Impl;
use crate::report::Agg;
use crate::TPUT_CASES;

const COLORS: [&str; 4] = ["#888888", "#1f77b4", "#d62728", "#ff7f0e"];

fn color(name: &str) -> &'static str {
    match name {
        "baseline" => COLORS[0],
        "mqtt-uplink" => COLORS[1],
        "mosquitto-default" => COLORS[2],
        _ => COLORS[3],
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn header(w: u32, h: u32, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        w / 2,
        esc(title)
    )
}

fn legend(o: &mut String, x: f64, y: f64, names: &[&str]) {
    for (k, n) in names.iter().enumerate() {
        let yy = y + k as f64 * 16.0;
        let _ = writeln!(
            o,
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            yy - 10.0,
            color(n),
            x + 16.0,
            yy,
            esc(n)
        );
    }
}

/// Nice upper bound for an axis.
fn nice(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= max {
            return m * p;
        }
    }
    10.0 * p
}

/// Median delivered msg/s per path × (QoS, payload), one bar per implementation, whiskers min–max.
pub fn throughput(a: &Agg) -> String {
    let groups: Vec<_> = a
        .paths
        .iter()
        .flat_map(|p| TPUT_CASES.iter().map(move |c| (*p, *c)))
        .collect();
    let (left, top, bottom, gw) = (70.0, 40.0, 70.0, 84.0);
    let w = (left + gw * groups.len() as f64 + 190.0) as u32;
    let h = 420u32;
    let plot_h = h as f64 - top - bottom;
    let ymax = nice(
        groups
            .iter()
            .flat_map(|(p, (q, s))| Impl::ALL.iter().filter_map(move |i| a.rate(*p, *i, *q, *s)))
            .map(|s| s.max)
            .fold(0.0, f64::max),
    );
    let y = |v: f64| top + plot_h * (1.0 - v / ymax);
    let mut o = header(w, h, "Max sustained delivered msg/s (median, whiskers min–max)");
    for k in 0..=5 {
        let v = ymax * k as f64 / 5.0;
        let _ = writeln!(
            o,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy}\" y2=\"{yy}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>",
            left + gw * groups.len() as f64,
            left - 6.0,
            y(v) + 4.0,
            v,
            yy = y(v)
        );
    }
    for (g, (p, (q, s))) in groups.iter().enumerate() {
        let x0 = left + gw * g as f64 + 8.0;
        for (k, i) in Impl::ALL.iter().enumerate() {
            let Some(st) = a.rate(*p, *i, *q, *s) else {
                continue;
            };
            let x = x0 + k as f64 * 22.0;
            let _ = writeln!(
                o,
                "<rect x=\"{x}\" y=\"{:.1}\" width=\"20\" height=\"{:.1}\" fill=\"{}\"><title>{} {} q{q} {s} B: {:.0} msg/s</title></rect>",
                y(st.med),
                y(0.0) - y(st.med),
                color(i.name()),
                p.name(),
                i.name(),
                st.med
            );
            let cx = x + 10.0;
            let _ = writeln!(
                o,
                "<line x1=\"{cx}\" x2=\"{cx}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                y(st.min),
                y(st.max)
            );
        }
        let cx = x0 + 33.0;
        let _ = writeln!(
            o,
            "<text x=\"{cx}\" y=\"{}\" text-anchor=\"middle\">q{q} {}</text><text x=\"{cx}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>",
            y(0.0) + 16.0,
            if *s >= 1024 { "1 KiB".to_string() } else { format!("{s} B") },
            y(0.0) + 32.0,
            p.name()
        );
    }
    let _ = writeln!(
        o,
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{}\" stroke=\"black\"/>",
        y(0.0)
    );
    legend(
        &mut o,
        left + gw * groups.len() as f64 + 20.0,
        top + 10.0,
        &Impl::ALL.map(|i| i.name()),
    );
    o.push_str("</svg>\n");
    o
}

/// Cumulative distribution of latencies (µs, log axis), one curve per implementation.
pub fn cdf(title: &str, curves: &[(String, Vec<u64>)]) -> String {
    let (w, h) = (720u32, 420u32);
    let (left, right, top, bottom) = (60.0, 190.0, 40.0, 50.0);
    let pw = w as f64 - left - right;
    let ph = h as f64 - top - bottom;
    let max = curves
        .iter()
        .filter_map(|(_, v)| v.last().copied())
        .max()
        .unwrap_or(10)
        .max(10) as f64;
    let min = curves
        .iter()
        .filter_map(|(_, v)| v.first().copied())
        .min()
        .unwrap_or(1)
        .max(1) as f64;
    let (lo, hi) = (10f64.powf(min.log10().floor()), 10f64.powf(max.log10().ceil()));
    let x = |v: f64| left + pw * (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10());
    let y = |q: f64| top + ph * (1.0 - q);
    let mut o = header(w, h, title);
    let mut d = lo;
    while d <= hi * 1.0001 {
        let _ = writeln!(
            o,
            "<line x1=\"{xx:.1}\" x2=\"{xx:.1}\" y1=\"{top}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            y(0.0),
            y(0.0) + 16.0,
            if d >= 1000.0 { format!("{} ms", d / 1000.0) } else { format!("{d} µs") },
            xx = x(d)
        );
        d *= 10.0;
    }
    for q in [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0] {
        let _ = writeln!(
            o,
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{q}</text>",
            left + pw,
            left - 6.0,
            y(q) + 4.0,
            yy = y(q)
        );
    }
    for (name, v) in curves {
        let n = v.len();
        let step = (n / 400).max(1);
        let mut pts = String::new();
        for (k, val) in v.iter().enumerate() {
            if k % step == 0 || k + 1 == n {
                let _ = write!(pts, "{:.1},{:.1} ", x(*val as f64), y((k + 1) as f64 / n as f64));
            }
        }
        let _ = writeln!(
            o,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{pts}\"/>",
            color(name)
        );
    }
    let _ = writeln!(
        o,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">one-way latency (log scale)</text>",
        left + pw / 2.0,
        h as f64 - 10.0
    );
    let names: Vec<&str> = curves.iter().map(|(n, _)| n.as_str()).collect();
    legend(&mut o, left + pw + 20.0, top + 10.0, &names);
    o.push_str("</svg>\n");
    o
}
