"""Solver benchmark: Geo-Sharing against naive CP-SAT, a plain HiGHS MIP and the last release.

Parts, each on the same instances for every method in one run:
- exact: families up to 16 layers (the subset DP proves them).
- large: families of 24-48 layers (curvature-like and uniform costs).
- llm: 7 families x 32 layers (LLaMA-3-8B shapes) and 7 x 80 (LLaMA-2-70B), GQA k/v sizes.
- assignment: the budgeted p-median kind, 48 to 288 layers in one family and 7 x 32.

Methods: Geo-Sharing at the request limits (default 10 and 30 s); naive CP-SAT (the whole problem
as one class-slot model, no hints); a plain HiGHS MIP of the whole problem (pairwise: same-class
variables with triangle inequalities; assignment: the dense p-median); the release before issue
20 (`--release-ref`, run from `git archive` in a subprocess, same limit); agglomerative merging
and interval DP alone. The reference is the best value any method finds, with a long Geo-Sharing
run (default 10 minutes) added wherever no method proved its value optimal.

    python bench/solver_bench.py                       # everything (about 30 minutes on 2 cores)
    python bench/solver_bench.py --parts llm --reference-time 60
    python bench/solver_bench.py --parts llm --only "llama-70b seed=2" --methods release --release-ref 34f2a18 --reference-time 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import highspy
import networkx as nx
import numpy as np

from bench.instances import llm_problem, make_problem
from bench.methods import Result, agglomerative_alone, interval_alone, naive_cpsat, rel
from solver import SharingProblem, SolveConfig, solve
from solver.evaluate import objective as score
from solver.family import build_families
from solver.highs import INF, new_highs
from solver.planning import Progress
from solver.plot import plot_progress

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RELEASE_REF = "f6f323f"  # the release before issue 20 (CP-SAT + tabu + SCIP p-median)

EXACT = [([12] * 6, 0.5), ([12] * 6, 0.75), ([16] * 4, 0.5), ([16] * 4, 0.67)]
LARGE = [([24, 24], 0.5, "curvature"), ([36], 0.5, "curvature"), ([48], 0.5, "curvature"), ([48], 0.67, "uniform")]
LLM = [("llama-8b", 1, 0.5), ("llama-70b", 1, 0.5), ("llama-8b", 2, 0.3), ("llama-70b", 2, 0.3)]
ASSIGNMENT = [([48], 0.5), ([96], 0.5), ([144], 0.5), ([288], 0.5), ([32] * 7, 0.5)]


def geo(problem: SharingProblem, time_limit_s: float, trace: list[Progress] | None = None) -> Result:
    t = time.perf_counter()
    plan = solve(problem, SolveConfig(time_limit_s=time_limit_s), progress=None if trace is None else trace.append)
    r = Result(f"geo-sharing@{time_limit_s:g}s", plan.objective, plan.bound, time.perf_counter() - t, plan.status.value)
    r.limit_hit = plan.solver.time_limit_hit  # type: ignore[attr-defined]
    return r


# --- the last release, from git, in a subprocess -------------------------------------------------

_RELEASE_RUN = """
import json, sys, time
from solver import SharingProblem, SolveConfig, solve
p = SharingProblem.model_validate_json(open(sys.argv[1]).read())
t = time.perf_counter()
plan = solve(p, SolveConfig(time_limit_s=float(sys.argv[2])))
print(json.dumps({"objective": plan.objective, "bound": plan.bound, "status": plan.status.value,
                  "time_s": time.perf_counter() - t}))
"""


def release_tree(ref: str) -> Path:
    """The release's solver package, unpacked once under the temp dir (read-only use)."""
    out = Path(tempfile.gettempdir()) / f"geo-sharing-release-{ref}"
    if not (out / "solver" / "__init__.py").exists():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "solver"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def release(problem: SharingProblem, time_limit_s: float, ref: str) -> Result:
    tree = release_tree(ref)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(problem.model_dump_json())
    try:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        out = subprocess.run([sys.executable, "-c", _RELEASE_RUN, f.name, str(time_limit_s)], env=env, cwd=tree,
                             check=True, capture_output=True, text=True, timeout=3 * time_limit_s + 120)
    finally:
        os.unlink(f.name)
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return Result(f"release {ref}@{time_limit_s:g}s", d["objective"], d["bound"], d["time_s"], d["status"])


# --- a plain HiGHS MIP of the whole problem ------------------------------------------------------


