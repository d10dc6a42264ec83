#!/usr/bin/env python3
"""Turn what a GPU check brings back into a committed record under benches/results/.

A GPU check is two steps on the device machine, `scripts/gpu_check.sh quick` and
`scripts/gpu_check.sh bench`. Each writes its files into $OUT (quick.json + quick.log,
bench.json + bench.log), and the device tool copies them back here, reporting the
folder as `files_at`. Then, here:

    python3 scripts/make_record.py <quick dir> <bench dir> [--name NAME]
    git add benches/results && git commit -m "GPU record ..."

This makes benches/results/<date>-<device slug>-<commit>/ (or --name) holding
record.json (the merged meta plus the quick and bench objects as given), the logs and
bench.md as they came, README.md (tables) and one PNG plot per benchmarked op, then rebuilds the
index benches/results/README.md (one row per record folder, newest first).

    python3 scripts/make_record.py --index-only     # rebuild only the index

Either step's folder may be missing (a run cut short): one folder holding only
quick.json, or only bench.json, makes a record too. The files may sit anywhere below
the folders given. Plots need matplotlib (Agg backend; e.g. run this with
.toolchain/venv/bin/python); without it the record is made without plots and a warning.

Only numbers found in the inputs are written; nothing is estimated or filled in.
"""

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = "flashkernels"
UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s"}
META_KEYS = ("date", "device", "driver", "commit")
# Index column order for the ops we know; any other op follows, alphabetically.
OP_ORDER = [
    "attention_fwd",
    "attention_train",
    "attention_gqa",
    "attention_varlen",
    "attention_window",
    "longformer_fwd",
    "longformer_train",
    "conv_fwd",
    "conv_train",
    "pool",
    "ffn_fwd",
    "ffn_train",
    "linformer_fwd",
    "linformer_train",
]


