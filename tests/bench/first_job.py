"""A fresh stack's first jobs: ``python -m tests.bench.first_job [JOBS]``.

Starts a stack as :mod:`tests.bench.run` does (one gunicorn process, one worker, the upstream),
then times its first jobs, one at a time, from POST to the first chunk (each read to
``[DONE]``): what the first users after a deploy or a restart wait, before any pool, cache or
lazy load of the processes is warm.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.run import Bench, first_chunk_body, time_to_first_chunk  # noqa: E402


def main(argv: list[str]) -> int:
    jobs = int(argv[0]) if argv else 3
    bench = Bench(False, Path(tempfile.mkdtemp(prefix="first-job-")))
    try:
        bench.stack.start_worker()
        url = f"{bench.relay(1)[0]}/v1/chat/completions"
        body = first_chunk_body()
        took = [time_to_first_chunk(url, body) for _ in range(jobs)]
    finally:
        bench.stop()
    print("POST to first chunk, ms:", " ".join(f"{t * 1e3:.1f}" if t else "-" for t in took))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