def highs_mip(problem: SharingProblem, time_limit_s: float) -> Result:
    """The textbook MIP in HiGHS, all families and the budget in one model, no hints."""
    t = time.perf_counter()
    fams = build_families(problem)
    budget = problem.budget_params()
    h = new_highs(time_limit_s)
    h.setOptionValue("mip_rel_gap", 1e-4)  # HiGHS's default: a plain run, as a user would make it
    build = _pairwise_mip if problem.costs.kind.value == "pairwise" else _assignment_mip
    read, count_cols = [], []
    for fam in fams:
        reader, counted = build(h, fam)
        read.append(reader)
        count_cols.append((fam, counted))
    if budget is not None:
        # unique params: class_params per class plus member_params per layer
        cols = np.concatenate([c for _, c in count_cols]).astype(np.int32)
        vals = np.concatenate([np.full(len(c), float(f.class_params)) for f, c in count_cols])
        rest = float(sum(f.member_params * f.n for f in fams))
        h.addRow(-INF, float(budget) - rest, len(cols), cols, vals)
    h.run()
    elapsed = time.perf_counter() - t
    sol = h.getSolution()
    info = h.getInfo()
    status = h.getModelStatus().name.removeprefix("k").lower()
    if not sol.value_valid:
        return Result(f"highs-mip@{time_limit_s:g}s", None, None, elapsed, status)
    x = np.asarray(sol.col_value)
    coloring, offset = {}, 0
    for fam, reader in zip(fams, read, strict=True):
        labels = reader(x)
        for local, g in enumerate(fam.layer_ids):
            coloring[problem.layers[g].name] = offset + int(labels[local])
        offset += int(labels.max()) + 1
    bound = fams[0].to_problem(float(info.mip_dual_bound) + sum(f.reduced.constant for f in fams))
    return Result(f"highs-mip@{time_limit_s:g}s", score(problem, coloring), max(0.0, bound), elapsed, status)


def _pairwise_mip(h: highspy.Highs, fam):
    """y[a, b] = layers a < b share; triangle inequalities keep sharing transitive; z[a] >= 1 -
    sum_{b<a} y[b, a] counts a class at its first layer."""
    n = fam.n
    a_idx, b_idx = np.triu_indices(n, 1)
    pid = np.full((n, n), -1)
    first = h.getNumCol()
    pid[a_idx, b_idx] = first + np.arange(len(a_idx))
    pid[b_idx, a_idx] = pid[a_idx, b_idx]
    cost = fam.cost[a_idx, b_idx]
    banned = np.isinf(cost)
    ny = len(a_idx)
    h.addVars(ny, np.zeros(ny), np.where(banned, 0.0, 1.0))
    h.changeColsCost(ny, (first + np.arange(ny)).astype(np.int32), np.where(banned, 0.0, cost))
    h.changeColsIntegrality(ny, (first + np.arange(ny)).astype(np.int32), np.ones(ny, dtype=np.uint8))
    zfirst = h.getNumCol()
    h.addVars(n, np.zeros(n), np.ones(n))
    # transitivity: y_ab + y_bc - y_ac <= 1 for every triple, each of its three pairs as y_ac
    tri = np.array([(a, b, c) for a in range(n) for b in range(a + 1, n) for c in range(b + 1, n)], dtype=int).reshape(-1, 3)
    if len(tri):
        rows = []
        for i, j, k in ((0, 1, 2), (0, 2, 1), (1, 2, 0)):
            rows.append(np.stack([pid[tri[:, i], tri[:, k]], pid[tri[:, j], tri[:, k]], pid[tri[:, i], tri[:, j]]], axis=1))
        idx = np.concatenate(rows)
        r = len(idx)
        h.addRows(r, np.full(r, -INF), np.ones(r), 3 * r, (3 * np.arange(r)).astype(np.int32), idx.ravel().astype(np.int32),
                  np.tile([1.0, 1.0, -1.0], r))
    # class count: z_a + sum_{b<a} y_ba >= 1
    starts, idx, vals = [], [], []
    for a in range(n):
        starts.append(len(idx))
        idx += [zfirst + a] + [int(pid[b, a]) for b in range(a)]
        vals += [1.0] * (a + 1)
    h.addRows(n, np.ones(n), np.full(n, INF), len(idx), np.array(starts, dtype=np.int32), np.array(idx, dtype=np.int32), np.array(vals))

    def read(x: np.ndarray) -> np.ndarray:
        g = nx.Graph()
        g.add_nodes_from(range(n))
        g.add_edges_from((int(a), int(b)) for a, b in zip(a_idx, b_idx, strict=True) if x[pid[a, b]] > 0.5)
        labels = np.empty(n, dtype=int)
        for c, comp in enumerate(nx.connected_components(g)):
            labels[list(comp)] = c
        return labels

    return read, zfirst + np.arange(n)


