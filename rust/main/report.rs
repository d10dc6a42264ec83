//! The results: one row per (op, case, direction), printed as a table line as it comes,
//! or collected into one JSON document.

use std::fmt::Write;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Fwd,
    Bwd,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Fwd => "fwd",
            Dir::Bwd => "bwd",
        }
    }
}

/// What one call does: floating-point operations (compute-bound ops), or bytes read and
/// written (memory-bound ops).
#[derive(Clone, Copy)]
pub enum Work {
    Flops(f64),
    Bytes(f64),
}

/// Time, throughput and (on the GPU) the error against the CPU reference of one row.
pub struct Measured {
    pub secs: f64,
    pub work: Work,
    pub err: Option<f64>,
    pub tol: f64,
}

impl Measured {
    /// Throughput and its unit: TFLOP/s or GB/s.
    fn rate(&self) -> (f64, &'static str) {
        match self.work {
            Work::Flops(f) => (f / self.secs / 1e12, "TFLOP/s"),
            Work::Bytes(b) => (b / self.secs / 1e9, "GB/s"),
        }
    }

    /// The throughput for people: GFLOP/s below 1 TFLOP/s (the CPU reference's range).
    fn rate_text(&self) -> String {
        match self.rate() {
            (r, "TFLOP/s") if r < 1.0 => format!("{} GFLOP/s", sig3(r * 1e3)),
            (r, unit) => format!("{} {unit}", sig3(r)),
        }
    }

    fn ok(&self) -> bool {
        self.err.is_none_or(|e| e <= self.tol)
    }
}

pub struct Row {
    pub op: &'static str,
    pub case: String,
    pub dir: Dir,
    /// The measurement, or the op's error message.
    pub outcome: Result<Measured, String>,
}

impl Row {
    fn failed(&self) -> bool {
        self.outcome.as_ref().map_or(true, |m| !m.ok())
    }

    fn status(&self) -> &'static str {
        match &self.outcome {
            Ok(m) if m.ok() => "ok",
            Ok(_) => "MISMATCH",
            Err(_) => "ERROR",
        }
    }
}

const HEADER: [&str; 7] = ["op", "case", "dir", "ms", "throughput", "error", "status"];

fn table_line(cells: [&str; 7]) -> String {
    let [op, case, dir, ms, rate, err, status] = cells;
    format!("{op:<11} {case:<48} {dir:<3} {ms:>10} {rate:>16} {err:>9}  {status}")
}

/// `x` with 3 significant digits (times and rates span orders of magnitude).
fn sig3(x: f64) -> String {
    let decimals = if x.is_finite() && x > 0.0 {
        (2 - x.log10().floor() as i32).clamp(0, 9) as usize
    } else {
        1
    };
    format!("{x:.decimals$}")
}

fn table_row(row: &Row) -> String {
    let (ms, rate, err) = match &row.outcome {
        Ok(m) => (
            sig3(m.secs * 1e3),
            m.rate_text(),
            m.err.map_or("-".into(), |e| format!("{e:.2e}")),
        ),
        Err(_) => ("-".into(), "-".into(), "-".into()),
    };
    let status = match &row.outcome {
        Ok(m) if !m.ok() => format!("{} (bound {:.0e})", row.status(), m.tol),
        Err(e) => format!("{}: {e}", row.status()),
        Ok(_) => row.status().into(),
    };
    table_line([row.op, &row.case, row.dir.name(), &ms, &rate, &err, &status])
}

/// The rows so far; prints each as a table line when not collecting JSON.
pub struct Report {
    /// Which device ran the ops, in words.
    device: String,
    gpu: bool,
    json: bool,
    rows: Vec<Row>,
}

impl Report {
    /// Starts the report: with `json` false, prints the device line and the table header.
    pub fn new(device: String, gpu: bool, json: bool) -> Self {
        if !json {
            println!("flashkernels: {device}");
            println!("{}", table_line(HEADER));
        }
        Report {
            device,
            gpu,
            json,
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Row) {
        if !self.json {
            println!("{}", table_row(&row));
        }
        self.rows.push(row);
    }

    /// Rows that mismatched or failed.
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| r.failed()).count()
    }

    /// One JSON document: the device and every row.
    pub fn json(&self) -> String {
        let rows: Vec<String> = self.rows.iter().map(json_row).collect();
        format!(
            "{{\"device\": {}, \"gpu\": {}, \"failures\": {}, \"rows\": [\n  {}\n]}}",
            json_str(&self.device),
            self.gpu,
            self.failures(),
            rows.join(",\n  ")
        )
    }
}

fn json_row(r: &Row) -> String {
    let mut s = format!(
        "{{\"op\": {}, \"case\": {}, \"dir\": \"{}\", \"status\": \"{}\"",
        json_str(r.op),
        json_str(&r.case),
        r.dir.name(),
        r.status().to_lowercase()
    );
    match &r.outcome {
        Ok(m) => {
            let (rate, unit) = m.rate();
            let _ = write!(
                s,
                ", \"ms\": {}, \"throughput\": {}, \"unit\": \"{unit}\", \"error\": {}, \
                 \"bound\": {}",
                json_num(m.secs * 1e3),
                json_num(rate),
                m.err.map_or("null".into(), json_num),
                m.err.map_or("null".into(), |_| json_num(m.tol))
            );
        }
        Err(e) => {
            let _ = write!(s, ", \"message\": {}", json_str(e));
        }
    }
    s + "}"
}

/// A JSON number (null for NaN and infinities, which JSON lacks).
fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
