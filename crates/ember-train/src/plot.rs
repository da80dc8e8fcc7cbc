//! Loss curves as standalone SVG line charts, in pure std: no plotting crate, no fonts, and the
//! file opens in any browser.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

/// One named line: `(step, value)` points in any order of appearance (drawn in the given order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 56.0;
/// Matplotlib's tab10, readable on white.
const COLOURS: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// Writes a standalone SVG line chart of `series` to `path`: axes with about five nice ticks,
/// axis labels, a title, a legend and one colour per series; `log_y` draws the y axis on a log
/// scale. Points with a non-finite coordinate (or a non-positive value when `log_y`) are skipped;
/// a series left with a single point is drawn as a marker. The file is written to `path.tmp`
/// and renamed into place, so readers never see half a chart.
pub fn write_svg(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> anyhow::Result<()> {
    let svg = render(title, x_label, y_label, series, log_y);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} for {}", dir.display(), path.display()))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, svg).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// The SVG document as a string.
fn render(title: &str, x_label: &str, y_label: &str, series: &[Series], log_y: bool) -> String {
    let clean: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!log_y || y > 0.0))
                .map(|(x, y)| (x, if log_y { y.log10() } else { y }))
                .collect()
        })
        .collect();
    let all = clean.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let empty = !x0.is_finite();
    if empty {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let (x0, x1) = widen(x0, x1);
    let (y0, y1) = widen(y0, y1);

    // Axis ranges and ticks, in plotted coordinates (log10 of the value on a log axis).
    let (x0, x1, xticks) = linear_ticks(x0, x1);
    let (y0, y1, yticks) = if log_y {
        log_ticks(y0, y1)
    } else {
        linear_ticks(y0, y1)
    };

    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;

    let mut o = String::with_capacity(8192);
    let _ = writeln!(
        o,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="Helvetica, Arial, sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{:.1}" y="24" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        LEFT + pw / 2.0,
        esc(title)
    );

    // Grid and tick labels.
    o.push_str("<g stroke=\"#e5e5e5\" stroke-width=\"1\">\n");
    for &(t, _) in &xticks {
        let x = sx(t);
        let _ = writeln!(
            o,
            r#"<line x1="{x:.1}" y1="{TOP:.1}" x2="{x:.1}" y2="{:.1}"/>"#,
            TOP + ph
        );
    }
    for &(t, _) in &yticks {
        let y = sy(t);
        let _ = writeln!(
            o,
            r#"<line x1="{LEFT:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}"/>"#,
            LEFT + pw
        );
    }
    o.push_str("</g>\n<g fill=\"#333\">\n");
    for (t, label) in &xticks {
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            sx(*t),
            TOP + ph + 18.0,
            esc(label)
        );
    }
    for (t, label) in &yticks {
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            sy(*t) + 4.0,
            esc(label)
        );
    }
    o.push_str("</g>\n");
    let _ = writeln!(
        o,
        r##"<rect x="{LEFT:.1}" y="{TOP:.1}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#333"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
        LEFT + pw / 2.0,
        HEIGHT - 14.0,
        esc(x_label),
        TOP + ph / 2.0,
        esc(&if log_y {
            format!("{y_label} (log scale)")
        } else {
            y_label.to_string()
        }),
    );
    if empty {
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#999">no data</text>"##,
            LEFT + pw / 2.0,
            TOP + ph / 2.0
        );
    }

    // Lines (clipped to the plot area), then the legend.
    let _ = writeln!(
        o,
        r#"<clipPath id="plot"><rect x="{LEFT:.1}" y="{TOP:.1}" width="{pw:.1}" height="{ph:.1}"/></clipPath>
<g clip-path="url(#plot)" fill="none" stroke-width="1.5" stroke-linejoin="round">"#
    );
    for (i, pts) in clean.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let px: Vec<(f64, f64)> = decimate(pts.iter().map(|&(x, y)| (sx(x), sy(y))), pw);
        match px.len() {
            0 => {}
            1 => {
                let _ = writeln!(
                    o,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}" stroke="none"/>"#,
                    px[0].0, px[0].1
                );
            }
            _ => {
                let _ = write!(o, r#"<polyline stroke="{colour}" points=""#);
                for (j, (x, y)) in px.iter().enumerate() {
                    let sep = if j == 0 { "" } else { " " };
                    let _ = write!(o, "{sep}{x:.1},{y:.1}");
                }
                o.push_str("\"/>\n");
            }
        }
    }
    o.push_str("</g>\n<g>\n");
    let lx = LEFT + pw + 14.0;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let y = TOP + 8.0 + i as f64 * 18.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="2.5"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            y + 4.0,
            esc(&s.name)
        );
    }
    o.push_str("</g>\n</svg>\n");
    o
}

