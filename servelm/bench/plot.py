"""`--plot`: latency histograms and output throughput over time, drawn with matplotlib."""
from __future__ import annotations

from typing import Sequence

from servelm.bench.metrics import RequestRecord, output_throughput_timeline


def save_plot(path: str, records: Sequence[RequestRecord], start_time: float,
              bin_s: float = 1.0) -> None:
    """A 2x2 figure: TTFT, TPOT and E2EL histograms (ms) and output tok/s per `bin_s` bin."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib "
                         "(or servelm[bench]), or drop --plot.") from None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.success]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = (("TTFT (ms)", [1000 * r.ttft for r in ok]),
              ("TPOT (ms)", [1000 * r.tpot for r in ok if r.tpot is not None]),
              ("E2E latency (ms)", [1000 * r.e2el for r in ok]))
    for ax, (label, values) in zip(axes.flat, panels):
        ax.hist(values, bins=min(50, max(1, len(values))))
        ax.set_xlabel(label)
        ax.set_ylabel("requests")
    ax = axes.flat[3]
    timeline = output_throughput_timeline(ok, start_time, bin_s)
    # one more edge than bins, so the last bin is drawn as a step too
    ax.step([i * bin_s for i in range(len(timeline) + 1)], timeline + timeline[-1:], where="post")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s")
    failed = len(records) - len(ok)
    fig.suptitle(f"servelm bench serve: {len(ok)} ok, {failed} failed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
