"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand (no
client library needed at run time).

    qsparse_requests_total{endpoint, status}       HTTP requests answered, by status code
    qsparse_requests_cancelled_total               requests dropped because the client went away / a stop string matched
    qsparse_prompt_tokens_total                    prompt tokens admitted
    qsparse_generation_tokens_total                tokens generated
    qsparse_time_to_first_token_seconds            histogram: submit → first token (queue + prefill)
    qsparse_decode_steps_total, qsparse_decode_rows_total, qsparse_decode_seconds_total
                                                   batched decode steps, rows in them, time in them:
                                                   mean batch = rows / steps, decode tokens/s = rows / seconds
    qsparse_decode_tokens_per_second               rows / wall time of the last decode step
    qsparse_requests_running, qsparse_requests_waiting   gauges
    qsparse_input_sparsity{projection}             measured zero fraction of each projection's input since start
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Metrics", "TTFT_BUCKETS"]

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _labels(**kw: str) -> str:
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(str(v))}"' for k, v in kw.items()) + "}" if kw else ""


class Metrics:
    """Thread-safe counters; ``render()`` gives the ``/metrics`` body."""

    def __init__(self, sparsity: Callable[[], dict[str, float]] | None = None) -> None:
        self._lock = threading.Lock()
        self._sparsity = sparsity
        self.requests: dict[tuple[str, int], int] = {}
        self.cancelled = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_n = 0
        self.steps = 0
        self.rows = 0
        self.decode_s = 0.0
        self.last_step_tps = 0.0
        self.running = 0
        self.waiting = 0

    def add_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def add_cancelled(self, n: int) -> None:
        if n:
            with self._lock:
                self.cancelled += n

    def add_prompt_tokens(self, n: int) -> None:
        with self._lock:
            self.prompt_tokens += n

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self.generation_tokens += n

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            for i, le in enumerate(TTFT_BUCKETS):
                if seconds <= le:
                    self.ttft_counts[i] += 1
            self.ttft_sum += seconds
            self.ttft_n += 1

    def observe_step(self, rows: int, seconds: float) -> None:
        with self._lock:
            self.steps += 1
            self.rows += rows
            self.decode_s += seconds
            self.last_step_tps = rows / seconds if seconds > 0 else 0.0

    def set_queue(self, waiting: int, running: int) -> None:
        self.waiting, self.running = waiting, running

    def render(self) -> str:
        with self._lock:
            out: list[str] = []

            def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                out.append(f"# HELP {name} {help_}")
                out.append(f"# TYPE {name} {kind}")
                out.extend(f"{name}{lab} {val!r}" if isinstance(val, float) else f"{name}{lab} {val}"
                           for lab, val in samples)

            metric("qsparse_requests_total", "counter", "HTTP requests answered, by endpoint and status code",
                   [(_labels(endpoint=e, status=str(s)), n) for (e, s), n in sorted(self.requests.items())])
            metric("qsparse_requests_cancelled_total", "counter",
                   "requests dropped before the end (client disconnected or stop string matched)",
                   [("", self.cancelled)])
            metric("qsparse_prompt_tokens_total", "counter", "prompt tokens admitted", [("", self.prompt_tokens)])
            metric("qsparse_generation_tokens_total", "counter", "tokens generated", [("", self.generation_tokens)])
            ttft = [(_labels(le=repr(le)), c) for le, c in zip(TTFT_BUCKETS, self.ttft_counts)]
            ttft.append((_labels(le="+Inf"), self.ttft_n))
            out.append("# HELP qsparse_time_to_first_token_seconds time from request submission to its first token")
            out.append("# TYPE qsparse_time_to_first_token_seconds histogram")
            out.extend(f"qsparse_time_to_first_token_seconds_bucket{lab} {c}" for lab, c in ttft)
            out.append(f"qsparse_time_to_first_token_seconds_sum {self.ttft_sum!r}")
            out.append(f"qsparse_time_to_first_token_seconds_count {self.ttft_n}")
            metric("qsparse_decode_steps_total", "counter", "batched decode steps", [("", self.steps)])
            metric("qsparse_decode_rows_total", "counter", "request rows over all decode steps", [("", self.rows)])
            metric("qsparse_decode_seconds_total", "counter", "wall time in decode steps", [("", float(self.decode_s))])
            metric("qsparse_decode_tokens_per_second", "gauge", "tokens per second of the last decode step",
                   [("", float(self.last_step_tps))])
            metric("qsparse_requests_running", "gauge", "requests being decoded", [("", self.running)])
            metric("qsparse_requests_waiting", "gauge", "requests queued for a batch slot", [("", self.waiting)])
        stats = self._sparsity() if self._sparsity is not None else {}
        metric("qsparse_input_sparsity", "gauge",
               "measured zero fraction of each projection's input since the server started",
               [(_labels(projection=k), float(v)) for k, v in sorted(stats.items())])
        return "\n".join(out) + "\n"
