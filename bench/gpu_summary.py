"""The closing summary of ``bench/gpu_check.sh``: every test that did not pass, every figure
against its goal, every step that failed, from the files the steps left in ``$OUT``.

    python3 bench/gpu_summary.py OUT_DIR [--step NAME=EXIT_CODE ...] [--smoke]

Standard library only, and it never fails on a missing or broken file (it says so): it runs
last, when any step before it may have died, and what it prints is what the session reads.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

GOALS = {
    "record_over_bare": 0.85,  # recording ÷ bare forward, per model shape
    "topk_bf16_tok_s": 1e6,  # TopK SAE training in bf16 autocast
    "update_over_gemm": 0.85,  # co-moment update ÷ bare GEMM, bf16
    "study_min_1_device": 90.0,  # 5 GPT-2-small seeds x 100M tokens, one device
}
TIMEOUT_CODES = {124: "timed out", 137: "killed (timeout or memory)"}
RESULT = re.compile(r"^(\S+::\S+?)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?:\s+\((.*)\))?")
STARTED = re.compile(r"^(\S+::\S+)\s*$")
SHORT = re.compile(r"^(FAILED|ERROR) (\S+::\S+)(?: - (.*))?$")
SKIP_REASON = re.compile(r"^SKIPPED \[\d+\] (\S+?):\d+: (.*)$")


def step_status(code: int | None) -> str:
    if code is None:
        return "not run"
    if code == 0:
        return "ok"
    return TIMEOUT_CODES.get(code, f"exit {code}")


def pytest_lines(text: str | None, code: int | None) -> list[str]:
    """Counts, then every FAILED / ERROR / SKIPPED test (with its reason where pytest gave
    one), and the test that was running if the step was cut short."""
    if text is None:
        return [f"pytest: no output ({step_status(code)})"]
    results: dict[str, tuple[str, str]] = {}
    reasons: dict[str, str] = {}
    skips: dict[str, list[str]] = {}
    last_started = None
    for line in text.splitlines():
        if m := RESULT.match(line):
            node, outcome, why = m.groups()
            if outcome != "PASSED" or node not in results:  # a teardown ERROR after a PASS
                results[node] = (outcome, why or "")
            last_started = None
        elif m := STARTED.match(line):
            last_started = m.group(1)
        elif m := SHORT.match(line):
            reasons[m.group(2)] = m.group(3) or ""
        elif m := SKIP_REASON.match(line):  # -ra groups skips by file and line, not by test
            skips.setdefault(m.group(1), []).append(m.group(2))
    counts: dict[str, int] = {}
    for outcome, _ in results.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    tally = ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items())) or "no results"
    out = [f"pytest: {tally} ({step_status(code)})"]
    for node, (outcome, why) in results.items():
        if outcome != "PASSED":
            if outcome == "SKIPPED" and not why:
                why = " | ".join(dict.fromkeys(skips.get(node.split("::")[0], [])))
            out.append(f"  {outcome:<8}{node}  {reasons.get(node) or why}".rstrip())
    if code in TIMEOUT_CODES and last_started:
        out.append(f"  RUNNING {last_started}  (when the step was stopped)")
    elif code not in (0, None) and not any(o in ("FAILED", "ERROR") for o, _ in results.values()):
        tail = [ln for ln in text.splitlines() if ln.strip()][-3:]
        out += [f"  | {ln}" for ln in tail]  # collection errors, crashes: the last words
    return out


def verdict(value: float | None, goal: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "MISSING"
    ok = value >= goal if higher_is_better else value <= goal
    return "ok" if ok else "BELOW GOAL" if higher_is_better else "OVER GOAL"


def num(x: object, fmt: str = ".3f") -> str:
    return format(x, fmt) if isinstance(x, int | float) else "?"


def load(path: Path) -> tuple[dict | None, str]:
    """A step's JSON and what is wrong with it ("" if nothing)."""
    if not path.is_file():
        return None, "no file"
    try:
        return json.loads(path.read_text()), ""
    except (OSError, ValueError) as e:
        return None, f"unreadable ({e.__class__.__name__})"


