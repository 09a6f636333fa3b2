"""Load generator for any OpenAI-compatible server: N concurrent streaming clients on a fixed-seed workload of
mixed prompt and output lengths, reporting output tok/s, TTFT and inter-token latency per concurrency.

It knows nothing of Herd (import-linter forbids it to import `herd`), so the same numbers can be taken from
herd, transformers or vLLM. `herd bench` is its command line, as is `python -m herd_loadgen`:

    herd bench --url http://127.0.0.1:8000 --model NAME --concurrency 1 8 32 --requests 64 --seed 0 \\
               [--endpoint chat|completions] [--api-key KEY] [--plot out.png]

workload   Request, make_workload: the same requests for the same seed
client     run_load: the requests, `concurrency` at a time, as streams timed on the client's clock
results    RequestRecord, LoadResult (its summary), percentile
report     table_header, table_row (markdown), plot (PNG)
cli        main
"""

from herd_loadgen.cli import main
from herd_loadgen.client import ENDPOINTS, ExtraBody, run_load
from herd_loadgen.report import plot, table_header, table_row
from herd_loadgen.results import LoadResult, RequestRecord, percentile
from herd_loadgen.workload import WORDS, Request, make_workload

__all__ = [
    "ENDPOINTS", "WORDS", "ExtraBody", "LoadResult", "Request", "RequestRecord", "main", "make_workload",
    "percentile", "plot", "run_load", "table_header", "table_row",
]
