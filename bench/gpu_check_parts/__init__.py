"""The parts of `bench/gpu_check.py`, the prepared GPU check (issue 12), one job per module.

`bench/gpu_check.py` stays the entry point (`python3 bench/gpu_check.py --out ...`) and runs the
checks in order; it imports this package as `gpu_check_parts`, a top-level package beside it (the
script's own folder, bench/, is the first entry of sys.path when it runs):

    shapes.py     ModelShape / RunShape and the size presets (BIG, SMALL, PARITY), the seed
    fixtures.py   what the runs read: a tokenizer, random-init HF folders, scored rollout buffers
    compare.py    the verdicts on numbers: step metrics GPU vs CPU, training metrics, tokens/s,
                  bit-exact HF folders
    gpu_watch.py  GPU memory read from outside the processes (NVML or nvidia-smi) while a process
                  tree runs, and what counts as that tree having used the GPU
    processes.py  subprocesses: their environment, logged and watched runs, the environment probe
    checks.py     the checks themselves (convert, gpu_train, parity, trainer_offload) and their time budget
    offload_probe.py  the trainer offload measured in a process of its own (run by trainer_offload)
    report.py     the JSON report: its schema, its validation, the summary printed for a person
"""
