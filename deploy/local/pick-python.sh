#!/bin/sh
# Prints the interpreter `make` builds .venv on (unless PYTHON is given): of the Pythons 3.11+ on
# the PATH that can make a venv with pip, the fastest at pure-Python work. Why: a source build
# without profile-guided optimization (pyenv's default) runs Python code 1.3-2x slower than a
# distribution's build of the same version, and the pipeline's run processes, Dagster's event
# handling and the backtest loop are Python code (bench/daemon.py, 20 symbols, same machine: the
# refresh took 13.8 s on pyenv's 3.11.7 and 10.9 s on Debian's 3.11.2).
# What it chose, and the others' times, go to stderr.
best=""
best_us=""
report=""
for name in python3.13 python3.12 python3.11 python3 /usr/local/bin/python3 /usr/bin/python3; do
  command -v "$name" >/dev/null 2>&1 || continue
  # prints "<best of 25 timings in microseconds> <sys.executable>", or fails (too old, no venv/pip)
  line=$("$name" - 2>/dev/null <<'PY'
import os, sys, time
assert sys.version_info >= (3, 11)
import ensurepip, venv  # noqa: F401  (Debian splits these into python3-venv)
timings = []
for _ in range(25):
    started = time.perf_counter()
    sum(range(1_000_000))
    timings.append(time.perf_counter() - started)
print(int(min(timings) * 1e6), os.path.realpath(sys.executable))
PY
) || continue
  us=${line%% *}
  path=${line#* }
  case " $report " in *" $path "*) continue ;; esac
  report="$report $path $((us / 1000)) ms,"
  if [ -z "$best" ] || [ "$us" -lt "$best_us" ]; then best=$path; best_us=$us; fi
done
if [ -z "$best" ]; then
  echo python3  # the Makefile's version check then says what is missing
  exit 0
fi
echo "make: .venv is built on $best, the fastest Python 3.11+ found (sum(range(10**6)) took:${report%,}; PYTHON=... chooses another)" >&2
echo "$best"