def warn(msg):
    print(f"make_record: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- reading the inputs


def find_inputs(dirs):
    """{file name: path} for quick.json, bench.json and every *.log and *.md (bench.md)
    below the folders."""
    found = {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            sys.exit(f"make_record: {d} is not a folder")
        for path in sorted(d.rglob("*")):
            if not path.is_file():
                continue
            if (
                path.name in ("quick.json", "bench.json")
                or path.suffix == ".log"
                or (path.suffix == ".md" and path.name != "README.md")
            ):
                if path.name in found:
                    sys.exit(f"make_record: two files named {path.name}: {found[path.name]} and {path}")
                found[path.name] = path
    if "quick.json" not in found and "bench.json" not in found:
        sys.exit(f"make_record: no quick.json or bench.json under {', '.join(map(str, dirs))}")
    return found


def load_json(path):
    with open(path) as f:
        return json.load(f)


def merge_meta(quick, bench):
    """date, device, driver, commit from both steps; a disagreement is kept and shown."""
    meta, conflicts = {}, {}
    for part in (quick, bench):
        if not part:
            continue
        for key in META_KEYS:
            value = (part.get("meta") or {}).get(key)
            if value in (None, ""):
                continue
            if key in meta and meta[key] != value:
                conflicts.setdefault(key, [meta[key]]).append(value)
                warn(f"quick and bench disagree on {key}: {meta[key]} vs {value}")
            meta.setdefault(key, value)
    if conflicts:
        meta["conflicts"] = conflicts
    return meta


def device_slug(device):
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100', 'RTX 4090' -> 'rtx-4090'."""
    words = [
        w for w in re.split(r"[^a-z0-9]+", (device or "").lower()) if w and w not in ("nvidia", "geforce", "tesla")
    ]
    slug = []
    for w in words:
        slug.append(w)
        if any(c.isdigit() for c in w):
            break
    return "-".join(slug) or "unknown-device"


def record_name(meta):
    return "-".join([meta.get("date") or "undated", device_slug(meta.get("device")), meta.get("commit") or "unknown"])


# ---------------------------------------------------------------- reading a record


def headlines(record):
    """{op: {case, peer, ratio}} from the first headline row of each op that has a ratio.

    Hand-written records (from before record.json existed) carry this object directly.
    """
    if "headlines" in record:
        return record["headlines"]
    out = {}
    for row in (record.get("bench") or {}).get("rows") or []:
        op = row.get("op")
        if row.get("headline") and op not in out and row.get("ratio") is not None:
            out[op] = {"case": row.get("case"), "peer": row.get("peer"), "ratio": row["ratio"]}
    return out


def quick_summary(quick):
    """'pass 4/4': the quick step's overall status, passed steps / all steps."""
    if not quick:
        return "—"
    steps = quick.get("steps") or []
    passed = sum(1 for s in steps if s.get("status") == "pass")
    return f"{quick.get('status', '?')} {passed}/{len(steps)}"


def fmt_ratio(h):
    return f"{h['ratio']:.2f}x {h.get('peer') or '?'}"


def fmt_num(value, digits=3):
    """Floats to `digits` significant figures (small ones in e-notation, large ones
    whole); ints and anything else as is; None as a dash."""
    if value is None:
        return "—"
    if not isinstance(value, float):
        return str(value)
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.1e}"
    if abs(value) >= 10**digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def cell(text):
    """A markdown table cell: one line, no pipes."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def group_by_op(rows):
    ops = {}
    for row in rows:
        ops.setdefault(row.get("op") or "unknown", []).append(row)
    return ops


def contenders(rows):
    """Ours first, then every peer seen in these rows, in the order first seen."""
    names = [OURS]
    for row in rows:
        for name in row.get("results") or {}:
            if name not in names:
                names.append(name)
    return names


def plot_file(op):
    return re.sub(r"[^A-Za-z0-9_.-]", "_", op) + ".png"


def metric_of(rows):
    return next((r["metric"] for r in rows if r.get("metric")), "tflops")


# ---------------------------------------------------------------- the record's README


def budget_line(meta):
    if "elapsed_s" not in meta and "budget_s" not in meta:
        return []
    return [f"{fmt_num(meta.get('elapsed_s'))} s of a {fmt_num(meta.get('budget_s'))} s budget."]


def steps_table(steps):
    """The steps of a gpu_check.py step (name, status, seconds, counts), then the output
    tail of each one that did not pass."""
    lines = ["| step | what | status | seconds | counts |", "|---|---|---|---|---|"]
    for s in steps:
        counts = ", ".join(f"{n} {what}" for what, n in (s.get("counts") or {}).items())
        lines.append(
            "| "
            + " | ".join(
                cell(v)
                for v in (
                    s.get("name", "?"),
                    s.get("title", ""),
                    s.get("status", "?"),
                    fmt_num(s.get("seconds")),
                    counts or "—",
                )
            )
            + " |"
        )
    for s in steps:
        if s.get("status") != "pass" and s.get("summary"):
            lines += ["", f"`{s.get('name', '?')}` ({s.get('status', '?')}):", "```", str(s["summary"]).rstrip(), "```"]
    return lines + [""]


def quick_tables(quick):
    lines = [f"## Quick check: {quick.get('status', '?')}", ""]
    lines += budget_line(quick.get("meta") or {}) + [""]
    return lines + steps_table(quick.get("steps") or [])


def op_table(op, rows, plotted):
    metric = metric_of(rows)
    unit = UNITS.get(metric, metric)
    names = contenders(rows)
    lines = [f"### {op}", ""]
    if plotted:
        lines += [f"![{op}]({plot_file(op)})", ""]
    head = ["case"]
    for name in names:
        label = "ours" if name == OURS else name
        head += [f"{label} ms", f"{label} {unit}"]
    head += ["ratio", "check"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    errors = []
    for row in rows:
        line = [row.get("case", "?")]
        for name in names:
            res = (row.get("results") or {}).get(name)
            if res is None:
                line += ["—", "—"]
            elif "error" in res:
                line += ["error", "error"]
                errors.append(f"- {row.get('case', '?')}, {name}: `{res['error']}`")
            else:
                line += [fmt_num(res.get("ms")), fmt_num(res.get(metric))]
        if row.get("ratio") is not None:
            line.append(f"{row['ratio']:.2f}x {row.get('peer', '?')}")
        else:
            line.append(f"— ({row.get('peer')} failed)" if row.get("peer") else "—")
        check = row.get("check") or {}
        if "ok" in check:
            line.append(
                ("ok" if check["ok"] else "**FAIL**") + (f" {fmt_num(check['rel_err'])}" if "rel_err" in check else "")
            )
        else:
            line.append("—")
        lines.append("| " + " | ".join(cell(v) for v in line) + " |")
    if errors:
        lines += ["", "Errors:", ""] + [e.replace("\n", " ") for e in errors]
    return lines + [""]


def bench_tables(bench, plotted_ops):
    meta = bench.get("meta") or {}
    rows = bench.get("rows") or []
    lines = [f"## Benchmarks: {bench['status']}" if "status" in bench else "## Benchmarks", ""]
    facts = []
    if meta.get("torch"):
        facts.append(f"torch {meta['torch']}")
    if meta.get("rounds") is not None:
        facts.append(f"{meta['rounds']} rounds")
    facts += [b.rstrip(".") for b in budget_line(meta)]
    if facts:
        lines += [", ".join(facts) + ". Ratio = peer ms / our ms (> 1: we are faster).", ""]
    if bench.get("steps"):
        lines += steps_table(bench["steps"])
    if not rows:
        lines += ["No benchmark rows.", ""]
    for op, op_rows in group_by_op(rows).items():
        lines += op_table(op, op_rows, op in plotted_ops)
    for key, title, field in (("skipped", "Skipped", "reason"), ("failed", "Failed", "error")):
        items = bench.get(key) or []
        if items:
            lines += [f"### {title}", ""]
            lines += [f"- {i.get('op', '?')} {i.get('case', '')}: {str(i.get(field, '')).strip()}" for i in items]
            lines.append("")
    return lines


def record_readme(record, plotted_ops):
    meta = record["meta"]
    lines = [
        f"# GPU record: {meta.get('date', 'undated')}, {meta.get('device', 'unknown device')}"
        f" (driver {meta.get('driver', '?')}), commit {meta.get('commit', 'unknown')}",
        "",
    ]
    for key, values in (meta.get("conflicts") or {}).items():
        lines += [f"**Warning**: the quick and bench steps disagree on {key}: {', '.join(map(str, values))}.", ""]
    heads = headlines(record)
    if heads:
        lines += ["Headlines:", ""]
        for op, h in heads.items():
            lines.append(f"- {op} {h.get('case', '')}: {fmt_ratio(h)}")
        lines.append("")
    files = record.get("files") or []
    if files:
        lines += ["As the device wrote them: " + ", ".join(f"[{n}]({n})" for n in files) + ".", ""]
    if record.get("quick"):
        lines += quick_tables(record["quick"])
    else:
        lines += ["No quick check in this record.", ""]
    if record.get("bench"):
        lines += bench_tables(record["bench"], plotted_ops)
    else:
        lines += ["No benchmarks in this record.", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- plots


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def plot_op(op, rows, meta, path):
    """One PNG: the metric against x, one curve (or bar set) per (contender, series).
    Returns False (and writes nothing) when no row has a value to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric_of(rows)
    names = contenders(rows)
    series = list(dict.fromkeys(str(r.get("series", "")) for r in rows))
    xs = [r.get("x", r.get("case")) for r in rows]
    numeric = all(is_number(x) for x in xs)
    # (contender, series) -> [(x, value)]
    curves = {}
    for row, x in zip(rows, xs):
        for name in names:
            res = (row.get("results") or {}).get(name) or {}
            if is_number(res.get(metric)):
                curves.setdefault((name, str(row.get("series", ""))), []).append((x, res[metric]))
    if not curves:
        return False

    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    if numeric:
        for (name, s), points in curves.items():
            points.sort()
            k = series.index(s)
            ours = name == OURS
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                color=colors[name],
                linestyle=styles[k % len(styles)],
                marker=markers[k % len(markers)],
                linewidth=3.0 if ours else 1.2,
                zorder=3 if ours else 2,
                label=f"{'ours' if ours else name} {s}".strip(),
            )
        ax.set_xscale("log", base=2)
        ticks = sorted(set(xs))
        ax.set_xticks(ticks)
        ax.set_xticklabels([fmt_num(t) for t in ticks], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel(next((r["x_name"] for r in rows if r.get("x_name")), "x"))
    else:
        cats = list(dict.fromkeys(str(x) for x in xs))
        width = 0.8 / len(curves)
        for i, ((name, s), points) in enumerate(curves.items()):
            ours = name == OURS
            pos = [cats.index(str(p[0])) - 0.4 + (i + 0.5) * width for p in points]
            ax.bar(
                pos,
                [p[1] for p in points],
                width,
                color=colors[name],
                edgecolor="black",
                linewidth=2.0 if ours else 0.3,
                hatch="//" if series.index(s) % 2 else None,
                label=f"{'ours' if ours else name} {s}".strip(),
            )
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(next((r["x_name"] for r in rows if r.get("x_name")), "case"))
    ax.set_ylabel(UNITS.get(metric, metric))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(
        f"{op} — {meta.get('device', 'unknown device')} — commit "
        f"{meta.get('commit', 'unknown')} — {meta.get('date', '')}".rstrip(" —")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def make_plots(bench, meta, folder):
    """The set of ops that got a plot."""
    rows = (bench or {}).get("rows") or []
    if not rows:
        return set()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warn("matplotlib is missing: no plots (pip install matplotlib, or run with .toolchain/venv/bin/python)")
        return set()
    return {op for op, op_rows in group_by_op(rows).items() if plot_op(op, op_rows, meta, folder / plot_file(op))}


# ---------------------------------------------------------------- making a record


def make_record(dirs, results, name=None):
    found = find_inputs(dirs)
    quick = load_json(found["quick.json"]) if "quick.json" in found else None
    bench = load_json(found["bench.json"]) if "bench.json" in found else None
    meta = merge_meta(quick, bench)
    folder = Path(results) / (name or record_name(meta))
    folder.mkdir(parents=True, exist_ok=True)

    copied = sorted(n for n in found if not n.endswith(".json"))
    for n in copied:
        shutil.copyfile(found[n], folder / n)
    record = {"meta": meta, "headlines": headlines({"bench": bench}), "files": copied}
    if quick is not None:
        record["quick"] = quick
    if bench is not None:
        record["bench"] = bench

    with open(folder / "record.json", "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    plotted = make_plots(bench, meta, folder)
    (folder / "README.md").write_text(record_readme(record, plotted))
    print(f"make_record: wrote {folder}")
    return folder


# ---------------------------------------------------------------- the index


def read_records(results):
    """[(folder name, record or None)] for every folder under results/."""
    out = []
    for d in sorted(Path(results).iterdir()):
        if not d.is_dir():
            continue
        path = d / "record.json"
        if path.exists():
            out.append((d.name, load_json(path)))
        else:
            warn(f"{d.name} has no record.json; listed without details")
            out.append((d.name, None))
    return out


def record_date(name, record):
    date = ((record or {}).get("meta") or {}).get("date")
    if not date:
        m = re.match(r"\d{4}-\d{2}-\d{2}", name)
        date = m.group(0) if m else ""
    return date


def index_readme(records):
    records = sorted(records, key=lambda nr: (record_date(*nr), nr[0]), reverse=True)
    ops = {op for _, rec in records if rec for op in headlines(rec)}
    ops = [op for op in OP_ORDER if op in ops] + sorted(ops - set(OP_ORDER))
    lines = [
        "# GPU records",
        "",
        "One folder per GPU check (`scripts/gpu_check.sh quick` and `bench` on the device",
        "machine), made by `scripts/make_record.py`, which also writes this index; newest",
        "first. quick: the quick check's status, steps passed / steps. Per op: the first",
        "headline case's ratio, peer time / our time (> 1: we are faster).",
        "",
    ]
    head = ["date", "record", "device", "commit", "quick"] + ops + ["note"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rec in records:
        if rec is None:
            lines.append(
                "| "
                + " | ".join(
                    [record_date(name, None), f"[{name}]({name}/)"] + ["—"] * (len(head) - 3) + ["no record.json"]
                )
                + " |"
            )
            continue
        meta = rec.get("meta") or {}
        heads = headlines(rec)
        line = [
            record_date(name, rec),
            f"[{name}]({name}/)",
            meta.get("device", "?"),
            meta.get("commit", "?"),
            quick_summary(rec.get("quick")),
        ]
        line += [f"{fmt_ratio(heads[op])} ({heads[op].get('case', '')})" if op in heads else "—" for op in ops]
        line.append(rec.get("note", ""))
        lines.append("| " + " | ".join(cell(v) for v in line) + " |")
    return "\n".join(lines) + "\n"


def write_index(results):
    path = Path(results) / "README.md"
    path.write_text(index_readme(read_records(results)))
    print(f"make_record: wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("dirs", nargs="*", help="folders the device brought back (quick, bench)")
    p.add_argument("--name", help="record folder name (default: <date>-<device>-<commit>)")
    p.add_argument(
        "--results", default=str(REPO / "benches" / "results"), help="where the record folders and the index live"
    )
    p.add_argument("--index-only", action="store_true", help="only rebuild the index")
    args = p.parse_args(argv)
    if not args.index_only:
        if not args.dirs:
            p.error("give the quick and/or bench folders, or --index-only")
        make_record(args.dirs, args.results, args.name)
    write_index(args.results)


if __name__ == "__main__":
    main()
