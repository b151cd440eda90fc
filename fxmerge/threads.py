"""torch's intra-op thread count while fxmerge works: the ``threads`` option and its "auto" rule.

Why "auto" is the default: torch starts with one intra-op thread per physical core, and OpenMP
threads spin while they wait for each other. On a machine whose cores are busy with other work
(a laptop, a shared box, tests running beside the merge) that turns a merge into a fight for
the cores. On a shared 2-core machine at a load average of about 4, ``fxmerge merge`` on two
digits ResNets took 7.8 s with "auto" (one thread) and 11.3 s with torch's 2 threads
(``benchmarks/threads.py``); the report behind this option measured 3 min 23 s against 10 s, and
training a width-16 digits ResNet for 10 epochs took 2.4 s of CPU with one thread against 50-70 s
with two. "auto" keeps torch's setting but lowers it to the cores that are free now, so a merge
never oversubscribes more than torch itself would, and an idle machine still gets every core
torch would use. The count "auto" picks depends on the load of the moment, and the merged
model's last bits can depend on the count, through the models' own forward passes: torch's
oneDNN convolutions split their work by thread and round differently at another count. A
random-init torchvision wide_resnet50_2 pair (zip, 4 batches of 8x3x64x64) gets the same
matches and weights at 1 and 2 threads, but 98 BatchNorm running statistics differ by up to
2.1e-5 (49 of the model's 69 convolution outputs differ in their last bits); float32 matrix
products and sums of the shapes fxmerge's passes use gave the same bits at both counts. The digits ResNets
merge to the same bits at 1 and 2 threads. The same inputs and thread count give the same
weights bit for bit: ``MergeResult.threads`` is the count a merge ran with ("auto" resolved),
to pass as an int to reproduce it.

Only the intra-op threads (``torch.set_num_threads``) are set: the inter-op pool
(``torch.set_num_interop_threads``) cannot be changed once torch has run parallel work, so it
is left as it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

AUTO = "auto"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def auto_threads() -> int:
    """The "auto" thread count: torch's setting, lowered to the usable CPUs that are free.

    free = usable CPUs - the 1-minute load average scaled to them (``os.getloadavg()[0] * usable
    / os.cpu_count()``: the load is spread over all CPUs of the machine), rounded; at least 1 and
    at most ``torch.get_num_threads()`` (torch's default, OMP_NUM_THREADS, or what the caller
    set: "auto" only ever lowers it). The load average lags by about a minute and counts this
    process's own recent work too, so right after heavy work in the same process it errs on the
    side of fewer threads, which costs far less than oversubscribing. Without a load average
    (Windows) the usable CPUs count as free.
    """
    cpus = usable_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    others = load * cpus / max(os.cpu_count() or cpus, cpus)
    free = int(cpus - others + 0.5)
    return max(1, min(torch.get_num_threads(), free))


def resolve_threads(threads: int | str | None) -> int | None:
    """``threads`` option -> a thread count: "auto" -> ``auto_threads()``, an int as it is, None
    (leave torch's setting) as None."""
    return auto_threads() if threads == AUTO else threads


@contextmanager
def intra_op_threads(threads: int | str | None) -> Iterator[int]:
    """Run the block with torch's intra-op thread count set from ``threads`` (an int >= 1,
    "auto" or None: unchanged); the caller's count is restored afterwards, also on an error.
    Yields the count in effect."""
    previous = torch.get_num_threads()
    count = resolve_threads(threads)
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
