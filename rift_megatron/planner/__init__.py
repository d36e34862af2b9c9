"""`rift plan`: the parallelism and memory planner for co-located RIFT (issue 16).

space.py enumerates layouts, evaluate.py gives each its per-GPU memory in both phases (through
rift_megatron/memory_model.py, the one memory model), push volume and step time (step_time.py),
plan.py recommends one, report.py / cli.py print it. Pure Python: no torch import.
"""
