"""``python ddp_run.py <script> [args]``: run a root script (train.py, evaluate.py) as a launcher's rank would,
with what the multi-process tests need set up first, from the environment:

- ``DDPMLAB_TEST_LATE=1``: a rank other than 0 starts in the next second of the clock, so that Hydra, naming the run
  directory from each process's clock, would name two;
- ``DDPMLAB_TEST_RECORD=<dir>``: the sample chunks this rank draws are recorded in ``<dir>/rank<r>.json``, and the
  tiny torch-fidelity extractor of test_fid is registered (``fid.feature_extractor=tiny-test``).
"""

import json
import os
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
rank = next((os.environ[k] for k in ("RANK", "SLURM_PROCID") if k in os.environ), "0")
if os.environ.get("DDPMLAB_TEST_LATE") and rank != "0":
    time.sleep(1.1 - time.time() % 1)
if os.environ.get("DDPMLAB_TEST_RECORD"):
    import ddpmlab.metrics.fid as fid
    from test_fid import register_tiny_fidelity_extractor

    register_tiny_fidelity_extractor()
    drawn, draw = [], fid.generate_chunks
    out = Path(os.environ["DDPMLAB_TEST_RECORD"]) / f"rank{rank}.json"

    def recorded(denoiser, sampler, chunks, *args, **kwargs):
        drawn.extend(chunks)
        out.write_text(json.dumps(drawn))
        return draw(denoiser, sampler, chunks, *args, **kwargs)

    fid.generate_chunks = recorded
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
