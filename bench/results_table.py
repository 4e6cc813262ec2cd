"""The GPU results in ``bench/results/`` as one markdown table (the README's performance table).

    python bench/results_table.py                         # print the table
    python bench/results_table.py --readme README.md      # rewrite the README's table in place
    python bench/results_table.py --add OUT/summary.json --grid OUT/sample_grid.png   # store a GPU run's results

Each file ``bench/results/<date>-<gpu>.json`` is the summary that ``bench/gpu_check.sh`` wrote on a GPU, with
the commit it measured; ``<date>-<gpu>.png`` beside it is that run's sample grid (sample.py, fast path).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"
CALL = (
    "The check has not been run on a GPU yet. It is one command on a machine with a CUDA GPU,\n"
    "`bash bench/gpu_check.sh` (sized to finish within 9 minutes on an H100, set-up included; `bench/README.md`\n"
    "says how to prepare a machine that cannot download), then\n"
    "`python bench/results_table.py --add <its OUT>/summary.json --grid <its OUT>/sample_grid.png --readme README.md`."
)


def dig(data, *keys):
    for k in keys:
        if not isinstance(data, dict) or data.get(k) is None:
            return None
        data = data[k]
    return data


def fmt(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def row(summary: dict) -> str:
    steps = summary["steps"]
    train, sample = dig(steps, "train_throughput", "result") or {}, dig(steps, "sample_throughput", "result") or {}
    ok = [n for n, s in steps.items() if s["status"] == "ok"]
    skipped = [n for n, s in steps.items() if s["status"] == "skipped"]
    failed = [n for n, s in steps.items() if s["status"] not in ("ok", "skipped")]
    diff = dig(steps, "sample_cli", "max_abs_diff")
    cells = [
        summary["date"][:10],
        dig(steps, "env", "gpu") or "?",
        f"`{summary['commit'][:10]}`",
        " / ".join(fmt(dig(train, p, "img_per_s")) for p in ("trainer", "bare", "peer")),
        fmt(dig(train, "ratio", "trainer_vs_peer"), 2),
        " / ".join(fmt(dig(sample, p, "img_per_s")) for p in ("ddpmlab", "peer")),
        fmt(dig(sample, "ratio", "ddpmlab_vs_peer"), 2),
        " / ".join(fmt(dig(part, p, "peak_mem_GiB"), 2) for part, p in ((train, "trainer"), (sample, "ddpmlab"))),
        " / ".join(fmt(dig(part, p, "mfu"), 3) for part, p in ((train, "trainer"), (sample, "ddpmlab"))),
        f"{len(ok)}/{len(steps)} ok"
        + (f"; skipped: {', '.join(skipped)}" if skipped else "")
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + (f"; samples fast vs fp32 max diff {diff}" if diff is not None else ""),
    ]
    return "| " + " | ".join(cells) + " |"


def load(results: Path) -> list[dict]:
    summaries = []
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("check") == "gpu_check" and data.get("mode") == "cuda":
            summaries.append(data)
    return sorted(summaries, key=lambda s: s["date"])


def table(results: Path = RESULTS) -> str:
    summaries = load(results)
    if not summaries:
        return CALL
    header = [
        "| date | GPU | commit | train img/s: Trainer / bare / peer | Trainer vs peer | DDIM-50 img/s: ddpmlab / peer "
        "| vs peer | peak GiB train / sample | MFU train / sample | checks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    note = (
        "Targets (35.7M U-Net, bf16, H100): training through the Trainer with EMA >= 5,500 img/s at batch 128, "
        "DDIM-50 sampling >= 650 img/s at batch 256, each >= 2x the diffusers peer. Each row is one run of "
        "`bash bench/gpu_check.sh`; its file in `bench/results/` has every number."
    )
    return "\n".join(header + [row(s) for s in summaries]) + "\n\n" + note


def update_readme(readme: Path, text: str, check: bool) -> int:
    content = readme.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block to hold the table")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{text}\n{END}{tail}"
    if check:
        if new != content:
            print(f"{readme}'s GPU results table is out of date: run python bench/results_table.py --readme {readme}")
            return 1
        return 0
    readme.write_text(new)
    return 0


def add(summary_path: Path, grid: Path | None, results: Path) -> Path:
    summary = json.loads(summary_path.read_text())
    if summary.get("check") != "gpu_check" or summary.get("mode") != "cuda":
        raise SystemExit(f"{summary_path}: not the summary of a GPU run of bench/gpu_check.sh (a --cpu dry run?)")
    results.mkdir(parents=True, exist_ok=True)
    dest = results / f"{summary['result_name']}.json"
    dest.write_text(json.dumps(summary, indent=1) + "\n")
    if grid is not None:
        shutil.copyfile(grid, dest.with_suffix(".png"))
    print(dest)
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="the folder of result files")
    p.add_argument("--add", type=Path, help="store this summary.json of a GPU run in the results folder")
    p.add_argument("--grid", type=Path, help="with --add: that run's sample grid PNG")
    p.add_argument("--readme", type=Path, help="rewrite the table between the markers in this file")
    p.add_argument("--check", action="store_true", help="with --readme: only say whether it is up to date (exit 1)")
    a = p.parse_args(argv)
    if a.add:
        add(a.add, a.grid, a.results)
    text = table(a.results)
    if a.readme:
        return update_readme(a.readme, text, a.check)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
