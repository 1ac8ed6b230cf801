"""Mutation testing for fastbyol: a small script, not part of CI (see tests/README.md).

    .venv/bin/python tests/mutate.py [--per-module 10] [--seed 0] [--tests-from worktree|COMMIT]
                                     [--source-from worktree|COMMIT] [--modules fastbyol/step.py ...]
                                     [--timeout 240] [--out FILE]

Each mutant is one small change to one module's syntax tree (an arithmetic or comparison operator
swapped, a constant nudged, a boolean flipped, a call's arguments or a statement dropped, a unary minus
removed), made in a COPY of the package in a temporary folder, so engineers working in the checkout
never see it. The fast tests that cover the module then run against the copy (`pytest -x`, a
per-mutant timeout); a failing or timed-out run kills the mutant. Mutants are a fixed-seed sample of
each module's mutation points, so two runs with the same source and seed test the same mutants:
`--tests-from 6ee950f` takes the tests of that commit (git archive), the default the tests as they
are in the working tree; `--source-from COMMIT` pins the package mutated (the default, the working
tree, moves while others edit it). Test files a run does not have are left out of its command, and
tests that fail on the unmutated package are deselected (listed in the output).

`--after BEFORE.json` scores the same mutants for the tests of BEFORE's commit PLUS the test files
added since (those of the working tree that the commit lacks, with the working tree's conftest.py and
helpers): a mutant BEFORE killed stays killed (the same files run again would kill it again), and
each survivor is run against the added files only. The score says what the added tests contribute.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The fast tests that cover each module, most direct first. SLOW deselects what takes minutes on a
# 2-core machine (inductor compiles, the 20,000-draw crop statistics, multi-process runs).
COVERAGE = {
    "fastbyol/model.py": ["test_oracle_step.py", "test_model.py", "test_step.py"],
    "fastbyol/step.py": ["test_oracle_step.py", "test_step.py"],
    "fastbyol/kernels/lars.py": ["test_oracle_step.py", "test_lars_ema.py"],
    "fastbyol/kernels/ema.py": ["test_oracle_step.py", "test_lars_ema.py"],
    "fastbyol/kernels/crop_resize.py": ["test_crop_geometry.py", "test_torchvision_pipeline.py"],
    "fastbyol/kernels/augment.py": ["test_augment.py", "test_torchvision_pipeline.py"],
    "fastbyol/views.py": ["test_sampler_joint.py", "test_crop_geometry.py", "test_view_sampling.py",
                          "test_torchvision_pipeline.py"],
    "fastbyol/train.py": ["test_trainer_wiring.py", "test_export_resume.py", "test_train.py"],
}
SLOW = ("not compiled_step_compiles_once and not crops_match_torchvision and not two_workers "
        "and not ddp and not gloo and not world_size")

_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
          ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
          ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.And: ast.Or, ast.Or: ast.And,
          ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
          ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}


def mutation_points(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(node number in ast.walk order, kind, description) for every mutable node."""
    points = []
    for number, node in enumerate(ast.walk(tree)):
        line = getattr(node, "lineno", "?")
        if isinstance(node, (ast.BinOp, ast.AugAssign, ast.BoolOp)) and type(node.op) in _SWAPS:
            points.append((number, "op", f"line {line}: {type(node.op).__name__} -> "
                                         f"{_SWAPS[type(node.op)].__name__}"))
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in _SWAPS:
            points.append((number, "cmp", f"line {line}: {type(node.ops[0]).__name__} -> "
                                          f"{_SWAPS[type(node.ops[0])].__name__}"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool is not int here
            points.append((number, "num", f"line {line}: {node.value!r} -> {_nudge(node.value)!r}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            points.append((number, "bool", f"line {line}: {node.value} -> {not node.value}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            points.append((number, "unary", f"line {line}: drop {type(node.op).__name__}"))
        elif isinstance(node, ast.keyword) and node.arg:
            points.append((number, "kwarg", f"line {line}: drop keyword {node.arg}="))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            points.append((number, "stmt", f"line {line}: drop the call {ast.unparse(node)[:60]!r}"))
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Subscript)):
            points.append((number, "stmt", f"line {line}: drop {ast.unparse(node)[:60]!r}"))
    return points


def _nudge(value):
    return value + 1 if value in (0, -1) or isinstance(value, int) else value * 1.5


class _Drop(ast.NodeTransformer):
    """Removes one keyword from its call."""

    def __init__(self, victim):
        self.victim = victim

    def visit_Call(self, node):
        self.generic_visit(node)
        node.keywords = [k for k in node.keywords if k is not self.victim]
        return node


def mutate(source: str, number: int) -> str:
    """The source with mutation point `number` applied."""
    tree = ast.parse(source)
    node = list(ast.walk(tree))[number]
    if isinstance(node, (ast.BinOp, ast.AugAssign, ast.BoolOp)):
        node.op = _SWAPS[type(node.op)]()
    elif isinstance(node, ast.Compare):
        node.ops[0] = _SWAPS[type(node.ops[0])]()
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        node.value = not node.value
    elif isinstance(node, ast.Constant):
        node.value = _nudge(node.value)
    elif isinstance(node, ast.UnaryOp):
        replacement = node.operand
        for parent in ast.walk(tree):
            for field, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, field, replacement)
                elif isinstance(value, list) and any(v is node for v in value):
                    setattr(parent, field, [replacement if v is node else v for v in value])
    elif isinstance(node, ast.keyword):
        _Drop(node).visit(tree)
    else:  # a statement: becomes `pass`
        for parent in ast.walk(tree):
            for field, value in ast.iter_fields(parent):
                if isinstance(value, list) and any(v is node for v in value):
                    setattr(parent, field, [ast.Pass() if v is node else v for v in value])
    return ast.unparse(ast.fix_missing_locations(tree))


def sample(source: str, module: str, per_module: int, seed: int) -> list[tuple[int, str, str]]:
    points = mutation_points(ast.parse(source))
    return sorted(random.Random(f"{seed}:{module}").sample(points, min(per_module, len(points))))


def copy_folder(name: str, source: str, into: Path) -> Path:
    """REPO/name as in the working tree (source "worktree") or at a commit, copied into `into`."""
    if source == "worktree":
        shutil.copytree(REPO / name, into / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", source, name], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / name


def run_tests(work: Path, files: list[str], timeout: float, deselect=(), stop_at_first: bool = True
              ) -> tuple[str, float, list[str]]:
    """pytest over `files` in `work` (-x unless stop_at_first is False); the whole process group is
    killed on timeout. Returns (verdict, seconds, the node ids of failed tests)."""
    start = time.perf_counter()
    report = work / "report.txt"
    command = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-k", SLOW,
               *(["-x"] if stop_at_first else []), *[f"--deselect={d}" for d in deselect],
               *[f"tests/{f}" for f in files]]
    with open(report, "w") as out:
        proc = subprocess.Popen(command, cwd=work, env=_env(work), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            # 0: passed; 1: a test failed; 2-4: collection or usage errors (a mutant breaking an import)
            verdict = "survived" if code == 0 else "killed"
        except subprocess.TimeoutExpired:
            verdict = "killed (timeout)"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the run and anything it started
            except ProcessLookupError:
                pass
            proc.wait()
    failed = [line[len("FAILED "):].split(" - ")[0] for line in report.read_text().splitlines()
              if line.startswith("FAILED ")]  # node ids may hold spaces ("[a b]"); " - why" follows
    return verdict, time.perf_counter() - start, failed


def _env(work: Path) -> dict:
    shared = os.environ.get("FASTBYOL_SHARED_DATA", str(REPO.parent / "shared" / "data"))
    return dict(os.environ, PYTHONPATH=str(work), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
                FASTBYOL_SHARED_DATA=shared)


def _added_tests(tests_from: str, work: Path) -> list[str]:
    """Overlay onto work/tests the working tree's test files that `tests_from` lacks, and its
    conftest.py; returns the names of the added files."""
    added = []
    for path in sorted((REPO / "tests").glob("*.py")):
        target = work / "tests" / path.name
        if not target.exists() or path.name == "conftest.py":
            shutil.copyfile(path, target)
            added += [path.name] if path.name != "conftest.py" else []
    return added


def _settings(args) -> dict:
    return dict(tests_from=args.tests_from, source_from=args.source_from, seed=args.seed,
                per_module=args.per_module, after=str(args.after) if args.after else None)


def _resume(args) -> list[dict]:
    if args.list or not args.out or not args.out.exists():
        return []
    saved = json.loads(args.out.read_text())
    return saved["mutants"] if all(saved.get(k) == v for k, v in _settings(args).items()) else []


def _save(args, results: list[dict]) -> None:
    if args.out:
        killed = sum(r["verdict"] != "survived" for r in results)
        args.out.write_text(json.dumps(dict(_settings(args), killed=killed, total=len(results),
                                            mutants=results), indent=1) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="tests/mutate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="*", default=list(COVERAGE))
    parser.add_argument("--per-module", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tests-from", default="worktree", help="worktree, or a commit (git archive)")
    parser.add_argument("--source-from", default="worktree", help="worktree, or a commit (git archive)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per mutant")
    parser.add_argument("--list", action="store_true", help="print the sampled mutants and stop")
    parser.add_argument("--out", type=Path, help="JSON with every mutant's verdict")
    parser.add_argument("--after", type=Path, help="a --out of a run over an older commit's tests: "
                        "score its mutants for those tests plus the files added since")
    args = parser.parse_args(argv)
    before = {}
    if args.after:
        saved = json.loads(args.after.read_text())
        args.tests_from, args.source_from = saved["tests_from"], saved["source_from"]
        args.seed, args.per_module = saved["seed"], saved["per_module"]
        before = {(r["module"], r["number"]): r for r in saved["mutants"]}
    with tempfile.TemporaryDirectory(prefix="fastbyol-mutants-") as tmp:
        work = Path(tmp)
        copy_folder("fastbyol", args.source_from, work)
        tests = copy_folder("tests", args.tests_from, work)
        added = _added_tests(args.tests_from, work) if args.after else []
        # --out is rewritten after every mutant; a rerun with the same settings skips what it holds
        results = _resume(args)
        done = {(r["module"], r["number"]) for r in results}
        for module in args.modules:
            if all((module, n) in done for n, _, _ in sample((work / module).read_text(), module,
                                                              args.per_module, args.seed)):
                continue
            files = [f for f in COVERAGE[module] if (tests / f).exists() and (not args.after or f in added)]
            original = (work / module).read_text()
            deselect = []
            if args.after and any((module, n) not in before for n, _, _ in
                                  sample(original, module, args.per_module, args.seed)):
                print(f"{module}: the --after run has no verdict for it yet (rerun later)", flush=True)
                continue
            if not files:  # nothing added covers this module: the earlier verdicts stand
                for number, kind, what in sample(original, module, args.per_module, args.seed):
                    if (module, number) not in done and not args.list:
                        results.append(dict(before[(module, number)], tests=[]) if args.after else
                                       dict(module=module, number=number, kind=kind, what=what,
                                            verdict="survived", seconds=0.0, tests=[], left_out=[]))
                _save(args, results)
                continue
            if not args.list:  # tests that fail on the unmutated package cannot judge a mutant
                verdict, seconds, deselect = run_tests(work, files, args.timeout, stop_at_first=False)
                print(f"unmutated {module}: {verdict} in {seconds:.0f}s ({' '.join(files)})"
                      + (f"; left out, failing already: {' '.join(deselect)}" if deselect else ""),
                      flush=True)
                if verdict != "survived" and not deselect:
                    sys.exit(f"the unmutated {module} fails its tests outside any test: fix that first")
            for number, kind, what in sample(original, module, args.per_module, args.seed):
                if (module, number) in done:
                    continue
                if args.list:
                    print(f"{module} #{number} {kind}: {what}")
                    continue
                earlier = before.get((module, number))
                if earlier and earlier["verdict"] != "survived":
                    results.append(dict(earlier, verdict=earlier["verdict"] + " (before)"))
                    _save(args, results)
                    continue
                (work / module).write_text(mutate(original, number))
                verdict, seconds, _ = run_tests(work, files, args.timeout, deselect)
                (work / module).write_text(original)
                results.append(dict(module=module, number=number, kind=kind, what=what, verdict=verdict,
                                    seconds=round(seconds, 1), tests=files, left_out=deselect))
                print(f"{verdict:>16}  {seconds:6.1f}s  {module} #{number}: {what}", flush=True)
                _save(args, results)
    if args.list:
        return
    killed = sum(r["verdict"] != "survived" for r in results)
    which = f"{args.tests_from} tests" + (" + the files added since" if args.after else "")
    print(f"\nmutation score ({which}): {killed}/{len(results)} killed "
          f"= {100 * killed / max(1, len(results)):.0f}%")
    _save(args, results)


if __name__ == "__main__":
    main()