/// A non-degenerate range around `[lo, hi]`.
fn widen(lo: f64, hi: f64) -> (f64, f64) {
    if hi > lo {
        (lo, hi)
    } else {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - d, hi + d)
    }
}

/// 1, 2, 2.5 or 5 times a power of ten, near `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    let f = raw / p;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * p
}

/// About five nice ticks covering `[lo, hi]`; the axis is widened to the outer ticks.
fn linear_ticks(lo: f64, hi: f64) -> (f64, f64, Vec<(f64, String)>) {
    let step = nice_step((hi - lo) / 5.0);
    let (a, b) = ((lo / step + 1e-9).floor(), (hi / step - 1e-9).ceil());
    let ticks = (a as i64..=b as i64)
        .map(|k| {
            let v = k as f64 * step;
            (v, fmt_tick(v, step))
        })
        .collect();
    (a * step, b * step, ticks)
}

/// Ticks for a log axis given `[lo, hi]` in log10 units: powers of ten when the data spans a few
/// decades, otherwise 1-2-5 (or 1..9) multiples; falls back to linear ticks mapped to log space.
fn log_ticks(lo: f64, hi: f64) -> (f64, f64, Vec<(f64, String)>) {
    let pad = (hi - lo) * 0.04;
    let (lo, hi) = (lo - pad, hi + pad);
    let (d0, d1) = (lo.floor() as i64, hi.ceil() as i64);
    let mut ticks: Vec<(f64, String)> = Vec::new();
    if hi - lo >= 2.5 {
        let every = ((d1 - d0) as f64 / 6.0).ceil().max(1.0) as i64;
        for k in d0..=d1 {
            let t = k as f64;
            if k % every == 0 && t >= lo && t <= hi {
                ticks.push((t, fmt_tick(10f64.powi(k as i32), 10f64.powi(k as i32))));
            }
        }
    } else {
        for mults in [
            &[1.0, 2.0, 5.0][..],
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0][..],
        ] {
            ticks.clear();
            for k in d0..=d1 {
                let p = 10f64.powi(k as i32);
                for m in mults {
                    let v = m * p;
                    let t = v.log10();
                    if t >= lo - 1e-12 && t <= hi + 1e-12 {
                        ticks.push((t, fmt_tick(v, p)));
                    }
                }
            }
            if ticks.len() >= 3 {
                break;
            }
        }
        if ticks.len() > 10 {
            let every = ticks.len().div_ceil(8);
            ticks = ticks.into_iter().step_by(every).collect();
        }
        if ticks.len() < 3 {
            // Less than a factor of two: linear ticks in value space, placed on the log axis.
            let (v0, v1) = (10f64.powf(lo), 10f64.powf(hi));
            let step = nice_step((v1 - v0) / 4.0);
            let mut k = (v0 / step).ceil();
            ticks.clear();
            while k * step <= v1 {
                let v = k * step;
                if v > 0.0 {
                    ticks.push((v.log10(), fmt_tick(v, step)));
                }
                k += 1.0;
            }
        }
    }
    (lo, hi, ticks)
}

/// A tick label for `v` on an axis whose ticks are `step` apart: as few digits as show the step,
/// `k`/`M` suffixes for large round values, scientific notation for tiny ones.
fn fmt_tick(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if a >= 1e4 {
        for (div, suffix) in [(1e9, "G"), (1e6, "M"), (1e3, "k")] {
            if a >= div {
                let d = decimals(step / div);
                return format!("{:.*}{suffix}", d, v / div);
            }
        }
    }
    if a < 1e-3 {
        let s = format!("{v:.1e}");
        return s.replace(".0e", "e");
    }
    format!("{:.*}", decimals(step), v)
}

/// Decimal places that show multiples of `step`.
fn decimals(step: f64) -> usize {
    if step >= 1.0 {
        return 0;
    }
    let mut d = (-step.log10()).floor().max(0.0) as usize;
    // e.g. 0.25 needs two places, not one.
    while d < 8
        && ((step * 10f64.powi(d as i32)).round() - step * 10f64.powi(d as i32)).abs() > 1e-6
    {
        d += 1;
    }
    d
}

