"""`drseg bench gpu`: one command, one run, every GPU figure the project needs — environment, GPU tests, project vs
plain-PyTorch throughput, loader, CBAM, a short full run and a sync check — under one deadline, row by row into
DIR/results.jsonl. driver (parts in worker processes) · plan (parts, sizes) · worker · results · the parts' modules.
"""

from hpc_drseg.gpu_check.driver import run_gpu_check
from hpc_drseg.gpu_check.plan import DEFAULT_DEADLINE_S, PART_NAMES

__all__ = ["DEFAULT_DEADLINE_S", "PART_NAMES", "run_gpu_check"]