def _assignment_mip(h: highspy.Highs, fam):
    """Dense p-median: x[u, r] layer u takes layer r's weights, y[r] = x[r, r] opens r."""
    n = fam.n
    ok = ~np.isinf(fam.cost)
    np.fill_diagonal(ok, True)
    us, rs = np.nonzero(ok)
    first = h.getNumCol()
    nx_ = len(us)
    h.addVars(nx_, np.zeros(nx_), np.ones(nx_))
    cols = (first + np.arange(nx_)).astype(np.int32)
    h.changeColsCost(nx_, cols, np.where(us == rs, 0.0, fam.cost[us, rs]))
    h.changeColsIntegrality(nx_, cols, np.ones(nx_, dtype=np.uint8))
    col = np.full((n, n), -1)
    col[us, rs] = cols
    # every layer takes one representative
    order = np.argsort(us, kind="stable")
    h.addRows(n, np.ones(n), np.ones(n), nx_, np.searchsorted(us[order], np.arange(n)).astype(np.int32), cols[order], np.ones(nx_))
    # only open representatives: x[u, r] <= x[r, r]
    off = np.flatnonzero(us != rs)
    r = len(off)
    idx = np.stack([cols[off], col[rs[off], rs[off]]], axis=1).ravel().astype(np.int32)
    h.addRows(r, np.full(r, -INF), np.zeros(r), 2 * r, (2 * np.arange(r)).astype(np.int32), idx, np.tile([1.0, -1.0], r))

    def read(x: np.ndarray) -> np.ndarray:
        pick = x[col[np.arange(n)].clip(0)] * ok
        reps = np.argmax(pick, axis=1)
        _, labels = np.unique(reps, return_inverse=True)
        return labels

    return read, col[np.arange(n), np.arange(n)]


# --- the run -------------------------------------------------------------------------------------


def _row(part: str, name: str, r: Result, ref: float | None = None) -> dict:
    d = {"part": part, "instance": name, "method": r.method, "objective": r.objective, "bound": r.bound,
         "time_s": round(r.time_s, 3), "status": r.status}
    if getattr(r, "limit_hit", None) is not None:
        d["time_limit_hit"] = r.limit_hit  # type: ignore[attr-defined]
    if r.bound is not None and r.objective:
        d["gap"] = max(0.0, r.objective - r.bound) / abs(r.objective)
    if ref is not None:
        d["vs_reference"] = rel(r.objective, ref)
        d["reference"] = ref
    return d