/// Keeps a long line light: at most two points (the extremes, in order) per half pixel column
/// once a series has more points than about four per pixel.
fn decimate(pts: impl Iterator<Item = (f64, f64)>, width: f64) -> Vec<(f64, f64)> {
    let pts: Vec<(f64, f64)> = pts.collect();
    if pts.len() <= (width * 4.0) as usize {
        return pts;
    }
    let mut out = Vec::with_capacity((width * 4.0) as usize);
    let mut i = 0;
    while i < pts.len() {
        let col = (pts[i].0 * 2.0).floor();
        let mut j = i;
        let (mut lo, mut hi) = (i, i);
        while j < pts.len() && (pts[j].0 * 2.0).floor() == col {
            if pts[j].1 < pts[lo].1 {
                lo = j;
            }
            if pts[j].1 > pts[hi].1 {
                hi = j;
            }
            j += 1;
        }
        let (a, b) = (lo.min(hi), lo.max(hi));
        out.push(pts[a]);
        if b != a {
            out.push(pts[b]);
        }
        i = j;
    }
    out
}

/// Text safe inside an XML element or attribute.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // Control characters other than tab and newline are not allowed in XML 1.0.
            c if c.is_control() && c != '\t' && c != '\n' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ember-plot-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn ticks_are_nice() {
        let (lo, hi, t) = linear_ticks(0.0, 1000.0);
        assert_eq!((lo, hi), (0.0, 1000.0));
        let labels: Vec<&str> = t.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, ["0", "200", "400", "600", "800", "1000"]);
        let (_, _, t) = linear_ticks(2.13, 3.87);
        let labels: Vec<&str> = t.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, ["2.0", "2.5", "3.0", "3.5", "4.0"]);
        let (_, _, t) = linear_ticks(0.0, 50_000.0);
        assert_eq!(t.last().unwrap().1, "50k");
        let (_, _, t) = log_ticks(0.0, 4.0);
        assert!(t.iter().any(|(_, l)| l == "100"), "{t:?}");
        let (_, _, t) = log_ticks(2f64.log10(), 11f64.log10());
        assert!(t.len() >= 3 && t.iter().any(|(_, l)| l == "5"), "{t:?}");
        let (_, _, t) = log_ticks(2.1f64.log10(), 2.4f64.log10());
        assert!(t.len() >= 2, "{t:?}");
    }

    #[test]
    fn writes_an_escaped_atomic_svg() {
        let d = tmpdir("svg");
        let path = d.join("loss.svg");
        let series = [
            Series {
                name: "train <loss> & \"stuff\"".into(),
                points: (0..5000)
                    .map(|i| (i as f64, 10.0 / (1.0 + i as f64 / 100.0)))
                    .chain([(5001.0, f64::NAN), (5002.0, f64::INFINITY)])
                    .collect(),
            },
            Series {
                name: "eval".into(),
                points: vec![(2500.0, 1.5)],
            },
            Series {
                name: "empty".into(),
                points: vec![],
            },
        ];
        write_svg(&path, "Loss & <co>", "step", "loss", &series, true).unwrap();
        let s = std::fs::read_to_string(&path).unwrap();
        assert!(!d.join("loss.svg.tmp").exists());
        assert!(s.starts_with("<?xml") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("train &lt;loss&gt; &amp; &quot;stuff&quot;"));
        assert!(s.contains("Loss &amp; &lt;co&gt;"));
        assert!(!s.contains("NaN") && !s.contains("inf"));
        assert_eq!(s.matches("<polyline").count(), 1);
        assert_eq!(s.matches("<circle").count(), 1);
        write_svg(&d.join("lin.svg"), "t", "x", "y", &series, false).unwrap();
        write_svg(&d.join("none.svg"), "t", "x", "y", &[], false).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn errors_name_the_path() {
        let d = tmpdir("err");
        std::fs::create_dir_all(d.join("is-a-dir.svg")).unwrap();
        let err = write_svg(&d.join("is-a-dir.svg"), "t", "x", "y", &[], false).unwrap_err();
        assert!(format!("{err:#}").contains("is-a-dir.svg"), "{err:#}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
