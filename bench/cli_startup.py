"""Start-up time of the `medclip` command against `python -c "import torch"`, same interpreter, one run.

`medclip --help`, `medclip --version` and `medclip pretrain --help` must not wait for torch (goal:
`medclip --help` under 0.3x the time of importing torch alone). Each repeat runs every command once
in a fresh process, in rotating order, so a busy shared machine slows all of them alike. Prints the
median (and min) wall time of each over --repeats and each ratio to `import torch`.

    .venv/bin/python bench/cli_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

REFERENCE = "import torch"
COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "medclip --help": [sys.executable, "-m", "medclip", "--help"],
    "medclip --version": [sys.executable, "-m", "medclip", "--version"],
    "medclip pretrain --help": [sys.executable, "-m", "medclip", "pretrain", "--help"],
    "medclip eval suite --help": [sys.executable, "-m", "medclip", "eval", "suite", "--help"],
}
GOAL = 0.3


def wall_time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    names = list(COMMANDS)
    for cmd in COMMANDS.values():  # warm the file-system cache for every side
        wall_time(cmd)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            times[name].append(wall_time(COMMANDS[name]))
    reference = statistics.median(times[names[0]])
    print(f"{'command':28s} {'median s':>9s} {'min s':>7s} {'x import torch':>15s}")
    for name in names:
        median = statistics.median(times[name])
        print(f"{name:28s} {median:9.3f} {min(times[name]):7.3f} {median / reference:15.3f}")
    ratio = statistics.median(times["medclip --help"]) / reference
    print(f"medclip --help / import torch = {ratio:.3f} (goal < {GOAL}): {'met' if ratio < GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
