"""The server's counters, exposed at GET /metrics in Prometheus' text format."""
from __future__ import annotations

import threading
from collections import Counter

# Upper bounds (seconds) of the time-to-first-token histogram's buckets.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = Counter()          # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_n = 0

    def request(self, endpoint: str, status: int):
        with self._lock:
            self.requests[(endpoint, int(status))] += 1

    def tokens(self, prompt: int, generated: int):
        with self._lock:
            self.prompt_tokens += int(prompt)
            self.generated_tokens += int(generated)

    def first_token(self, seconds: float):
        with self._lock:
            self.ttft_sum += seconds
            self.ttft_n += 1
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self.ttft_counts[i] += 1

    def render(self, slots_total: int, slots_busy: int, queued: int, steps: int = 0,
               slot_steps: int = 0, rows: int = 0) -> str:
        with self._lock:
            lines = ["# HELP kiln_requests_total HTTP requests by endpoint and status.",
                     "# TYPE kiln_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'kiln_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += ["# HELP kiln_prompt_tokens_total Prompt tokens of finished requests.",
                      "# TYPE kiln_prompt_tokens_total counter",
                      f"kiln_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP kiln_generated_tokens_total Tokens generated.",
                      "# TYPE kiln_generated_tokens_total counter",
                      f"kiln_generated_tokens_total {self.generated_tokens}",
                      "# HELP kiln_time_to_first_token_seconds From request to first text piece.",
                      "# TYPE kiln_time_to_first_token_seconds histogram"]
            for bound, n in zip(TTFT_BUCKETS, self.ttft_counts):
                lines.append(f'kiln_time_to_first_token_seconds_bucket{{le="{bound}"}} {n}')
            lines += [f'kiln_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_n}',
                      f"kiln_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                      f"kiln_time_to_first_token_seconds_count {self.ttft_n}",
                      "# HELP kiln_slots Generation slots.", "# TYPE kiln_slots gauge",
                      f"kiln_slots {slots_total}",
                      "# HELP kiln_slots_busy Slots generating now.", "# TYPE kiln_slots_busy gauge",
                      f"kiln_slots_busy {slots_busy}",
                      "# HELP kiln_batch_steps_total Batched evaluations (one pass over the weights each).",
                      "# TYPE kiln_batch_steps_total counter", f"kiln_batch_steps_total {steps}",
                      "# HELP kiln_batch_slot_steps_total Slots served by those evaluations.",
                      "# TYPE kiln_batch_slot_steps_total counter",
                      f"kiln_batch_slot_steps_total {slot_steps}",
                      "# HELP kiln_batch_rows_total Tokens evaluated by those evaluations.",
                      "# TYPE kiln_batch_rows_total counter", f"kiln_batch_rows_total {rows}",
                      "# HELP kiln_requests_waiting Requests waiting for a slot.",
                      "# TYPE kiln_requests_waiting gauge",
                      f"kiln_requests_waiting {queued}"]
        return "\n".join(lines) + "\n"