def figure_lines(out_dir: Path, codes: dict[str, int]) -> list[str]:
    lines = []

    def missing(name: str, why: str) -> str:
        return f"  {name}: MISSING ({why}; step {step_status(codes.get(name))})"

    rec, why = load(out_dir / "record.json")
    lines.append(f"record ÷ bare forward (goal >= {GOALS['record_over_bare']}):")
    shapes = (rec or {}).get("record", {}).get("shapes", {})
    if not shapes:
        lines.append(missing("record", why or "no shapes measured"))
    for name, s in shapes.items():
        r = s.get("record_over_bare")
        lines.append(f"  {name:<14} {num(r)}  {verdict(r, GOALS['record_over_bare'])}  "
                     f"(trunk÷bare {num(s.get('trunk_over_bare'))}, "
                     f"eager÷bare {num(s.get('eager_over_bare'))}, "
                     f"statistics {s.get('stats_backend', '?')})")  # fmt: skip
    for name in ("smollm2-135m", "gpt2-small", "llama-3.2-1b"):
        if shapes and name not in shapes:
            lines.append(f"  {name:<14} MISSING (step {step_status(codes.get('record'))})")

    sae, why = load(out_dir / "sae.json")
    goal = GOALS["topk_bf16_tok_s"]
    lines.append(f"SAE training tok/s (goal: TopK in bf16 >= {goal:,.0f}):")
    runs = (sae or {}).get("sae", {}).get("runs", {})
    if not runs:
        lines.append(missing("sae", why or "no precision measured"))
    for prec, archs in runs.items():
        row = ", ".join(f"{a} {num(r.get('tok_s'), ',.0f')}" for a, r in archs.items()
                        if a != "gemm")  # fmt: skip
        lines.append(f"  {prec:<14} {row}")
    topk = runs.get("bf16-autocast", {}).get("topk", {}).get("tok_s")
    lines.append(f"  TopK bf16: {verdict(topk, goal)}" + ("" if topk is not None or not runs
                                                         else " (no bf16 row: CPU run)"))  # fmt: skip

    goal = GOALS["update_over_gemm"]
    for name, key in (("comoments", "comoments"), ("universality", None)):
        data, why = load(out_dir / f"{name}.json")
        fig = (data or {}).get(key, {}) if key else (data or {})
        r = fig.get("update_over_gemm")
        if r is None:
            lines.append(f"co-moment update ÷ GEMM ({name}): MISSING ({why or 'not measured'}; "
                         f"step {step_status(codes.get(name))})")  # fmt: skip
            continue
        dtype = fig.get("dtype", "?")
        judged = verdict(r, goal) if "bfloat16" in dtype else "n/a (goal is for bf16)"
        lines.append(f"co-moment update ÷ GEMM ({name}, {dtype}, {fig.get('shape', '')}): "
                     f"{num(r)}  {judged} (goal >= {goal}); in place: {fig.get('in_place', {})}")  # fmt: skip

    uni, _ = load(out_dir / "universality.json")
    study = (uni or {}).get("study_5_seeds_min_1_device")
    goal = GOALS["study_min_1_device"]
    if study is None:
        lines.append(f"study, 5 GPT-2-small seeds x 100M tokens, one device (goal <= {goal:.0f} "
                     f"min): MISSING (step {step_status(codes.get('universality'))})")  # fmt: skip
    else:
        lines.append(f"study, 5 GPT-2-small seeds x 100M tokens: {num(study, '.1f')} min on one "
                     f"device {verdict(study, goal, higher_is_better=False)} (goal <= {goal:.0f}); "
                     f"{num(uni.get('study_5_seeds_min_8_devices'), '.1f')} min on 8; "
                     f"{uni.get('plan_groups_1')} pair groups in {num(uni.get('budget_gib'), '.0f')} "
                     f"of {num(uni.get('device_memory_gib'), '.0f')} GiB; forwards "
                     f"{num(uni.get('study_forwards_min_1_device'), '.1f')} min of it")  # fmt: skip
        if "finalize_pair_s" in uni:
            lines.append(f"  finalising one pair: {num(uni['finalize_pair_s'], '.1f')} s")
        else:
            lines.append(f"  finalising: MISSING (step {step_status(codes.get('universality'))})")
    return lines


def summary(out_dir: Path, codes: dict[str, int], smoke: bool = False) -> list[str]:
    text = None
    if (out_dir / "pytest.txt").is_file():
        text = (out_dir / "pytest.txt").read_text(errors="replace")
    lines = ["== summary" + (" (CPU smoke run: the figures are not the engine's)" if smoke else "")]
    lines += ["steps: " + ", ".join(f"{k} {step_status(v)}" for k, v in codes.items())]
    lines += pytest_lines(text, codes.get("pytest"))
    lines += figure_lines(out_dir, codes)
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("out", type=Path)
    ap.add_argument("--step", action="append", default=[], help="NAME=EXIT_CODE")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    codes = {}
    for s in args.step:
        name, _, code = s.partition("=")
        codes[name] = int(code) if code.lstrip("-").isdigit() else -1
    try:
        print("\n".join(summary(args.out, codes, args.smoke)))
    except Exception as e:  # the summary must not be what fails: say what broke, and go on
        print(f"summary failed: {e.__class__.__name__}: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