def _compare(part: str, name: str, p: SharingProblem, args: argparse.Namespace, rows: list[dict], traces: dict,
             extra: tuple = ()) -> None:
    """Every method on one instance; the reference run only where nothing was proven optimal."""
    if args.only and not any(o in name for o in args.only):
        return
    lim = max(args.limits)
    trace: list[Progress] = []
    results = [geo(p, t, trace if t == lim else None) for t in args.limits]
    traces[f"{name}: geo-sharing@{lim:g}s"] = trace
    results += [m() for m in extra]
    if p.costs.kind.value == "pairwise" and "naive-cpsat" in args.methods:
        r = naive_cpsat(p, lim, args.workers)
        r.method = f"naive-cpsat@{lim:g}s"
        results.append(r)
    if "highs" in args.methods:
        results.append(highs_mip(p, lim))
    if "release" in args.methods:
        results.append(release(p, lim, args.release_ref))
    proven = any(r.status == "optimal" and r.bound is not None for r in results if r.method.startswith("geo"))
    if not proven and args.reference_time > 0:
        ref_trace: list[Progress] = []
        refrun = geo(p, args.reference_time, ref_trace)
        refrun.method += " (reference run)"
        traces[f"{name}: geo-sharing@{args.reference_time:g}s"] = ref_trace
        results.append(refrun)
    ref = min(r.objective for r in results if r.objective is not None and math.isfinite(r.objective))
    rows += [_row(part, name, r, ref) for r in results]
    print(_markdown_rows([_row(part, name, r, ref) for r in results]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-time", type=float, default=600.0, help="seconds of the reference run (0: none)")
    ap.add_argument("--limits", type=float, nargs="+", default=[10.0, 30.0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parts", nargs="+", default=["exact", "large", "llm", "assignment"])
    ap.add_argument("--methods", nargs="+", default=["naive-cpsat", "highs", "release"])
    ap.add_argument("--release-ref", default=RELEASE_REF)
    ap.add_argument("--only", nargs="+", default=[], help="run only instances whose name holds one of these (e.g. 'llama-70b seed=2')")
    ap.add_argument("--note", default="", help="free text for the results (e.g. that the machine was shared)")
    ap.add_argument("--out", default=str(RESULTS / "solver_bench"))
    args = ap.parse_args()
    rows: list[dict] = []
    traces: dict[str, list[Progress]] = {}
    t0 = time.perf_counter()

    if "exact" in args.parts:
        for sizes, ratio in EXACT:
            name = f"{len(sizes)}x{sizes[0]} ratio={ratio}"
            p = make_problem(sizes, seed=len(sizes) * sizes[0], ratio=ratio, workers=args.workers)
            r = geo(p, 10.0)
            rows.append(_row("exact", name, r) | {"limit_s": 10.0})
    if "large" in args.parts:
        for sizes, ratio, shape in LARGE:
            name = f"{'+'.join(map(str, sizes))} {shape} ratio={ratio}"
            p = make_problem(sizes, seed=sum(sizes), ratio=ratio, shape=shape, workers=args.workers)
            _compare("large", name, p, args, rows, traces, (lambda p=p: agglomerative_alone(p), lambda p=p: interval_alone(p)))
    if "llm" in args.parts:
        for model, seed, ratio in LLM:
            p = llm_problem(model, seed=seed, ratio=ratio, workers=args.workers)
            depth = len(p.layers) // 7
            _compare("llm", f"7x{depth} {model} seed={seed} ratio={ratio}", p, args, rows, traces, (lambda p=p: agglomerative_alone(p),))
    if "assignment" in args.parts:
        for sizes, ratio in ASSIGNMENT:
            name = f"{len(sizes)}x{sizes[0]} assignment ratio={ratio}" if len(sizes) > 1 else f"{sizes[0]} assignment ratio={ratio}"
            p = make_problem(sizes, seed=sum(sizes), ratio=ratio, workers=args.workers, kind="assignment")
            _compare("assignment", name, p, args, rows, traces)

    meta = {
        "command": " ".join(["python", "bench/solver_bench.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}, {os.cpu_count()} cores",
        "cores_used": args.workers,
        "highspy": highspy.Highs().version(),
        "total_s": round(time.perf_counter() - t0, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # a shared machine shows here
        "note": args.note,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "progress": {
        k: [e.model_dump() for e in v] for k, v in traces.items()}}, indent=1))
    out.with_suffix(".md").write_text(_markdown(meta, rows))
    llm = {k.replace("7x80 llama-70b ", ""): v for k, v in traces.items() if "llama-70b" in k}
    if llm:
        plot_progress(llm, out.parent / f"{out.name}_progress.png", "7x80 layers (LLaMA-2-70B shapes): objective and bound over time")
    print(_markdown(meta, rows))


def _fmt(v, spec=".6g") -> str:
    return "" if v is None else format(v, spec)


def _markdown_rows(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        vs = r.get("vs_reference")
        hit = " (clock cut)" if r.get("time_limit_hit") else ""
        lines.append(f"| {r['instance']} | {r['method']} | {r['status']}{hit} | {_fmt(r['objective'])} | "
                     f"{'' if vs is None else f'{100 * vs:+.3f}%'} | {_fmt(r['bound'])} | {_fmt(r.get('gap'), '.4f')} | {r['time_s']} |")
    return "\n".join(lines)


_TITLES = {"large": "24-48 layers per family", "llm": "LLM depth: 7 families of 32 and 80 layers",
           "assignment": "Assignment kind (budgeted p-median)"}


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# Solver benchmark", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}, {meta['cores_used']} workers, HiGHS {meta['highspy']}, total {meta['total_s']} s"
             + (f", load average at the end {meta['load_average_at_end']}  " if meta.get("load_average_at_end") else "  ")]
    if meta.get("note"):
        lines.append(f"Note: {meta['note']}  ")
    lines += ["", "vs best: against the best objective any method reached on the instance (the reference run",
              "included where one was needed); gap: (objective - bound) / objective as each method reports it.", ""]
    exact = [r for r in rows if r["part"] == "exact"]
    if exact:
        lines += ["## Up to 16 layers per family (10 s limit)", "", "| instance | status | objective | bound | gap | time s |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['instance']} | {r['status']} | {_fmt(r['objective'])} | {_fmt(r['bound'])} | {_fmt(r.get('gap'), '.2e')} | {r['time_s']} |" for r in exact]
    for part, title in _TITLES.items():
        part_rows = [r for r in rows if r["part"] == part]
        if part_rows:
            lines += ["", f"## {title}", "", "| instance | method | status | objective | vs best | bound | gap | time s |",
                      "|---|---|---|---|---|---|---|---|", _markdown_rows(part_rows)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
