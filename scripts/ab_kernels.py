"""A/B of the CUDA kernels: a benchmark script run against this tree's csrc and against a base copy of csrc (another
revision's), in alternating rounds, each side in its own process with its own extension build.

    mkdir -p bench/base && git archive HEAD csrc | tar -x -C bench/base      # the base: HEAD's kernels
    python scripts/ab_kernels.py --base-csrc bench/base/csrc -- scripts/bench_decode.py --no-baselines --rows h128

A side whose kernels do not build is not timed: the op would fall back to Triton or the reference and the comparison
would be void (a base csrc missing a source file the tree's build lists is built from the files it has). Both sides
are built first, in parallel; then `--rounds` rounds run in ABBA order (tree, base; base, tree; ...), so that a drift
over the run or a cost of going first falls on both sides alike. For an A/A run (what the tool resolves at all), give
a copy of this tree's csrc as the base: `cp -r csrc bench/same && ... --base-csrc bench/same`. The benchmark's
`--out PREFIX`, if given, becomes PREFIX_tree_r1, PREFIX_base_r1, ... so that no run overwrites another's JSON and PNG.
Both sides run this tree's Python: a base whose bindings take other arguments than the tree's ops pass builds, then
fails at its first call. `--tests "PATH ..."` runs those tests (pytest, stopping at the first failure) on the base's
kernels after the builds and times nothing if one fails: an experiment that computes something else is not timed.
By hand: `FLASHMLA_CSRC=bench/base/csrc python -m pytest -m gpu tests/ops` (each csrc directory builds apart,
flashmla_ops._ext.build_name).

Several bases in one run: give `--base-csrc` once per base (bench/<name>/csrc, each named by <name>). All sides build
in parallel, `--tests` runs on each base, and the rounds run the sides in order, then reversed (tree, a, b; b, a,
tree; ...), so that one device call compares several experiments with main:

    python scripts/ab_kernels.py --base-csrc bench/pdl/csrc --base-csrc bench/other/csrc -- scripts/bench_decode.py
"""
import argparse
import os
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def side_environment() -> dict:
    env = dict(os.environ)
    env.pop("FLASHMLA_CSRC", None)  # the tree side builds this tree's csrc; the base side is pointed at its own
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "scripts"), env.get("PYTHONPATH")]))
    return env


def run_side(base_csrc: str | None, script: list[str]) -> None:
    """In the child: point the extension build at the base csrc (if given), build it, refuse to go on without it, then
    run the script (or only build, with no script)."""
    import flashmla_ops._ext as ext

    if base_csrc is not None:
        ext.CSRC = Path(base_csrc).resolve()
        ext.SOURCES = tuple(name for name in ext.SOURCES if (ext.CSRC / name).exists())
    if ext._load() is None:
        print(f"ab_kernels: the CUDA kernels of {ext.CSRC} did not build or load here; this side is not timed",
              file=sys.stderr)
        sys.exit(3)
    if script:
        sys.argv = script
        runpy.run_path(script[0], run_name="__main__")


def pytest_command(base_csrc: str, tests: list[str]) -> tuple[list[str], dict]:
    """The pytest command line and environment that run `tests` on the base's kernels (its own build, FLASHMLA_CSRC)."""
    env = side_environment()
    env["FLASHMLA_CSRC"] = str(Path(base_csrc).resolve())
    return [sys.executable, "-m", "pytest", "-q", "-x", *tests], env


def round_order(round_index: int, sides: tuple[str, ...] = ("tree", "base")) -> tuple[str, ...]:
    """The sides of round `round_index` (from 1) in the order they run: as given in odd rounds, reversed in even ones
    (ABBA with one base; with several, tree, b1, b2, b2, b1, tree), so that a drift over the run falls on all alike."""
    return tuple(sides) if round_index % 2 == 1 else tuple(reversed(sides))


def side_names(base_csrcs: list[str]) -> list[str]:
    """A name per base: "base" for a single one, else the directory holding each csrc (bench/<name>/csrc), made unique
    by its position where two share one."""
    if len(base_csrcs) == 1:
        return ["base"]
    names = [Path(csrc).resolve().parent.name if Path(csrc).name == "csrc" else Path(csrc).name for csrc in base_csrcs]
    return [name if names.count(name) == 1 and name != "tree" else f"base{index + 1}"
            for index, name in enumerate(names)]


def side_script(script: list[str], side: str, round_index: int) -> list[str]:
    """The benchmark's command line for one run: its `--out PREFIX` (if any) made PREFIX_<side>_r<round>."""
    script = list(script)
    for i, arg in enumerate(script):
        if arg == "--out" and i + 1 < len(script):
            script[i + 1] = f"{script[i + 1]}_{side}_r{round_index}"
        elif arg.startswith("--out="):
            script[i] = f"{arg}_{side}_r{round_index}"
    return script


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-csrc", action="append", required=True,
                        help="a base revision's csrc directory; several: each is a side of its own")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tests", default="", help="test paths (space-separated) each base's kernels must pass first")
    parser.add_argument("--side", choices=["tree", "base"], help=argparse.SUPPRESS)
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS...: the benchmark to run")
    args = parser.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if args.side is not None:  # a child: one side (its csrc the one --base-csrc it was given)
        run_side(args.base_csrc[0] if args.side == "base" else None, script)
        return
    if not script:
        parser.error("give the benchmark after --, e.g. -- scripts/bench_decode.py --rows h128")
    bases = dict(zip(side_names(args.base_csrc), args.base_csrc))
    sides = ("tree", *bases)

    def command(side, run_args):
        csrc = bases.get(side, args.base_csrc[0])  # the tree side ignores it
        return [sys.executable, __file__, "--base-csrc", csrc, "--side", "tree" if side == "tree" else "base", "--",
                *run_args]

    builds = {side: subprocess.Popen(command(side, []), env=side_environment(), cwd=ROOT) for side in sides}
    failed = [side for side, process in builds.items() if process.wait() != 0]
    if failed:
        sys.exit(f"ab_kernels: no timing: the {' and '.join(failed)} kernels did not build")
    for side, csrc in bases.items() if args.tests.split() else ():
        print(f"== tests on the {side} kernels ({csrc}): {args.tests}", flush=True)
        test_argv, test_env = pytest_command(csrc, args.tests.split())
        if subprocess.run(test_argv, env=test_env, cwd=ROOT).returncode != 0:
            sys.exit(f"ab_kernels: no timing: the {side} kernels failed the tests")
    for round_index in range(1, args.rounds + 1):
        for side in round_order(round_index, sides):
            print(f"== {side}, round {round_index}", flush=True)
            result = subprocess.run(command(side, side_script(script, side, round_index)), env=side_environment(),
                                    cwd=ROOT)
            if result.returncode != 0:
                sys.exit(f"ab_kernels: the {side} run failed with exit code {result.returncode}")


if __name__ == "__main__":
    main()
