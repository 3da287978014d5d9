"""The exit codes of every tensorfleet command and process, defined once.

`tensorfleet run` (and `submit --wait`, `watch`, a service job's engine process, `slurm`, `top`):
0 every row done, 1 some rows failed (see the errors table), 2 fatal (bad spec, unreadable input,
no server reachable, a refused request), always with a message that says what to fix; 3 a job's
engine crashed (an unexpected exception: workflows/run_command.py, passed on by `submit --wait`
and `watch`). A model
server whose device failed exits EXIT_DEVICE_LOST (EX_TEMPFAIL), for its supervisor to start it
afresh.
"""

EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_FATAL = 2
EXIT_CRASH = 3
EXIT_DEVICE_LOST = 75
